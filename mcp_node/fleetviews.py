"""Fleet reads: ``mcp nodes``, ``ps`` and ``status`` answered from etcd by any agent
(desired state and placement from ``/mcp/services``, what each node runs from its
lease-bound ``/mcp/observed/<node>/<service>`` keys, ``fleetstate``), and the ``stale``
flag on local reads while etcd is lost."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .cluster import ALLOC, KV, LEADER, LOST, NODES, SERVICES, Etcd
from .errors import NotFoundError
from .placement import nodes_from
from .servicedef import from_dict
from .states import RUNNING


@dataclass
class Fleetview:
    """One read of the fleet's keys (except what nodes observe)."""

    nodes: dict[str, KV] = field(default_factory=dict)
    services: dict[str, KV] = field(default_factory=dict)
    allocs: dict[str, KV] = field(default_factory=dict)
    cordons: set[str] = field(default_factory=set)
    lost: dict[str, KV] = field(default_factory=dict)
    rev: int = 0     # no capacity key was written after it in what was read

    def records(self) -> dict[str, dict[str, Any]]:
        return {k[len(NODES):]: kv.value for k, kv in self.nodes.items()}

    def alloc(self, node: str) -> dict[str, Any]:
        """service -> the demand it holds on ``node``: ``/mcp/alloc/<node>/<service>``,
        and the layout before it (one value per node) where that has one."""
        return self._allocs().get(node, {})

    def _allocs(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for k, kv in sorted(self.allocs.items()):   # a node's old value before its keys
            node, _, service = k[len(ALLOC):].partition("/")
            if service:
                out.setdefault(node, {})[service] = kv.value
            else:
                out.setdefault(node, {}).update(kv.value or {})
        return out

    def placement_nodes(self) -> dict[str, Any]:
        return nodes_from(self.records(), self._allocs(), self.cordons)


class Fleet(Protocol):
    """What a fleet read needs of the member asking (``fleetnode.Fleet`` is one)."""

    etcd: Etcd

    def read(self) -> Fleetview: ...
    def observed(self, node: str = "", service: str = "") -> dict[str, dict[str, Any]]: ...


def nodes(fleet: Fleet) -> list[dict[str, Any]]:
    v = fleet.read()
    leader = fleet.etcd.get(LEADER)
    infos = v.placement_nodes()
    names = set(v.records()) | {kv.value.get("node", "") for kv in v.services.values()}
    names |= {k[len(LOST):] for k in v.lost} | v.cordons
    rows = []
    for n in sorted(names - {""}):
        rec = v.records().get(n)
        info = infos.get(n)
        count = sum(1 for kv in v.services.values() if kv.value.get("node") == n)
        lost = v.lost.get(LOST + n)
        rows.append({
            "node": n, "state": "up" if rec else "down",
            "roles": rec.get("roles", []) if rec else [],
            "pool": rec.get("pool", "") if rec else "",
            "address": rec.get("address", "") if rec else "",
            "cordoned": n in v.cordons, "leader": bool(leader and leader.value == n),
            "services": count, "runtimes": rec.get("runtimes", []) if rec else [],
            "memory_mb": {"total": info.memory_mb, "used": info.held.memory_mb,
                          "free": info.free_memory_mb} if info else None,
            "vcpus": {"total": info.vcpus, "used": info.held.vcpus,
                      "free": info.free_vcpus} if info else None,
            "ports": {"total": info.ports, "used": info.held.ports,
                      "free": info.free_ports} if info else None,
            "version": rec.get("version", "") if rec else "",
            "last_reconcile": rec.get("last_reconcile", 0) if rec else 0,
            "lost_since": lost.value.get("since") if lost else None,
        })
    return rows


def ps(fleet: Fleet) -> list[dict[str, Any]]:
    v = fleet.read()
    obs = fleet.observed()
    rows: list[dict[str, Any]] = []
    for k, kv in sorted(v.services.items()):
        name = k[len(SERVICES):]
        st = _observed_status(obs, name, kv.value)
        rows.extend({**{key: c.get(key) for key in (
            "service", "component", "node", "runtime", "state", "desired_state", "version",
            "uptime_s", "routes")}, "fleet": st["fleet"]} for c in st["components"])
    return rows


def status(fleet: Fleet, name: str) -> dict[str, Any]:
    kv = fleet.etcd.get(SERVICES + name)
    if kv is None:
        raise NotFoundError(f"unknown service {name!r} in the fleet")
    return _observed_status(fleet.observed(kv.value.get("node", ""), name), name, kv.value)


def _observed_status(obs: dict[str, dict[str, Any]], name: str,
                     rec: dict[str, Any]) -> dict[str, Any]:
    """What the node it is placed on publishes, or (down, waiting, not yet there) the
    definition's components as missing or waiting."""
    node = rec.get("node", "")
    got = (obs.get(node) or {}).get("services", {}).get(name) if node else None
    placed = {"node": node, "placement": rec.get("placement", ""),
             "waiting": rec.get("waiting", ""), "generation": rec.get("generation", 0),
             "desired_state": rec.get("state", RUNNING),
             "reverted": rec.get("reverted")}   # a rollout the node reverted (fleetrollout)
    if got and got.get("error") and got.get("generation") == rec.get("generation"):
        placed["error"] = f"node {node}: {got['error']}"   # it runs nothing new, and why
    if got and got.get("status"):
        st = with_uptime(got["status"])
        return {**st, "fleet": placed}
    defn = from_dict(rec["definition"])
    state = "waiting" if rec.get("waiting") else "missing"
    comps = [{"service": name, "component": c.name, "node": node, "runtime": c.runtime,
              "state": state, "desired_state": rec.get("state", RUNNING),
              "version": c.version, "uptime_s": 0, "ready": False, "drift": True,
              "flapping": False, "restarts": 0, "exit_code": None, "image": c.image,
              "routes": [{"name": r.name, "port": r.port, "mode": r.mode,
                          "hostname": r.hostname, "host_port": None} for r in c.routes]}
             for c in defn.components]
    return {"service": name, "active": defn.active, "node": node,
            "definition": rec["definition"], "drift": True, "flapping": False,
            "components": comps, "events": [], "fleet": placed}


def with_uptime(st: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    st = json.loads(json.dumps(st))
    for c in st.get("components", []):
        since = c.pop("since", None)
        running = c.get("state") in (RUNNING, "starting", "unhealthy")
        c["uptime_s"] = max(int(now - since), 0) if since and running else 0
    return dict(st)


def stale(rows: Any) -> Any:
    """Local reads while etcd is lost: what this node runs, flagged ``stale``."""
    if isinstance(rows, list):
        return [{**r, "stale": True} for r in rows]
    return {**rows, "stale": True}


def events(fleet: Fleet, service: str | None, tail: int) -> list[dict[str, Any]]:
    """The fleet's last ``tail`` state changes (of one service, or all), oldest first,
    from what each node publishes (its last 20 per service), each naming its node."""
    if service is not None and fleet.etcd.get(SERVICES + service) is None:
        raise NotFoundError(f"unknown service {service!r} in the fleet")
    rows = []
    for node, body in fleet.observed().items():
        for name, got in (body or {}).get("services", {}).items():
            if service is not None and name != service:
                continue
            for e in (got.get("status") or {}).get("events", []):
                rows.append({**e, "service": name, "node": node})
    rows.sort(key=lambda r: (str(r.get("time", "")), r["service"], r["node"]))
    return rows[-tail:] if tail else []


def without_times(body: dict[str, Any]) -> dict[str, Any]:
    """A published body without what changes every round (times), to tell a real change."""
    out = json.loads(json.dumps(body, default=str))
    for svc in out["services"].values():
        for c in (svc.get("status") or {}).get("components", []):
            c.pop("since", None)
            c.pop("next_attempt", None)
            if isinstance(c.get("check"), dict):
                c["check"].pop("time", None)   # each check's tick: the same result again
    return dict(out)
