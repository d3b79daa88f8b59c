"""Property tests: arbitrary input to the API is refused with a 4xx (or a runtime's 502),
never a 500, and never deploys anything."""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_env import LiveServer

ALLOWED = {400, 404, 409, 413, 502, 503}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)

NAMES = st.one_of(st.sampled_from(["web", "a,b", "../x", "", "UPPER", "-x", "x" * 70]),
                  st.text(max_size=20), st.integers(), st.none())
MISSING_IMAGE = st.builds(lambda: f"localhost/mcp-fuzz-missing-{uuid.uuid4().hex[:8]}:v1")

route_like = st.fixed_dictionaries({}, optional={
    "name": NAMES, "port": st.one_of(st.integers(-5, 70000), st.text(max_size=5)),
    "mode": st.sampled_from(["l4", "l7", "l9", 7]), "hostname": st.text(max_size=30),
    "extra": json_values,
})
component_like = st.fixed_dictionaries({"name": NAMES}, optional={
    "image": st.one_of(MISSING_IMAGE, st.text(max_size=30), st.integers()),
    "cmd": json_values, "env": st.lists(st.text(max_size=20), max_size=3) | json_values,
    "volumes": st.lists(st.text(max_size=20), max_size=2),
    "restart": st.sampled_from(["no", "always", "sometimes", 1]),
    "runtime": st.sampled_from(["container", "unikernel", "vm", None]),
    "memory_mb": st.one_of(st.integers(-10, 1 << 21), st.booleans()),
    "vcpus": st.integers(-1, 100), "routes": st.lists(route_like, max_size=3) | json_values,
    "bogus": json_values,
})
definition_like = st.fixed_dictionaries({"name": NAMES}, optional={
    "active": st.one_of(st.booleans(), json_values),
    "runtime": st.sampled_from(["container", "unikernel", "x"]),
    "components": st.lists(component_like, max_size=3) | json_values,
    "extra": json_values,
})
# Valid down to one nested field, so the fuzz reaches the deepest validators too
# (route names and hostnames, env entries, volumes), not just the top-level ones.
VALID_NAME = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
near_valid = st.fixed_dictionaries({
    "name": VALID_NAME,
    "components": st.lists(st.fixed_dictionaries({
        "name": VALID_NAME, "image": MISSING_IMAGE,
    }, optional={
        "routes": st.lists(st.fixed_dictionaries({"port": st.integers(1, 65535)}, optional={
            "name": json_values, "hostname": json_values, "mode": json_values}), max_size=2),
        "env": st.lists(json_values, max_size=2), "volumes": st.lists(json_values, max_size=2),
        "memory_mb": json_values, "vcpus": json_values, "binary": json_values,
        "image_sha256": json_values, "cmd": st.lists(json_values, max_size=2),
    }), min_size=1, max_size=2),
})
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    definition_like.map(lambda v: json.dumps(v).encode()),
    near_valid.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)


def _check(live: LiveServer, method: str, path: str, body: bytes | None,
           allowed: set[int] = ALLOWED) -> None:
    r = live.request(method, path, body)
    assert r.status != 500, (path, body[:200] if body else None, r.body)
    assert r.status == 200 or r.status in allowed, (r.status, r.body)
    if r.status != 200:
        err = r.json()["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str)


def test_deploy_never_500(live_server: LiveServer) -> None:
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(bodies)
    def check(body: bytes) -> None:
        _check(live_server, "POST", "/v1/services", body)

    check()
    assert live_server.agent.ps() == []


def test_paths_and_queries_never_500(live_server: LiveServer) -> None:
    from urllib.parse import quote, quote_from_bytes

    segment = st.one_of(
        st.text(max_size=20).map(lambda s: quote(s, safe="")),  # UTF-8, percent-encoded
        st.binary(max_size=20).map(lambda b: quote_from_bytes(b, safe="")),  # maybe not UTF-8
        st.binary(max_size=20).map(  # raw octets on the wire (no space, CR, LF, '?', '/')
            lambda b: bytes(c for c in b if c not in b" \r\n\t?/#").decode("latin-1")),
    )

    @settings(max_examples=200, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(segment, st.sampled_from(["", "/stop", "/start", "/restart", "/logs", "/x"]),
           st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
           st.dictionaries(st.sampled_from(["component", "tail", "follow", "q"]),
                           st.text(max_size=8), max_size=3))
    def check(name: str, suffix: str, method: str, query: dict[str, Any]) -> None:
        from urllib.parse import urlencode

        path = f"/v1/services/{name}{suffix}" + (f"?{urlencode(query)}" if query else "")
        body = b"{}" if method == "POST" else None
        _check(live_server, method, path, body, ALLOWED | {405})

    check()
    assert live_server.agent.ps() == []


# -- raw bytes and headers (what schemathesis never sends) -----------------------------------

_NAMES = st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Authorization",
                          "Expect", "Connection", "X-A", "host", "Bad Name", ""])
_VALUES = st.one_of(st.sampled_from(["", "0", "5", "\xb2", "٣", "-1", "chunked", "close",
                                     "100-continue", "Bearer x", " 7 "]),
                    st.binary(max_size=20).map(lambda b: b.decode("latin-1")))
_METHODS = st.sampled_from(["GET", "POST", "DELETE", "HEAD", "PUT", "G\x00T", "", "\x1b[2J"])
_TARGETS = st.one_of(st.sampled_from(["/v1/health", "/v1/services", "/v1/services/web/logs",
                                      "/v1/services/web/logs?tail=%C2%B2", "*", "/v1/openapi.json",
                                      "/v1/services/web/logs?tail=99999999999999999999"]),
                     st.binary(max_size=30).map(lambda b: "/" + b.decode("latin-1")))
_USUAL_TARGETS = ["/v1/health", "/v1/services", "/v1/services/web", "/v1/services/web/logs",
                  "/v1/services/web/logs?tail=3", "/v1/services/web/stop", "/v1/edge-routes",
                  "/v1/services/web/logs?tail=%C2%B2", "/v1/services/web/logs?tail=10001",
                  "/v1/health?x=1"]
_VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", ""])


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> Any:
    return draw(odd) if draw(st.integers(0, 5)) == 0 else draw(usual)


@st.composite
def _raw_requests(draw: st.DrawFn, token: str) -> bytes:
    """Mostly near-valid requests with an odd part or two, so most get past the parser
    into routing, auth and the handlers; now and then plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    method = _mostly(draw, st.sampled_from(["GET", "GET", "POST", "DELETE"]), _METHODS)
    target = _mostly(draw, st.sampled_from(_USUAL_TARGETS), _TARGETS)
    version = _mostly(draw, st.just("HTTP/1.1"), _VERSIONS)
    headers = []
    if _mostly(draw, st.just(True), st.booleans()):
        headers.append(("Host", "127.0.0.1:9444"))
    if _mostly(draw, st.just(True), st.booleans()):
        headers.append(("Authorization", f"Bearer {token}"))
    headers += _mostly(draw, st.just([]), st.lists(st.tuples(_NAMES, _VALUES), max_size=3))
    body = draw(st.sampled_from([b"", b"{}", b'{"name": "a", "name": "b"}', b"{"])
                | st.binary(max_size=60))
    if method == "POST" and _mostly(draw, st.just(True), st.booleans()):
        headers.append(("Content-Length", str(len(body))))
    head = "\r\n".join([f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers),
                         "", ""])
    eol = _mostly(draw, st.just(b"\r\n"), st.sampled_from([b"\n", b"\r"]))
    return head.encode("utf-8").replace(b"\r\n", eol) + body


def test_raw_requests_never_500_nor_hang(tmp_path: Any) -> None:
    """Each request is sent, then the client half-closes: whatever the bytes, every answer
    is a well-formed non-5xx (503 ``busy`` aside) and the connection ends without waiting
    out a deadline; afterwards the server still answers."""
    import re
    import socket

    from live_server import deploy, fake_live

    with fake_live(tmp_path, header_timeout_s=30, body_timeout_s=30) as live:
        deploy(live)
        token = live.token("operator")

        @settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
        @given(st.data())
        def check(data: st.DataObject) -> None:
            raw = data.draw(_raw_requests(token))
            with socket.create_connection(live.address, timeout=10) as s:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                out = b""
                while chunk := s.recv(65536):  # a hang would be a TimeoutError here
                    out += chunk
            for status in re.findall(rb"(?:^|\n)HTTP/1\.1 (\d{3}) ", out):
                assert not status.startswith(b"5") or status in (b"503", b"505"), (raw, out)
            assert b"Traceback" not in out

        check()
        assert live.client("reader").get("/v1/health")["status"]
        assert live.server.open_connections <= 1
