"""Fleet mode (issue 12): this agent as one member of a fleet whose desired state is
in etcd. There is no master of our own: leases are the heartbeats, transactions make
placement safe, one watch carries every change, and etcd's compare-and-create on a
lease-bound key elects the one agent that re-places a dead node's work.

What each agent does:
- keeps ``/mcp/nodes/<node>`` (lease-bound) saying what it is and what it has;
- follows ``/mcp/services/*`` placed on it, converging through the local agent
  (SQLite stays its record of what it runs), and publishes what it runs under its
  lease at ``/mcp/observed/<node>/<service>`` (``fleetstate``);
- answers fleet reads from etcd and fleet writes into etcd, whichever node it is;
- while etcd has no quorum: runs and reconciles what it has, reads answer from the
  local record marked ``stale``, writes are refused (503 fleet_unavailable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import __version__, fleetedge, fleetmoves, fleetstate, fleetviews
from .cluster import (
    ALLOC,
    CORDON,
    KV,
    LEADER,
    LOST,
    MEMBERS,
    NODES,
    PREFIX,
    SERVICES,
    Etcd,
    Traffic,
)
from .errors import (
    FleetUnavailable,
    MCPError,
    NotFoundError,
    ResourceError,
    ValidationError,
    WorkloadError,
)
from .files import atomic_write, default_node_name, host_memory_mb
from .fleetlease import LeaseGuard, fence_facts
from .fleetmoves import Txn
from .fleetrollout import FleetRollouts
from .fleetsecrets import FleetSecrets
from .fleetviews import Fleetview
from .placement import Demand, choose, demand_of
from .plan import carried
from .servicedef import ServiceDef, from_dict
from .states import RUNNING, STOPPED

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("mcp_node.fleet")
T = TypeVar("T")

RECORD_EVERY_S = 30.0     # the node record's capacity and last reconcile time, at most so often
RESYNC_EVERY_S = 60.0     # a full read beside the watch, in case an event was missed
TXN_ATTEMPTS = 60


class Fleet:
    def __init__(self, agent: Agent) -> None:
        self.a = agent
        self.cfg = agent.config.cluster
        self.name = self.cfg.node or default_node_name()
        self.traffic = Traffic()
        self.etcd = Etcd(self.cfg, self.traffic)
        self.lease = 0
        self.leader = False
        self.reachable = False
        self.last_error = ""
        self.last_reconcile = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._dirty = {"services": True, "nodes": True, "leader": True, "publish": True}
        self._state_file = agent.state_dir / "fleet.json"
        state = self._load_state()
        self._managed: set[str] = set(state.get("managed", []))
        self.edge = (fleetedge.FleetEdge(agent, dict(state.get("edge", {})))
                     if "edge" in self.cfg.roles else None)
        self._edge_retry = (0.0, 0.0)   # (when, delay): a waiting edge route, with backoff
        self._results: dict[str, tuple[int, str]] = {}   # service -> (generation, error)
        self._restart_seen: dict[str, int] = {}
        self.cache = fleetstate.Cache()          # the desired state, from the watch
        self.publisher = fleetstate.Publisher(self)
        self._full_sync = False                  # the next sync reads etcd, not the cache
        self._record_at = 0.0
        self._resync_at = 0.0
        self.lost_due: dict[str, float] = {}
        self.live: set[str] = set()      # nodes with a record at the leader's last look
        self._threads: list[threading.Thread] = []
        self._sync_lock = threading.Lock()
        self._placed: set[str] = set()     # placed here at the last sync
        self._overlap: set[str] = set()    # of those, failover = "overlap" (never fenced)
        self.guard = LeaseGuard(self.cfg, agent.state_dir, self.traffic, self._fence_facts,
                                self._expired)
        self.guard.containers_conf = agent.config.podman.containers_conf
        agent.reconciler.gate = self.may_start
        self.secrets = FleetSecrets(self, agent.config.secrets)   # the fleet's, in etcd
        self.rollouts = FleetRollouts(self)   # a revert here is the fleet's too
        agent.secret_source = self.secrets

    # -- life ---------------------------------------------------------------

    def start(self) -> None:
        """Join the fleet and converge once (before the first local reconcile round, so
        a node that comes back removes what moved away before restarting it); then the
        fleet thread and the watch run. An etcd that does not answer is no reason not to
        start: the node runs what it has and joins when etcd is back."""
        self.guard.start()
        try:
            self._join()
            self.sync()
        except FleetUnavailable as exc:
            self._lost_etcd(exc)
        for target in (self._loop, self._watch_loop):
            t = threading.Thread(target=target, name=f"fleet-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, revoke: bool = True) -> None:
        """Stop following; ``revoke`` leaves the fleet at once (without it the lease just
        expires, as when the node dies)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)
        self.guard.release(self.cfg.grace_s, bool(revoke and self.lease and self.reachable))
        if revoke and self.lease and self.reachable:
            with contextlib.suppress(MCPError):   # leave at once: nothing to wait out
                self.etcd.revoke(self.lease)

    def after_round(self) -> None:
        """After each local monitor round: publish what changed (from the fleet thread)."""
        self.last_reconcile = time.time()
        self._dirty["publish"] = True
        self._wake.set()

    @property
    def holder(self) -> str:
        """This node in the TXT of its DNS names (as noderoutes registers them)."""
        return f"{self.name}/{self.a.owner}"

    def _join(self) -> None:
        """Join under a new lease, or again under the one the guard kept renewing
        (etcd was lost for a moment): a new lease would hold the node's work fenced
        until the next sync, for nothing."""
        if not (self.lease and self.guard.still_alive(self.lease, self.etcd)):
            sent = time.monotonic()
            self.lease = self.etcd.grant(self.cfg.lease_ttl_s)
            self.guard.granted(self.lease, sent)
        self._put_record()
        member = {"address": self.a.config.node.advertise, "holder": self.holder,
                  "roles": list(self.cfg.roles), "pool": self.cfg.pool}
        kv = self.etcd.get(MEMBERS + self.name)
        if kv is None or kv.value != member:
            self.etcd.put(MEMBERS + self.name, member)
        self.reachable, self.last_error = True, ""
        self._campaign()
        log.info("fleet: joined as node=%s lease=%x leader=%s", self.name, self.lease,
                 self.leader)

    def _lost_etcd(self, exc: MCPError) -> None:
        if self.reachable or not self.last_error:
            log.warning("fleet: etcd lost (%s); running on the local record", exc)
        self.reachable, self.last_error, self.leader = False, str(exc), False

    def _loop(self) -> None:
        """The lease is renewed on the guard's own thread; this one joins again when
        it expired or etcd was lost, and follows what changed."""
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.guard.error and self.reachable:
                    raise FleetUnavailable(self.guard.error)
                if not self.reachable or not self.lease or self.guard.lease != self.lease:
                    self._join()
                    self._dirty = {k: True for k in self._dirty}
                self._round()
            except FleetUnavailable as exc:
                self._lost_etcd(exc)
            except Exception:
                log.exception("fleet round failed")

    def _round(self) -> None:
        now = time.time()
        if now >= self._resync_at:
            self._resync_at = now + RESYNC_EVERY_S
            self._dirty = {k: True for k in self._dirty}
            self._full_sync = True
        if self._dirty["services"] or 0 < self._edge_retry[0] <= time.monotonic():
            self._dirty["services"] = False
            self.sync()
        if self._dirty["leader"]:
            self._dirty["leader"] = False
            if not self.leader:
                self._campaign()
        if self.leader and (self._dirty["nodes"] or any(
                due <= now for due in self.lost_due.values())):
            self._dirty["nodes"] = False
            fleetmoves.leader_round(self)
        self._dirty["nodes"] = False
        self.rollouts.round()
        if self._dirty["publish"]:
            self._dirty["publish"] = False
            self.publish()
        if now - self._record_at >= RECORD_EVERY_S:
            self._put_record()

    def _watch_loop(self) -> None:
        watcher = Etcd(self.cfg, self.traffic)
        while not self._stop.is_set():
            try:
                rev = self.cache.load(watcher)
                self.cache.started()
                self._dirty = {k: True for k in self._dirty}   # whatever passed meanwhile
                self._wake.set()
                watcher.watch_kvs(PREFIX, rev + 1, self._stop, self._on_kv)
            except MCPError as exc:
                log.debug("fleet watch: %s", exc)
            except Exception:
                log.exception("fleet watch failed")
            finally:
                self.cache.stopped()
            self._stop.wait(1.0)

    def _on_kv(self, kind: str, kv: KV) -> None:
        self.cache.apply(kind, kv)        # before the round it wakes reads the cache
        self._on_event(kind, kv.key)

    def _on_event(self, kind: str, key: str) -> None:
        if key.startswith(SERVICES):
            self._dirty["services"] = True
        elif key == LEADER:
            self._dirty["leader"] = True
        elif key.startswith(NODES) and kind == "PUT" and key[len(NODES):] in self.live:
            return     # a live node refreshing its record: nothing for the leader to do
        elif key.startswith((NODES, LOST, CORDON)):
            self._dirty["nodes"] = True
        else:
            return
        self._wake.set()

    # -- membership -----------------------------------------------------------

    def _put_record(self) -> None:
        self._record_at = time.time()
        self.etcd.put(NODES + self.name, self.record(), lease=self.lease)

    def record(self) -> dict[str, Any]:
        """What this node says of itself; capacity offered to placements is configured
        or the host's (memory less the VM reserve, CPUs)."""
        q = self.a.config.qemu
        mem = self.cfg.memory_mb or max(host_memory_mb() - q.reserve_memory_mb, 0)
        cpus = self.cfg.vcpus or max((os.cpu_count() or 1) - q.reserve_vcpus, 0)
        runtimes = []
        for name in self.a.runtime_names:
            try:
                self.a.available_runtime(name)
                runtimes.append(name)
            except MCPError:
                pass
        used_ports = sum(len(c.host_ports) for s in self.a.registry.list_services()
                         for c in s.components)
        return {
            "node": self.name, "roles": list(self.cfg.roles), "pool": self.cfg.pool,
            "address": self.a.config.node.advertise, "holder": self.holder,
            "agent": self.a.config.server.listen, "runtimes": runtimes,
            "capacity": {"memory_mb": mem, "vcpus": cpus, "ports": 50_000},
            "used": {"ports": used_ports}, "version": __version__,
            "last_reconcile": self.last_reconcile, "time": time.time(),
        }

    def _campaign(self) -> None:
        if self.etcd.txn({LEADER: 0}, {LEADER: self.name}, lease={LEADER: self.lease}):
            self.leader = True
            self._dirty["nodes"] = True      # look at once: it may have won because one died
            log.info("fleet: node=%s is the leader (re-places the work of lost nodes)",
                     self.name)
        else:
            kv = self.etcd.get(LEADER)
            self.leader = bool(kv and kv.value == self.name and kv.lease == self.lease)

    # -- reads of etcd ----------------------------------------------------------

    def read(self) -> Fleetview:
        v = Fleetview()
        _, v.nodes = self.etcd.get_prefix(NODES)
        _, v.services = self.etcd.get_prefix(SERVICES)
        v.rev, v.allocs = self.etcd.get_prefix(ALLOC)
        _, cordons = self.etcd.get_prefix(CORDON)
        v.cordons = {k[len(CORDON):] for k in cordons}
        _, v.lost = self.etcd.get_prefix(LOST)
        return v

    def observed(self, node: str = "", service: str = "") -> dict[str, dict[str, Any]]:
        return fleetstate.observed(self.etcd, node, service)

    def _services(self) -> dict[str, KV]:
        """Every placement: from the watched cache, or from etcd when the watch is not
        running or a resync asks for a full read."""
        if self.cache.live and not self._full_sync:
            return self.cache.under(SERVICES)
        self._full_sync = False
        return self.etcd.get_prefix(SERVICES)[1]

    # -- following placements -------------------------------------------------

    def sync(self) -> None:
        """Make this node run exactly the services placed on it (and leave alone what
        an operator deployed here before fleet mode). Errors are published per
        service and generation, where the deploying agent waits for them."""
        with self._sync_lock:
            lease = self.guard.lease
            kvs = self._services()
            mine = {k[len(SERVICES):]: kv.value for k, kv in kvs.items()
                    if kv.value.get("node") == self.name}
            self._placed = set(mine)
            self._overlap = {n for n, rec in mine.items()
                             if (rec.get("definition") or {}).get("failover") == "overlap"}
            for name, rec in sorted(mine.items()):
                self._managed.add(name)    # before it runs: the fence counts it as fleet's
                gen = int(rec.get("generation", 0))
                if self._results.get(name, (0, ""))[0] == gen and self._results[name][1] \
                        or self.rollouts.reverted(name, gen, rec):
                    continue   # failed here (the deployer reverts it), or reverted here
                try:
                    self._apply(name, rec)
                    self._results[name] = (gen, "")
                except MCPError as exc:
                    log.warning("fleet: service=%s generation=%d failed here: %s", name, gen,
                                exc)
                    self._results[name] = (gen, str(exc))
            for name in sorted(self._managed - set(mine)):
                if self.a.registry.has_service(name):
                    log.info("fleet: service=%s is no longer placed here; removing it", name)
                    try:
                        self.a.undeploy_local(name)
                    except MCPError as exc:
                        log.warning("fleet: removing service=%s failed: %s", name, exc)
                        continue
                self._managed.discard(name)
                self._results.pop(name, None)
            if self.edge is not None:
                nodes = (self.cache.under(NODES) if self.cache.live
                         else self.etcd.get_prefix(NODES)[1])
                pending = self.edge.sync(
                    {k[len(SERVICES):]: kv.value for k, kv in kvs.items()},
                    {k[len(NODES):]: kv.value for k, kv in nodes.items()})
                delay = min(max(self._edge_retry[1] * 2, 0.5), 30.0) if pending else 0.0
                self._edge_retry = (time.monotonic() + delay, delay) if pending else (0.0, 0.0)
            self._save_state()
            if not self._managed - set(mine):   # all that moved away is gone
                self.guard.synced_under(lease)
        self._dirty["publish"] = True
        self.publish()

    # -- fencing (fleetlease, fence) ----------------------------------------------------

    def may_start(self, service: str) -> bool:
        """The reconcile's gate: a fleet-placed service starts only while this node's
        lease is known alive and it is still placed here; "overlap" ones always."""
        if service not in self._managed or service in self._overlap:
            return True
        return service in self._placed and self.guard.may_run()

    def _fence_facts(self) -> tuple[str, str, list[str]]:
        return fence_facts(self.a, self._managed, self._overlap)

    def _expired(self) -> None:
        self._dirty = {k: True for k in self._dirty}
        self._wake.set()

    def _apply(self, name: str, rec: dict[str, Any]) -> None:
        defn = from_dict(rec["definition"]).local_part()
        reg = self.a.registry
        old = reg.get_service(name).definition() if reg.has_service(name) else None
        if old is None or old != carried(old, defn):   # a digest the node resolved: no change
            self.secrets.check_can_run(defn)         # else nothing changes, saying why
            moved = rec.get("moved_from") or {}
            if moved.get("node") and moved["node"] != self.name:
                fleetedge.take_over_names(self.a, defn, moved)
            self.rollouts.deploy(name, int(rec.get("generation", 0)), defn)
        current = reg.get_service(name)
        want = rec.get("state", RUNNING)
        if want == STOPPED and any(c.desired_state == RUNNING for c in current.components):
            self.a.apply_state(name, STOPPED)
        elif want == RUNNING and any(c.desired_state != RUNNING for c in current.components):
            self.a.apply_state(name, RUNNING)
        restarts = int(rec.get("restarts", 0))
        seen = self._restart_seen.setdefault(name, restarts)
        if restarts > seen:
            self._restart_seen[name] = restarts
            self.a.apply_state(name, RUNNING, restart=True)

    def _load_state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self._state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        state = {"managed": sorted(self._managed),
                 "edge": self.edge.managed if self.edge is not None else {}}
        atomic_write(self._state_file, json.dumps(state, sort_keys=True).encode(), 0o600)

    def publish(self) -> None:
        """What changed in this node's services, each under its key (``fleetstate``)."""
        self.publisher.publish()

    # -- writes ---------------------------------------------------------------

    def txn_loop(self, step: Callable[[Fleetview], tuple[dict[str, int], dict[str, Any],
                                                         tuple[str, ...]] | None],
                 cached: bool = False) -> Fleetview:
        """Read, decide, commit with compares on what was read; again on a conflict.
        A compare on a key ending in ``/`` is on its prefix: no key under it written
        after that revision. ``cached`` reads the watched cache (a deploy's way: no read
        of the whole fleet per attempt); after a conflict, once it caught up with etcd,
        or etcd itself when it does not in time."""
        for attempt in range(TXN_ATTEMPTS):
            view = self.cache.view() if cached and self.cache.live else self.read()
            plan = step(view)
            if plan is None:
                return view
            expect, puts, deletes = plan
            unchanged = {k: r for k, r in expect.items() if k.endswith("/")}
            keys = {k: r for k, r in expect.items() if not k.endswith("/")}
            if self.etcd.txn(keys, puts, deletes, unchanged=unchanged):
                return view
            if cached and not self.cache.reach(self.etcd.revision()):
                cached = False
            else:
                time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # noqa: S311
        raise MCPError(f"fleet: {TXN_ATTEMPTS} conflicting writes in a row; try again")

    def deploy(self, defn: ServiceDef) -> dict[str, Any]:
        """Place ``defn`` (the choice and its capacity in one transaction), then wait for
        the node's answer. A node's failure puts the previous record back."""
        name = defn.name
        want = demand_of(defn)
        out: dict[str, Any] = {}

        def step(v: Fleetview) -> Txn:
            prev = v.services.get(SERVICES + name)
            old = prev.value if prev else None
            current = old["node"] if old else ""
            holding = Demand.from_dict(old["demand"]) if old else None
            choice = choose(name, want, defn.node, v.placement_nodes(), current=current,
                            holding=holding)
            if not choice.node:
                raise ResourceError(choice.refusal(name))
            d, held = self.secrets.pin(defn)   # versions from etcd, held to what was read
            rec = {"definition": d.to_dict(), "node": choice.node, "target": defn.node,
                   "state": RUNNING, "demand": want.to_dict(), "placement": choice.mode,
                   "generation": int(old["generation"]) + 1 if old else 1,
                   "restarts": int(old.get("restarts", 0)) if old else 0,
                   "waiting": "", "time": time.time()}
            out.update(rec=rec, old=old, prev_rev=prev.mod_revision if prev else 0)
            expect, puts, deletes = self.placement_txn(v, name, prev, rec)
            return {**expect, **held}, puts, deletes

        self.txn_loop(step, cached=True)
        rec = out["rec"]
        try:
            st = self._await(name, rec["node"], rec["generation"])
        except WorkloadError:
            self._revert(name, rec, out["old"])
            raise
        log.info("fleet: deployed service=%s node=%s placement=%s generation=%d", name,
                 rec["node"], rec["placement"], rec["generation"])
        return {**st, "node": rec["node"], "placement": rec["placement"],
                "generation": rec["generation"]}

    def placement_txn(self, v: Fleetview, name: str, prev: KV | None,
                      rec: dict[str, Any] | None) -> Txn:
        return fleetmoves.placement_txn(v, name, prev, rec)

    def _revert(self, name: str, rec: dict[str, Any], old: dict[str, Any] | None) -> None:
        def step(v: Fleetview) -> Txn | None:
            cur = v.services.get(SERVICES + name)
            if cur is None or cur.value.get("generation") != rec["generation"]:
                return None          # someone wrote after us: theirs stands
            back = None if old is None else {**old, "generation": rec["generation"] + 1}
            return self.placement_txn(v, name, cur, back)

        try:
            self.txn_loop(step, cached=True)
        except MCPError:
            log.exception("fleet: could not revert service=%s", name)

    def _await(self, name: str, node: str, gen: int) -> dict[str, Any]:
        """The node's status of ``name`` once it applied generation ``gen``;
        WorkloadError with its message when it failed there."""
        if node == self.name:
            self._dirty["services"] = True
            self._wake.set()
        return fleetstate.await_answer(self, name, node, gen)

    def undeploy(self, name: str) -> None:
        def step(v: Fleetview) -> Txn:
            prev = v.services.get(SERVICES + name)
            if prev is None:
                raise NotFoundError(f"unknown service {name!r} in the fleet")
            return self.placement_txn(v, name, prev, None)

        self.txn_loop(step, cached=True)
        log.info("fleet: undeployed service=%s", name)

    def set_state(self, name: str, desired: str, component: str | None,
                  restart: bool = False) -> dict[str, Any]:
        if component:
            raise ValidationError("fleet mode stops, starts and restarts whole services",
                                  "component")
        out: dict[str, Any] = {}

        def step(v: Fleetview) -> Txn:
            prev = v.services.get(SERVICES + name)
            if prev is None:
                raise NotFoundError(f"unknown service {name!r} in the fleet")
            rec = {**prev.value, "state": desired, "generation": prev.value["generation"] + 1,
                   "restarts": int(prev.value.get("restarts", 0)) + (1 if restart else 0)}
            out["rec"] = rec
            return {SERVICES + name: prev.mod_revision}, {SERVICES + name: rec}, ()

        self.txn_loop(step, cached=True)
        rec = out["rec"]
        if not rec["node"]:
            return self.status(name)
        return {**self._await(name, rec["node"], rec["generation"]), "node": rec["node"]}

    # -- failover, drain (fleetmoves) and fleet reads (fleetviews) ---------------

    def move_off(self, node: str, services: list[str], why: str) -> dict[str, Any]:
        return fleetmoves.move_off(self, node, services, why)

    def drain(self, node: str) -> dict[str, Any]:
        return fleetmoves.drain(self, node)

    def uncordon(self, node: str) -> dict[str, Any]:
        return fleetmoves.uncordon(self, node)

    def read_or_stale(self, fleet_read: Callable[[], T], local_read: Callable[[], T]) -> T:
        """A fleet read from etcd; while etcd is lost, this node's own, flagged stale."""
        try:
            if self.reachable or not self.last_error:
                return fleet_read()
        except FleetUnavailable:
            pass
        return cast(T, fleetviews.stale(local_read()))

    def nodes(self) -> list[dict[str, Any]]:
        return fleetviews.nodes(self)

    def status(self, name: str) -> dict[str, Any]:
        return fleetviews.status(self, name)

    def health(self) -> dict[str, Any]:
        return {"node": self.name, "etcd": "reachable" if self.reachable else "unreachable",
                "leader": self.leader, "error": self.last_error,
                "fenced": not self.guard.may_run(), "etcd_leaderless": self.guard.leaderless}
