"""Agent configuration: embedded defaults, TOML overrides, every bad value named."""

from __future__ import annotations

import pytest

from mcp_node.config import AgentConfig, from_dict
from mcp_node.errors import ValidationError


def test_empty_config_is_the_embedded_defaults() -> None:
    assert from_dict({}) == AgentConfig()


@pytest.mark.parametrize(("data", "field"), [
    ({"nope": {}}, "nope"),
    ({"server": {"nope": 1}}, "server.nope"),
    ({"server": {"listen": 9444}}, "server.listen"),
    ({"monitor": {"interval_s": True}}, "monitor.interval_s"),
    # A zero or negative interval turns the monitor into a busy loop; a negative body
    # limit refuses every request; a negative flap threshold flags everything.
    ({"monitor": {"interval_s": 0}}, "monitor.interval_s"),
    ({"monitor": {"interval_s": -1.5}}, "monitor.interval_s"),
    ({"monitor": {"edge_interval_s": 0}}, "monitor.edge_interval_s"),
    ({"monitor": {"flap_window_s": 0}}, "monitor.flap_window_s"),
    ({"monitor": {"flap_changes": -1}}, "monitor.flap_changes"),
    ({"server": {"max_body": 0}}, "server.max_body"),
    ({"dns": {"timeout_s": 0}}, "dns.timeout_s"),
    # nan, inf and absurdly small intervals: inf killed the monitor thread, the view froze.
    ({"monitor": {"interval_s": float("nan")}}, "monitor.interval_s"),
    ({"monitor": {"interval_s": float("inf")}}, "monitor.interval_s"),
    ({"monitor": {"interval_s": 1e-9}}, "monitor.interval_s"),
    ({"monitor": {"flap_window_s": float("-inf")}}, "monitor.flap_window_s"),
    ({"dns": {"timeout_s": 1e6}}, "dns.timeout_s"),
])
def test_bad_values_name_the_key(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        from_dict(data)
    assert err.value.field == field


def test_nan_and_inf_from_toml_are_refused(tmp_path: object) -> None:
    from pathlib import Path

    from mcp_node.config import load
    cfg = Path(str(tmp_path)) / "agent.toml"
    cfg.write_text("[monitor]\ninterval_s = inf\n")
    with pytest.raises(ValidationError, match="finite"):
        load(cfg)
