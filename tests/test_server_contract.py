"""What the schemathesis run (tests/test_schemathesis.py) found where the server and
its OpenAPI document disagreed, each fixed on the side that was wrong and pinned here.

An explicit JSON ``null`` used to pass as "absent" for a few optional body fields the
document types as integer or string (``memory_mb``, a lifecycle ``component``, a rollback
``version``), while every other field refused it: it is refused now, naming the field,
and nothing is deployed, stopped or rolled back.
"""

from __future__ import annotations

import json
import uuid

import pytest
from server_env import LiveServer

from mcp_node.errors import ValidationError
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
