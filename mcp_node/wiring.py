"""Which ``operations.Operations`` a config gets: the node's own ``Agent``, or with
``[cluster] etcd`` set, that agent wrapped as a fleet member (``fleetops``)."""

from __future__ import annotations

from typing import Any

from .agent import Agent
from .config import AgentConfig
from .operations import Operations


def build(config: AgentConfig, **agent_kw: Any) -> Operations:
    """``agent_kw`` go to ``Agent`` (monitor, reconcile, runtimes, on_round)."""
    if not config.cluster.enabled:
        return Agent(config, **agent_kw)
    from .fleetops import FleetOperations

    return FleetOperations.build(config, **agent_kw)
