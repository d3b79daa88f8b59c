"""The HTTP agent against a real Agent (real podman): auth, errors, routing, lifecycle."""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
import uuid
from dataclasses import replace

import pytest
from conftest import until
from podman_env import wait_http
from server_env import SMALL_BODY, LiveServer

from mcp_node import openapi
from mcp_node.client import Client
from mcp_node.config import AgentConfig, from_dict
from mcp_node.errors import AgentUnreachable, MCPError, RemoteError, ValidationError
from mcp_node.httpapi import ROUTES, check_listen, is_loopback, parse_listen, resolve
from mcp_node.server import serve


def svc_name() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


def remote_error(fn: object, *args: object) -> RemoteError:
    with pytest.raises(RemoteError) as exc:
        fn(*args)  # type: ignore[operator]
    return exc.value


# -- pure helpers ----------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9444") == ("127.0.0.1", 9444)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", ":9444", "host:port", "1.2.3.4:70000", ""):
        with pytest.raises(ValidationError, match="server.listen"):
            parse_listen(bad)


def test_loopback_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.net")
    with pytest.raises(ValidationError, match="tls_cert"):
        check_listen(from_dict({"server": {"listen": "0.0.0.0:9444"}}))
    with pytest.raises(ValidationError, match="tls_cert"):
        check_listen(from_dict({"server": {"listen": "agent.example.net:9444"}}))
    tls = from_dict({"server": {"listen": "0.0.0.0:9444", "tls_cert": "/c", "tls_key": "/k"}})
    assert check_listen(tls) == ("0.0.0.0", 9444)
    assert check_listen(from_dict({"server": {"listen": "localhost:1"}})) == ("127.0.0.1", 1)


def test_serve_refuses_non_loopback_without_tls(podman_config: AgentConfig) -> None:
    from mcp_node.agent import Agent

    cfg = replace(podman_config, server=replace(podman_config.server, listen="0.0.0.0:0"))
    agent = Agent(cfg)
    try:
        with pytest.raises(ValidationError, match="not a loopback address"):
            serve(agent, cfg)
    finally:
        agent.close()
    assert not (cfg.state_dir / "token").exists()  # refused before anything was written


def test_resolve_routes() -> None:
    route, params = resolve("GET", "/v1/services/web")
    assert (route.op.op_id, route.op.call) == ("ServiceStatus", "status")
    assert params == {"name": "web"}
    route, params = resolve("POST", "/v1/services/web/restart")
    assert route.role == "operator" and params == {"name": "web"}
    with pytest.raises(MCPError) as exc:
        resolve("PUT", "/v1/services/web")
    assert exc.value.status == 405
    with pytest.raises(MCPError) as exc:
        resolve("GET", "/v1/services/web/bogus")
    assert exc.value.status == 404
    with pytest.raises(MCPError) as exc:
        resolve("GET", "/v1/services/../x")
    assert exc.value.status == 400


def test_openapi_documents_exactly_the_routes() -> None:
    doc = openapi.document()
    documented = {(m.upper(), path, op["x-mcp-role"])
                  for path, ops in doc["paths"].items() for m, op in ops.items()}
    served = {(r.method, r.template, r.role) for r in ROUTES}
    assert documented == served
    for path, ops in doc["paths"].items():
        for op in ops.values():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
            assert ("security" in op and op["security"] == []) == (op["x-mcp-role"] is None)
    queries = {(r.method, r.template): set(r.query) for r in ROUTES}
    for path, ops in doc["paths"].items():
        for m, op in ops.items():
            q = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
            assert q == queries[(m.upper(), path)]
    assert doc["openapi"].startswith("3.")
    json.loads(openapi.document_bytes())


# -- auth --------------------------------------------------------------------------------


def test_no_token_is_401_and_openapi_is_public(live_server: LiveServer) -> None:
    err = remote_error(live_server.client(None).get, "/v1/health")
    assert (err.status, err.code) == (401, "unauthenticated")
    r = live_server.request("GET", "/v1/services", role=None)
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "unauthenticated"
    bad = Client(live_server.url, "mcp_not-a-real-token")
    assert remote_error(bad.get, "/v1/services").status == 401
    r = live_server.request("GET", "/v1/health", role=None, headers={"Authorization": "Basic x"})
    assert r.status == 401
    doc = live_server.client(None).get("/v1/openapi.json")
    assert "/v1/services/{name}/logs" in doc["paths"]


def test_roles(live_server: LiveServer) -> None:
    reader = live_server.client("reader")
    assert reader.get("/v1/health")["status"] in ("healthy", "degraded")
    assert reader.get("/v1/services") == []
    for call in ((reader.post, "/v1/services", {"name": "x"}),
                 (reader.post, "/v1/services/x/stop", {}),
                 (reader.delete, "/v1/services/x")):
        err = remote_error(*call)
        assert (err.status, err.code) == (403, "forbidden")
        assert "reader" in err.message and "operator" in err.message
    op = live_server.client("operator")
    err = remote_error(op.post, "/v1/edge-routes", {"hostname": "a.example.net"})
    assert err.status == 403
    assert remote_error(op.delete, "/v1/edge-routes/a.example.net").status == 403
    # master passes the role check and reaches validation
    err = remote_error(live_server.client("master").post, "/v1/edge-routes", {"hostname": 5})
    assert (err.status, err.code) == (400, "invalid")


def test_token_added_later_is_accepted(live_server: LiveServer) -> None:
    from mcp_node.auth import TokenStore

    other = TokenStore(live_server.server.tokens.path)  # as `mcp-agent token add` would
    token = other.add("late-" + uuid.uuid4().hex[:6], "reader")
    live_server.server.tokens.reload(force=True)
    assert Client(live_server.url, token).get("/v1/services") == []


# -- bad requests ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"{", b"not json", b"\xff\xfe", b"[" * 60000, b"1" * 5000, b"", b"null", b"[]",
    b'{"name": 5, "components": []}', b'{"name": "x", "components": "no"}',
    b'{"name": "x", "components": [{"name": "w", "image": 7}]}',
    b'{"name": "x", "components": [{"name": "w", "image": "i", "bogus": 1}]}',
    b'{"name": "../x", "components": [{"name": "w", "image": "i"}]}',
    b'{"name": "a,b", "components": [{"name": "w", "image": "i"}]}',
    # falsy non-strings where a route's optional name / hostname go
    b'{"name": "x", "components": [{"name": "w", "image": "i", "routes": [{"port": 80, '
    b'"name": []}]}]}',
    b'{"name": "x", "components": [{"name": "w", "image": "i", "routes": [{"port": 80, '
    b'"hostname": []}]}]}',
    b'{"name": "x", "components": [{"name": "w", "image": "i", "routes": [{"port": 80, '
    b'"name": 0}]}]}',
])
def test_bad_deploy_bodies_are_400(live_server: LiveServer, body: bytes) -> None:
    r = live_server.request("POST", "/v1/services", body)
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert err["code"] == "invalid" and err["message"]
    assert live_server.agent.ps() == []


def test_bad_names_in_path_are_400(live_server: LiveServer) -> None:
    c = live_server.client()
    for path in ("/v1/services/a,b", "/v1/services/..%2Fx", "/v1/services/%2e%2e",
                 "/v1/services/UPPER/stop", "/v1/services/a%20b/logs",
                 "/v1/services/-x", "/v1/services/%ff"):
        err = remote_error(c.post, path, {}) if path.endswith("/stop") else remote_error(
            c.get, path)
        assert (err.status, err.code) == (400, "invalid"), path
    r = live_server.request("GET", "/v1/services/../x")
    assert r.status == 400 and r.json()["error"]["code"] == "invalid"
    err = remote_error(live_server.client("master").delete, "/v1/edge-routes/bad_host!")
    assert err.status == 400


def test_oversized_body_is_413(live_server: LiveServer) -> None:
    big = {"name": "x", "components": [{"name": "w", "image": "i" * SMALL_BODY}]}
    err = remote_error(live_server.client().post, "/v1/services", big)
    assert (err.status, err.code) == (413, "too_large")
    # announced but never sent: refused on the header alone
    r = live_server.raw(
        b"POST /v1/services HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + live_server.token("operator").encode()
        + b"\r\nContent-Length: 999999999999\r\nExpect: 100-continue\r\n\r\n")[0]
    assert r.status == 413 and r.headers["connection"] == "close"


def test_protocol_errors(live_server: LiveServer) -> None:
    tok = live_server.token("operator").encode()
    auth = b"Host: x\r\nAuthorization: Bearer " + tok + b"\r\n"
    cases = {
        b"GARBAGE\r\n\r\n": 400,
        b"GET /v1/health HTTP/2.0\r\n\r\n": 505,
        b"GET " + b"a" * 9000 + b" HTTP/1.1\r\n\r\n": 414,
        b"GET /v1/health HTTP/1.1\r\nno colon here\r\n\r\n": 400,
        b"POST /v1/services HTTP/1.1\r\n" + auth + b"Content-Length: -1\r\n\r\n": 400,
        b"POST /v1/services HTTP/1.1\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n":
            411,
        b"GET http://x/v1/health HTTP/1.1\r\n" + auth + b"\r\n": 400,
        b"GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n": 404,
        b"GET /v1/nope HTTP/1.1\r\n\r\n": 400,  # HTTP/1.1 without Host
        b"PUT /v1/services HTTP/1.1\r\n" + auth + b"\r\n": 405,
        b"GET /v1/services?x=1 HTTP/1.1\r\n" + auth + b"\r\n": 400,
        b"GET /v1/health HTTP/1.1\r\n" + auth + b"Authorization: x\r\n\r\n": 400,
    }
    for req, status in cases.items():
        r = live_server.raw(req)[0]
        assert r.status == status, (req[:60], r.status, r.body)
        assert r.json()["error"]["code"] and r.json()["error"]["message"]
    r = live_server.raw(b"PUT /v1/services HTTP/1.1\r\n" + auth + b"\r\n")[0]
    assert r.headers["allow"] == "GET, POST"


def test_unknown_service_is_404(live_server: LiveServer) -> None:
    c = live_server.client()
    missing = svc_name()
    for fn, path in ((c.get, f"/v1/services/{missing}"),
                     (c.get, f"/v1/services/{missing}/logs"),
                     (c.delete, f"/v1/services/{missing}")):
        err = remote_error(fn, path)
        assert (err.status, err.code) == (404, "not_found"), path
        assert missing in err.message
    for op in ("stop", "start", "restart"):
        assert remote_error(c.post, f"/v1/services/{missing}/{op}", {}).status == 404



def test_percent_encoded_lifecycle_path_is_not_a_500(live_server: LiveServer) -> None:
    # The router decodes path segments, so ".../%73top" is the stop route; the handler
    # must read the same decoded operation, not the raw target.
    missing = svc_name()
    for path in (f"/v1/services/{missing}/%73top", f"/v1/services/{missing}/st%6Fp/"):
        r = live_server.request("POST", path, b"{}")
        assert r.status == 404, (path, r.status, r.body)
        assert r.json()["error"]["code"] == "not_found"

def test_logs_query_validation(live_server: LiveServer) -> None:
    c = live_server.client()
    for params in ({"tail": "-1"}, {"tail": "x"}, {"follow": "maybe"},
                   {"component": "A,B"}, {"bogus": "1"}):
        err = remote_error(lambda p=params: c.get("/v1/services/web/logs", params=p))
        assert err.status == 400, params


def test_unexpected_exception_is_a_generic_500(live_server: LiveServer,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> list[object]:
        raise KeyError("secret-internal-detail")

    monkeypatch.setattr(live_server.agent, "ps", boom)
    with caplog.at_level(logging.ERROR, logger="mcp_node.server"):
        err = remote_error(live_server.client().get, "/v1/services")
    assert (err.status, err.code) == (500, "internal")
    assert "secret-internal-detail" not in err.message
    assert any("secret-internal-detail" in (r.exc_text or "") or r.exc_info
               for r in caplog.records)
    assert live_server.client().get("/v1/health")  # the server carries on


def test_keep_alive_and_pipelining(live_server: LiveServer) -> None:
    tok = live_server.token("reader").encode()
    one = b"GET /v1/services HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok + b"\r\n\r\n"
    rs = live_server.raw(one * 3, responses=3)
    assert [r.status for r in rs] == [200, 200, 200]
    assert all("connection" not in r.headers for r in rs)
    c = live_server.client("reader")
    c.get("/v1/health")
    sock = c._conn.sock if c._conn else None
    c.get("/v1/services")
    assert sock is not None and c._conn is not None and c._conn.sock is sock
    r = live_server.raw(b"GET /v1/openapi.json HTTP/1.0\r\n\r\n")[0]
    assert r.status == 200 and r.headers["connection"] != "keep-alive"


def test_client_reports_unreachable_agent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AgentUnreachable, match=f"not reachable at http://127.0.0.1:{port}"):
        Client(f"http://127.0.0.1:{port}", "t").get("/v1/health")


# -- end to end ------------------------------------------------------------------------


def test_lifecycle_over_http(live_server: LiveServer, hello_image: str) -> None:
    c = live_server.client()
    name = svc_name()
    defn = {"name": name, "components": [{"name": "web", "image": hello_image,
                                          "env": ["MESSAGE=over-http"],
                                          "routes": [{"port": 8080}]}]}
    st = c.post("/v1/services", defn)
    assert st["service"] == name
    [row] = [r for r in c.get("/v1/services") if r["service"] == name]
    assert row["component"] == "web" and row["state"] == "running"
    port = row["routes"][0]["host_port"]
    assert "hello from over-http" in wait_http(port, "/ping")
    assert c.get(f"/v1/services/{name}")["service"] == name

    def logged() -> bool:   # podman's log of the answer may come a moment after it
        logs = c.get(f"/v1/services/{name}/logs", params={"tail": 50})
        return isinstance(logs, str) and "/ping" in logs
    until(logged, 30, "the /ping request never showed in the service's log")
    stream = c.stream(f"/v1/services/{name}/logs", params={"follow": "1", "tail": 0},
                      idle_timeout=60)
    wait_http(port, "/followed")
    seen = b""
    for chunk in stream:
        seen += chunk
        if b"/followed" in seen:
            break
    stream.close()  # type: ignore[attr-defined]
    assert b"/followed" in seen

    assert c.post(f"/v1/services/{name}/stop")["service"] == name
    assert c.post(f"/v1/services/{name}/start", {})["service"] == name
    assert c.post(f"/v1/services/{name}/restart")["service"] == name
    err = remote_error(c.post, f"/v1/services/{name}/stop", {"unexpected": 1})
    assert err.status == 400
    assert c.delete(f"/v1/services/{name}") == {"service": name, "undeployed": True}
    assert [r for r in c.get("/v1/services") if r["service"] == name] == []
    assert remote_error(c.get, f"/v1/services/{name}").status == 404


def test_progress_over_http_while_a_deploy_runs(live_server: LiveServer,
                                                hello_image: str) -> None:
    """What ``mcp deploy`` shows on a terminal: each component's step, asked on a
    second connection while the deploy's call waits on the first."""
    import threading

    from mcp_node.clictx import RemoteBackend

    name = svc_name()
    reader = RemoteBackend(live_server.url, live_server.token("reader"))
    idle = {"service": name, "operation": None, "elapsed_s": 0.0, "components": {}}
    assert reader.call("progress", name) == idle
    operator = RemoteBackend(live_server.url, live_server.operator_token)
    defn = {"name": name, "components": [{"name": "web", "image": hello_image},
                                         {"name": "api", "image": hello_image}]}
    deploy = threading.Thread(target=operator.call, args=("deploy", defn))
    seen: set[tuple[str, str, str]] = set()
    deploy.start()
    while deploy.is_alive():
        p = reader.call("progress", name)
        seen |= {(p["operation"], c, step) for c, step in p["components"].items()}
    deploy.join()
    assert operator.call("status", name)["service"] == name
    assert {("deploy", "web", "starting"), ("deploy", "api", "starting")} & seen, seen
    assert {op for op, _, _ in seen} == {"deploy"}
    assert reader.call("progress", name) == idle
    operator.call("undeploy", name)


def test_missing_image_is_502_not_500(live_server: LiveServer) -> None:
    defn = {"name": svc_name(), "components": [
        {"name": "web", "image": f"localhost/mcp-missing-{uuid.uuid4().hex[:8]}:v1"}]}
    err = remote_error(live_server.client().post, "/v1/services", defn)
    assert err.status == 502 and err.code == "image"
    assert live_server.agent.ps() == []


def test_urllib_sees_json_errors(live_server: LiveServer) -> None:
    """A plain HTTP client (not ours) gets the design's error shape and content type."""
    req = urllib.request.Request(live_server.url + "/v1/services")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 401
    assert exc.value.headers["Content-Type"] == "application/json"
    assert json.loads(exc.value.read())["error"]["code"] == "unauthenticated"
