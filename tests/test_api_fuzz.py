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
