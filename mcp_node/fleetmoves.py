"""Fleet mode's moves: the leader re-placing a lost node's work after the grace
period, and an operator's drain and uncordon. Each move is one etcd transaction
(record and capacity together) on what was read, retried on a conflict; a pinned
service, or one that fits nowhere, stays and says why it waits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from .cluster import ALLOC, CORDON, KV, LOST, MEMBERS, SERVICES, Etcd
from .config import ClusterConfig
from .errors import NotFoundError
from .fleetstate import Cache
from .fleetviews import Fleetview
from .placement import Demand, choose, parse_target
from .servicedef import check_name

log = logging.getLogger("mcp_node.fleet")

Txn = tuple[dict[str, int], dict[str, Any], tuple[str, ...]]   # compares, puts, deletes


class Fleet(Protocol):
    """What a move needs of the member making it (``fleetnode.Fleet`` is one)."""

    name: str
    cfg: ClusterConfig
    etcd: Etcd
    live: set[str]
    lost_due: dict[str, float]
    cache: Cache

    def read(self) -> Fleetview: ...
    def txn_loop(self, step: Callable[[Fleetview], Txn | None]) -> Fleetview: ...
    def placement_txn(self, v: Fleetview, name: str, prev: KV | None,
                      rec: dict[str, Any] | None) -> Txn: ...
    def move_off(self, node: str, services: list[str], why: str) -> dict[str, Any]: ...


def placement_txn(v: Fleetview, name: str, prev: KV | None, rec: dict[str, Any] | None) -> Txn:
    """The compares and writes that move ``name``'s record and its demand together:
    one key per placement under its node's ``/mcp/alloc/<node>/``, and the node's prefix
    unchanged since ``v`` was read (so two placements cannot both take its last free
    capacity); a node's value of the old layout is moved into keys in the same step."""
    old_node = prev.value["node"] if prev else ""
    new_node = rec["node"] if rec else ""
    expect = {SERVICES + name: prev.mod_revision if prev else 0}
    puts: dict[str, Any] = {}
    deletes: list[str] = []
    for node in {old_node, new_node} - {""}:
        mine = f"{ALLOC}{node}/"
        legacy = v.allocs.get(ALLOC + node)   # the old layout: every demand in one value
        if legacy is not None:
            expect[legacy.key] = legacy.mod_revision
            deletes.append(legacy.key)
            puts.update({mine + s: d for s, d in (legacy.value or {}).items()
                         if s != name and mine + s not in v.allocs})
        if node == new_node and rec is not None:
            expect[mine] = v.rev      # capacity held there is as read (no overcommit)
            puts[mine + name] = rec["demand"]
        else:
            deletes.append(mine + name)
    if rec is None:
        deletes.append(SERVICES + name)
    else:
        puts[SERVICES + name] = rec
    return expect, puts, tuple(deletes)


def leader_round(fleet: Fleet) -> None:
    log.debug("fleet: leader round on node=%s", fleet.name)
    v = fleet.read()
    live = fleet.live = set(v.records())
    now = time.time()
    placed: dict[str, list[str]] = {}
    for k, kv in v.services.items():
        placed.setdefault(kv.value.get("node", ""), []).append(k[len(SERVICES):])
    fleet.lost_due = {}
    for node in sorted(set(placed) | {k[len(LOST):] for k in v.lost} - {""}):
        if node in live:
            if LOST + node in v.lost:
                fleet.etcd.delete(LOST + node)
                log.info("fleet: node=%s is back", node)
            for name in placed.get(node, []):
                kv = v.services[SERVICES + name]
                if kv.value.get("waiting"):
                    fleet.etcd.txn(   # False: a newer write stands
                        {kv.key: kv.mod_revision},
                                      {kv.key: {**kv.value, "waiting": ""}})
            continue
        lost = v.lost.get(LOST + node)
        if lost is None:
            fleet.etcd.txn({LOST + node: 0}, {LOST + node: {"since": now}})
            log.warning("fleet: node=%s lost its lease; grace %g s", node, fleet.cfg.grace_s)
            fleet.lost_due[node] = now + fleet.cfg.grace_s
            continue
        due = float(lost.value.get("since", now)) + fleet.cfg.grace_s
        log.debug("fleet: node=%s lost, due in %.1f s", node, due - now)
        if now < due:
            fleet.lost_due[node] = due
            continue
        out = fleet.move_off(node, placed.get(node, []), "lost")
        log.debug("fleet: moved off node=%s: %s", node, out)


def move_off(fleet: Fleet, node: str, services: list[str], why: str) -> dict[str, Any]:
    """Re-place each unpinned service of ``node`` elsewhere; pinned ones (and those
    that fit nowhere) stay with the reason they wait."""
    moved, stayed = [], []
    for name in services:
        res: dict[str, Any] = {}

        def step(v: Fleetview, name: str = name, res: dict[str, Any] = res
                 ) -> tuple[dict[str, int], dict[str, Any], tuple[str, ...]] | None:
            prev = v.services.get(SERVICES + name)
            if prev is None or prev.value.get("node") != node:
                return None
            old = prev.value
            if parse_target(old.get("target", ""))[0] == "node":
                res["stayed"] = f"pinned to {node} ({why}): waits for it"
            else:
                choice = choose(name, Demand.from_dict(old["demand"]), old.get("target", ""),
                                v.placement_nodes(), exclude=frozenset({node}))
                if choice.node:
                    res["to"] = choice.node
                    rec = {**old, "node": choice.node, "waiting": "",
                           "generation": old["generation"] + 1, "time": time.time(),
                           "moved_from": {"node": node, **_member(fleet, node)}}
                    return fleet.placement_txn(v, name, prev, rec)
                res["stayed"] = choice.refusal(name)
            if old.get("waiting") == res["stayed"]:
                return None
            rec = {**old, "waiting": res["stayed"]}
            return {SERVICES + name: prev.mod_revision}, {SERVICES + name: rec}, ()

        fleet.txn_loop(step)
        if "to" in res:
            log.warning("fleet: service=%s moved from node=%s (%s) to node=%s", name, node,
                        why, res["to"])
            moved.append({"service": name, "from": node, "to": res["to"]})
        elif "stayed" in res:
            stayed.append({"service": name, "node": node, "reason": res["stayed"]})
    return {"moved": moved, "stayed": stayed}


def _member(fleet: Fleet, node: str) -> dict[str, Any]:
    kv = fleet.etcd.get(MEMBERS + node)
    return {k: kv.value.get(k, "") for k in ("address", "holder")} if kv else {}


def drain(fleet: Fleet, node: str) -> dict[str, Any]:
    node = check_name(node, "node")
    v = fleet.read()
    _, members = fleet.etcd.get_prefix(MEMBERS)
    known = set(v.records()) | {k[len(MEMBERS):] for k in members}
    if node not in known:
        raise NotFoundError(f"unknown node {node!r} (known: {', '.join(sorted(known))})")
    fleet.etcd.put(CORDON + node, {"since": time.time()})
    fleet.cache.reach(fleet.etcd.revision())   # as uncordon: new work avoids it at once
    names = [k[len(SERVICES):] for k, kv in v.services.items() if kv.value["node"] == node]
    return {"node": node, "cordoned": True, **fleet.move_off(node, names, "drained")}


def uncordon(fleet: Fleet, node: str) -> dict[str, Any]:
    node = check_name(node, "node")
    if fleet.etcd.get(CORDON + node) is None:
        raise NotFoundError(f"node {node!r} is not cordoned")
    fleet.etcd.delete(CORDON + node)
    # read your writes: a deploy through this agent right after places from the watched
    # cache, which must show the node uncordoned (CI placed one on the other node)
    fleet.cache.reach(fleet.etcd.revision())
    return {"node": node, "cordoned": False}
