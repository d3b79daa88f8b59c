"""What the schemathesis run (tests/test_schemathesis.py) found where the server and
its OpenAPI document disagreed, each fixed on the side that was wrong and pinned here.

An explicit JSON ``null`` used to pass as "absent" for a few optional body fields the
document types as integer or string (``memory_mb``, a lifecycle ``component``, a rollback
``version``), while every other field refused it: it is refused now, naming the field,
and nothing is deployed, stopped or rolled back.

JSON has one number type and JSON Schema's "integer" is any number with no fraction, so
a client may send 1019.0 where the document says integer: it was a 400 (Python reads it
as a float); it is the integer now, and 1019.5 is still refused.
"""

from __future__ import annotations

import json
import uuid

import pytest
from server_env import LiveServer

from mcp_node.errors import ValidationError
from mcp_node.httpapi import edge_setup_args
from mcp_node.servicedef import from_dict


def _defn(**component: object) -> dict[str, object]:
    return {"name": f"s{uuid.uuid4().hex[:8]}",
            "components": [{"name": "web", "image": "localhost/mcp-hello:v1", **component}]}


def test_null_memory_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        from_dict(_defn(memory_mb=None))
    assert err.value.field == "components[0].memory_mb"
    assert from_dict(_defn()).components[0].memory_mb is None  # absent is still unset


def test_null_memory_over_http_is_400_and_deploys_nothing(live_server: LiveServer) -> None:
    body = _defn(memory_mb=None)
    r = live_server.request("POST", "/v1/services", json.dumps(body).encode())
    assert r.status == 400, r.body
    assert r.json()["error"]["message"].startswith("components[0].memory_mb: must be an integer")
    assert live_server.agent.ps() == []


@pytest.mark.parametrize(("op", "body"), [
    ("stop", {"component": None}), ("start", {"component": None}),
    ("restart", {"component": None, "timeout": 0}), ("rollback", {"version": None}),
])
def test_null_in_lifecycle_bodies_is_400(live_server: LiveServer, op: str,
                                         body: dict[str, object]) -> None:
    """Validated before the service is looked up: a missing one would answer 404."""
    missing = f"s{uuid.uuid4().hex[:8]}"
    r = live_server.request("POST", f"/v1/services/{missing}/{op}", json.dumps(body).encode())
    assert r.status == 400, (op, r.status, r.body)
    err = r.json()["error"]
    assert err["code"] == "invalid" and err["message"].startswith(f"{next(iter(body))}: "), err


def test_integral_numbers_are_integers() -> None:
    d = from_dict(_defn(runtime="unikernel", memory_mb=256.0, vcpus=2.0,
                        routes=[{"port": 8080.0}]))
    c = d.components[0]
    assert (c.memory_mb, c.vcpus, c.routes[0].port) == (256, 2, 8080)
    assert all(type(v) is int for v in (c.memory_mb, c.vcpus, c.routes[0].port))
    assert d.to_dict()["components"][0]["routes"][0]["port"] == 8080
    for bad in (8080.5, float("nan"), float("inf"), True, "8080"):
        with pytest.raises(ValidationError) as err:
            from_dict(_defn(routes=[{"port": bad}]))
        assert err.value.field == "components[0].routes[0].port", bad
    args = edge_setup_args({"hostname": "a.example.net", "backend_hostname": "b.example.net",
                            "backend_port": 443.0})
    assert args[2] == 443 and type(args[2]) is int
    with pytest.raises(ValidationError):
        edge_setup_args({"hostname": "a.example.net", "backend_hostname": "b.example.net",
                         "backend_port": 443.5})


def test_rollback_takes_an_integral_float_version(live_server: LiveServer) -> None:
    missing = f"s{uuid.uuid4().hex[:8]}"
    path = f"/v1/services/{missing}/rollback"
    r = live_server.request("POST", path, b'{"version": 1019.0}')
    assert r.status == 404 and r.json()["error"]["code"] == "not_found", r.body
    r = live_server.request("POST", path, b'{"version": 1019.5}')
    assert r.status == 400 and r.json()["error"]["message"].startswith("version: "), r.body
