"""The checks a deploy makes before anything changes, shared with ``validate`` so that
``mcp validate`` refuses what the deploy would refuse, by the same code.

Rules that hold whatever runs (this node's name, secrets set, volume roots and host
paths that exist, the route zone, route clashes) are errors: ValidationError or
ConflictError naming the field. What may change before the deploy (the room left on
the node, a runtime not yet available) is an error at deploy but only a warning to
``validate``. Nothing here pulls or resolves an image, or writes anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ResourceError, RuntimeUnavailable, ValidationError
from .grammar import volume_roots
from .servicedef import check_route_zone, check_volume_roots

if TYPE_CHECKING:
    from .config import AgentConfig
    from .records import ServiceRecord
    from .registry import Registry
    from .runtime import Runtime, WorkloadSpec
    from .servicedef import ComponentDef, ServiceDef


class Agent(Protocol):
    """What the checks read of the node's agent (a Protocol: ``agent`` imports this)."""

    config: AgentConfig
    node: str
    registry: Registry
    state_dir: Path

    @property
    def node_routes(self) -> Any: ...

    def runtime(self, name: str) -> Runtime: ...

    def available_runtime(self, name: str) -> Runtime: ...

    def with_secret_versions(self, defn: ServiceDef) -> ServiceDef: ...

    def _unallocated_spec(self, service: str, comp: ComponentDef) -> WorkloadSpec: ...


def check_node(agent: Agent, defn: ServiceDef) -> None:
    """A single node refuses a ``node`` other than its own name."""
    if defn.node and defn.node != agent.node:
        raise ValidationError(f"{defn.node!r} is not this node ({agent.node}); placement "
                              "on other nodes needs fleet mode ([cluster] in the agent's "
                              "config)", "node")


def rules(agent: Agent, defn: ServiceDef) -> ServiceDef:
    """``defn`` with its secret versions pinned, once every rule holds on this node.
    Host paths are resolved now, so a missing one is a 400 naming
    ``components[i].volumes[j]`` (podman's bind would fail with its raw statfs error)."""
    defn = agent.with_secret_versions(defn)   # an unknown secret: 400, nothing changed
    check_volume_roots(defn, volume_roots(agent.config.podman.volume_roots, agent.state_dir))
    check_route_zone(defn, agent.config.edge.internal_zone)
    if agent.config.proxy.serve_routes:
        agent.node_routes.check(defn)
    return defn


def _short(agent: Agent, defn: ServiceDef, previous: ServiceRecord | None,
           skip: frozenset[str] = frozenset()) -> Iterator[tuple[int, ResourceError]]:
    """Each component the node has no room for now (a VM's memory and vCPUs), but for
    those of the runtimes in ``skip``."""
    if not defn.active:
        return
    replacing = {c.defn.name for c in previous.components} if previous else set()
    for i, c in enumerate(defn.components):
        if c.runtime in skip:
            continue
        try:
            agent.runtime(c.runtime).check_capacity(
                agent._unallocated_spec(defn.name, c), c.name in replacing)
        except ResourceError as exc:
            yield i, exc


def check_capacity(agent: Agent, defn: ServiceDef, previous: ServiceRecord | None) -> None:
    """ResourceError for the first component that would overcommit the node."""
    for _i, exc in _short(agent, defn, previous):
        raise exc


def validate(agent: Agent, defn: ServiceDef) -> dict[str, Any]:
    """What deploying ``defn`` here would refuse: the rules raise as the deploy does;
    capacity and runtime availability, which may change before it, are warnings."""
    defn = rules(agent, defn)
    previous = (agent.registry.get_service(defn.name)
                if agent.registry.has_service(defn.name) else None)
    warnings, unbuilt = [], set()
    for name in dict.fromkeys(c.runtime for c in defn.components):
        try:
            agent.available_runtime(name)
        except RuntimeUnavailable as exc:
            warnings.append(f"runtime: {exc} (a deploy now would be refused)")
            try:
                agent.runtime(name)
            except RuntimeUnavailable:   # not even built (its module missing): no sizing
                unbuilt.add(name)
    warnings += [f"components[{i}]: capacity: {exc} (as of now; what runs may change "
                 "before the deploy)" for i, exc in _short(agent, defn, previous,
                                                           frozenset(unbuilt))]
    return {"service": defn.name, "valid": True, "components": len(defn.components),
            "warnings": warnings, "checked_by": agent.node}
