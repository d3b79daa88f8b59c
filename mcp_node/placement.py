"""Where a service runs in fleet mode: the pure choice, no etcd and no clock.

Kept apart from the etcd code so the rules (pinned, pool, spread by free
memory, cordons, capacity) are tested as plain functions many times; the
caller commits the choice and the capacity it takes in one etcd transaction
and retries on a conflict, so two deploys never take the same room.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .runtimenames import TRAITS
from .servicedef import ServiceDef

COMPUTE = "compute"
EDGE = "edge"
ROLES = (COMPUTE, EDGE)


@dataclass(frozen=True)
class Demand:
    """What a service takes from a node: memory of components that state it, the
    vCPUs of its VMs (a container's ``vcpus`` is not enforced, so it takes none),
    one host port per route, and the runtimes it needs."""

    memory_mb: int = 0
    vcpus: int = 0
    ports: int = 0
    runtimes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"memory_mb": self.memory_mb, "vcpus": self.vcpus, "ports": self.ports,
                "runtimes": list(self.runtimes)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Demand:
        return Demand(int(d.get("memory_mb", 0)), int(d.get("vcpus", 0)),
                      int(d.get("ports", 0)), tuple(d.get("runtimes", ())))


def demand_of(defn: ServiceDef) -> Demand:
    if not defn.active:
        return Demand(runtimes=tuple(sorted({c.runtime for c in defn.components})))
    return Demand(
        memory_mb=sum(c.memory_mb or 0 for c in defn.components),
        vcpus=sum(c.vcpus for c in defn.components if TRAITS[c.runtime].counts_vcpus),
        ports=sum(len(c.routes) for c in defn.components),
        runtimes=tuple(sorted({c.runtime for c in defn.components})),
    )


@dataclass(frozen=True)
class NodeInfo:
    """A live node as its lease-bound record states it, with what placements hold."""

    name: str
    roles: tuple[str, ...] = (COMPUTE,)
    pool: str = ""
    memory_mb: int = 0          # capacity it offers to placements
    vcpus: int = 0
    ports: int = 50_000
    runtimes: tuple[str, ...] = ()
    cordoned: bool = False
    held: Demand = field(default_factory=Demand)   # sum of the placements on it

    @property
    def free_memory_mb(self) -> int:
        return self.memory_mb - self.held.memory_mb

    @property
    def free_vcpus(self) -> int:
        return self.vcpus - self.held.vcpus

    @property
    def free_ports(self) -> int:
        return self.ports - self.held.ports


def parse_target(node: str) -> tuple[str, str]:
    """A service's ``node`` key: ("", "") any, ("node", NAME) pinned, ("pool", NAME)."""
    if not node:
        return "", ""
    if node.startswith("pool:"):
        return "pool", node[5:]
    return "node", node


def reason(n: NodeInfo, want: Demand, target: str, *, minus: Demand | None = None) -> str:
    """Why ``n`` cannot take ``want`` (empty: it can). ``minus`` is what the service
    already holds there (a redeploy in place frees it first)."""
    kind, name = parse_target(target)
    if kind == "node" and n.name != name:
        return f"not {name}"
    if kind == "pool" and n.pool != name:
        return f"not in pool {name} (pool {n.pool or 'none'})"
    if COMPUTE not in n.roles:
        return "not a compute node (roles: " + ", ".join(n.roles) + ")"
    if n.cordoned:
        return "cordoned (mcp uncordon to let work back)"
    lacking = [r for r in want.runtimes if r not in n.runtimes]
    if lacking:
        return "no " + ", ".join(lacking) + " runtime"
    back = minus or Demand()
    mem = n.free_memory_mb + back.memory_mb
    if want.memory_mb > mem:
        return f"needs {want.memory_mb} MB memory, {max(mem, 0)} MB free"
    cpus = n.free_vcpus + back.vcpus
    if want.vcpus > cpus:
        return f"needs {want.vcpus} vCPUs, {max(cpus, 0)} free"
    ports = n.free_ports + back.ports
    if want.ports > ports:
        return f"needs {want.ports} ports, {max(ports, 0)} free"
    return ""


@dataclass(frozen=True)
class Choice:
    node: str                       # "" when nothing fits
    reasons: dict[str, str]         # node -> why not (every node that was not chosen)
    mode: str                       # "pinned" | "pool:NAME" | "spread"

    def refusal(self, service: str) -> str:
        if not self.reasons:
            return f"service {service!r} fits no node: no node is up"
        why = "; ".join(f"{n}: {r}" for n, r in sorted(self.reasons.items()))
        return f"service {service!r} fits no node ({why})"


def choose(service: str, want: Demand, target: str, nodes: Mapping[str, NodeInfo], *,
           current: str = "", holding: Demand | None = None,
           exclude: frozenset[str] = frozenset()) -> Choice:
    """The node for ``service``: its ``current`` one when it still fits (a redeploy
    does not move), else the fitting node with the most free memory (ties: name).

    ``holding`` is what the service holds on ``current`` now (freed by a redeploy
    there); ``exclude`` are nodes it must leave (down, or being drained).
    """
    kind, name = parse_target(target)
    mode = "pinned" if kind == "node" else (f"pool:{name}" if kind == "pool" else "spread")
    reasons: dict[str, str] = {}
    fits: list[NodeInfo] = []
    for n in nodes.values():
        if n.name in exclude:
            reasons[n.name] = "leaving (down or drained)"
            continue
        why = reason(n, want, target, minus=holding if n.name == current else None)
        if why:
            reasons[n.name] = why
        else:
            fits.append(n)
    if kind == "node":       # pinned: only its node's reason is news
        reasons = {k: v for k, v in reasons.items() if k == name}
        if name not in nodes and name not in exclude:
            reasons[name] = "not up (no live record in etcd)"
    if not fits:
        return Choice("", reasons, mode)
    if current and any(n.name == current for n in fits):
        pick = current
    else:
        pick = min(fits, key=lambda n: (-n.free_memory_mb, -n.free_vcpus, n.name)).name
    return Choice(pick, {k: v for k, v in reasons.items() if k != pick}, mode)


def nodes_from(records: Mapping[str, Mapping[str, Any]],
               allocs: Mapping[str, Mapping[str, Mapping[str, Any]]],
               cordoned: set[str]) -> dict[str, NodeInfo]:
    """NodeInfo per live node record, with the sum of its placements held."""
    out: dict[str, NodeInfo] = {}
    for name, rec in records.items():
        held = [Demand.from_dict(d) for d in allocs.get(name, {}).values()]
        cap = rec.get("capacity", {})
        out[name] = NodeInfo(
            name=name, roles=tuple(rec.get("roles", (COMPUTE,))), pool=str(rec.get("pool", "")),
            memory_mb=int(cap.get("memory_mb", 0)), vcpus=int(cap.get("vcpus", 0)),
            ports=int(cap.get("ports", 50_000)), runtimes=tuple(rec.get("runtimes", ())),
            cordoned=name in cordoned,
            held=Demand(sum(d.memory_mb for d in held), sum(d.vcpus for d in held),
                        sum(d.ports for d in held)))
    return out
