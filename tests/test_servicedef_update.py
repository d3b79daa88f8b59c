"""The keys issue 19 adds (design §10): checks that keep running, the pull policy and
``[update]``. Each bad value is refused naming its field; defaults stay out of the JSON
form, so a definition from before them keeps its digest."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_node.errors import ValidationError
from mcp_node.records import definition_digest
from mcp_node.servicedef import UpdateDef, from_dict, loads_toml


def svc(comp: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    c = {"name": "web", "image": "localhost/x:1", "routes": [{"port": 80}], **(comp or {})}
    return {"name": "s", "components": [c], **top}


def test_defaults_and_a_full_table() -> None:
    d = from_dict(svc())
    c = d.components[0]
    assert (c.check_interval_s, c.check_timeout_s, c.check_failures, c.pull) == (
        10.0, 2.0, 3, "missing")
    assert d.update == UpdateDef("", 5.0, 60.0, True, 5.0)
    full = loads_toml('''
name = "s"
[update]
order = "stop-first"
min_healthy_s = 2
healthy_deadline_s = 30.5
auto_revert = false
drain_s = 0
[[components]]
name = "web"
image = "localhost/x:1"
check = "http:/health"
check_interval_s = 0.5
check_timeout_s = 1
check_failures = 2
pull = "always"
[[components.routes]]
port = 80
''')
    assert full.update == UpdateDef("stop-first", 2.0, 30.5, False, 0.0)
    c = full.components[0]
    assert (c.check_interval_s, c.check_timeout_s, c.check_failures, c.pull) == (
        0.5, 1.0, 2, "always")
    assert from_dict(full.to_dict()) == full


def test_defaults_are_left_out_so_old_digests_hold() -> None:
    old = svc()
    assert from_dict(old).to_dict() == {**old, "active": True, "runtime": "container",
                                        "components": [from_dict(old).to_dict()
                                                       ["components"][0]]}
    out = from_dict(old).to_dict()
    assert "update" not in out
    assert not {"check_interval_s", "check_timeout_s", "check_failures",
                "pull"} & set(out["components"][0])
    explicit = svc({"check_interval_s": 10, "pull": "missing"}, update={"min_healthy_s": 5})
    assert definition_digest(from_dict(explicit)) == definition_digest(from_dict(old))
    changed = svc({"check_failures": 4})
    assert definition_digest(from_dict(changed)) != definition_digest(from_dict(old))


def test_fence_is_the_default_failover_by_name() -> None:
    assert from_dict(svc(failover="fence")) == from_dict(svc())


@pytest.mark.parametrize(("data", "field", "message"), [
    (svc({"check_interval_s": 0.05}), "components[0].check_interval_s",
     "must be 0 (once per run) or 0.1-86400 (is 0.05)"),
    (svc({"check_interval_s": -1}), "components[0].check_interval_s", "must be 0-86400"),
    (svc({"check_interval_s": True}), "components[0].check_interval_s",
     "must be a number of seconds"),
    (svc({"check_interval_s": float("nan")}), "components[0].check_interval_s",
     "must be a number of seconds"),
    (svc({"check_timeout_s": 0}), "components[0].check_timeout_s", "must be 0.1-60"),
    (svc({"check_timeout_s": float("inf")}), "components[0].check_timeout_s",
     "must be 0.1-60"),
    (svc({"check_failures": 0}), "components[0].check_failures", "must be 1-100 (is 0)"),
    (svc({"check_failures": 1.5}), "components[0].check_failures", ""),
    (svc({"pull": "never"}), "components[0].pull", "'never' is not missing or always"),
    (svc(update=[]), "update", "must be a table"),
    (svc(update={"order": "blue-green"}), "update.order",
     "'blue-green' is not stop-first or start-first"),
    (svc(update={"auto_revert": "yes"}), "update.auto_revert", "must be a boolean"),
    (svc(update={"min_healthy_s": 3601}), "update.min_healthy_s", "must be 0-3600"),
    (svc(update={"healthy_deadline_s": 0}), "update.healthy_deadline_s", "must be 1-86400"),
    (svc(update={"drain": 1}), "update.drain", "unknown key 'drain'"),
])
def test_bad_values_name_their_field(data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        from_dict(data)
    assert e.value.field == field
    assert message in str(e.value)


def test_the_registry_keeps_the_new_keys(tmp_path: object) -> None:
    """A record's definition is what was deployed, new keys included (they were lost:
    status' definition and the current version in history disagreed)."""
    from pathlib import Path

    from mcp_node.registry import Registry

    reg = Registry(Path(str(tmp_path)) / "r.db")
    d = from_dict(svc({"check_interval_s": 0.3, "check_failures": 2, "check_timeout_s": 1,
                       "pull": "always"}, update={"min_healthy_s": 2, "auto_revert": False}))
    assert reg.put_service(d).definition() == d
    plain = from_dict(svc())
    assert reg.put_service(plain).definition() == plain      # back to the defaults
    reg.close()
