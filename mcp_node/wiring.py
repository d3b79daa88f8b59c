"""Which ``operations.Operations`` a config gets: the node's own ``Agent``, or with
``[cluster] etcd`` set, that agent wrapped as a fleet member (``fleetops``)."""

from __future__ import annotations

from typing import Any

from .agent import Agent
from .config import AgentConfig
from .files import default_node_name
from .operations import Operations


def node_agent(config: AgentConfig, **agent_kw: Any) -> Agent:
    """The node's agent, under the fleet's name for this node in fleet mode.
    ``agent_kw`` go to ``Agent`` (monitor, reconcile, runtimes, on_round)."""
    node = None
    if config.cluster.enabled:
        node = config.cluster.node or default_node_name()
    return Agent(config, node=node, **agent_kw)


def around(agent: Agent) -> Operations:
    """What serves ``agent``'s node: itself, or the fleet member wrapping it."""
    if not agent.config.cluster.enabled:
        return agent
    from .fleetops import FleetOperations

    return FleetOperations(agent)


def build(config: AgentConfig, **agent_kw: Any) -> Operations:
    return around(node_agent(config, **agent_kw))
