"""The lease of a fleet node and its fence (issue 18: never two copies).

``LeaseGuard`` keeps the node's lease alive on a thread of its own (a slow sync or
deploy on the fleet thread must not delay a renewal), knows until when the lease is
surely alive, tells the fence process (``fence``) so, and answers the reconcile's
question "may this fleet-placed service be started now?".

The rules:
- a renewal sent at T proves the lease alive until ``fence.fence_at(T, ttl)`` (T plus
  the TTL, less the clock-rate and stopping margins); the fence stops the node's
  fleet-placed workloads at that instant unless a newer renewal moved it on;
- after a (re)join, nothing fleet-placed starts until the node has read its placements
  under the new lease (``synced``): what moved away while it was gone is removed first;
- a keepalive answering "expired" fences at once; after etcd was lost for a moment
  the node joins again under the same lease if a keepalive of it succeeds;
- etcd without a leader: leases cannot expire (a new leader extends every lease by its
  TTL when elected), so when some member answers and says it has no leader, and none
  says it has one, while the lease was surely alive (before its earliest expiry), the
  deadline moves on as if renewed: nothing is fenced, and nothing moves either (a
  renewal late by more than a quarter TTL makes the guard ask every 0.1 s). A node
  that reaches only a member which is itself cut off from a
  majority that still has a leader cannot tell that from a leaderless etcd; that
  double partition is outside what this guards.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from . import fence
from .cluster import Etcd, Traffic
from .config import ClusterConfig
from .errors import FleetUnavailable, MCPError

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("mcp_node.fleet")

GUARD_POLL_S = 0.1
RETRY_S = 0.05            # a failed keepalive is sent again so soon
FENCE_CHECK_S = 1.0


class LeaseGuard:
    def __init__(self, cfg: ClusterConfig, state_dir: Path, traffic: Traffic,
                 facts: Callable[[], tuple[str, str, list[str]]],
                 on_expired: Callable[[], None]) -> None:
        """``facts()``: (owner id, podman URL, exempt services) for the fence's beat."""
        self.cfg, self.state_dir, self.facts, self.on_expired = cfg, state_dir, facts, on_expired
        self.containers_conf = ""
        self.ttl = float(cfg.lease_ttl_s)
        self.tick = max(0.25, self.ttl / 4)
        quick = dataclasses.replace(cfg, timeout_s=min(cfg.timeout_s, max(0.2, self.ttl / 4)))
        self.etcd = Etcd(quick, traffic)
        self.lease = 0
        self.synced = False
        old = fence.read_beat(state_dir)
        self.deadline = old.deadline if old else 0.0   # what the fence was told last
        self.alive_until = self.deadline   # the lease of the agent before us, if any
        self.last_ok = time.monotonic()
        self.leaderless = False
        self.error = ""          # the last keepalive's failure, "" once one succeeds
        self.fenced_count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- what the fleet tells it -----------------------------------------------------

    def start(self) -> None:
        self._ensure_fence()
        for target in (self._keepalive_loop, self._guard_loop):
            t = threading.Thread(target=target, name=f"fleet-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def granted(self, lease: int, sent: float) -> None:
        with self._lock:
            self.lease, self.synced, self.error = lease, False, ""
            self.alive_until = fence.fence_at(sent, self.ttl)
            self.last_ok = sent

    def synced_under(self, lease: int) -> None:
        """The node read its placements under ``lease`` and removed what moved away."""
        with self._lock:
            if lease != self.lease or self.synced:
                return
            self.synced = True
            if self.alive_until > time.monotonic():
                self.deadline = self.alive_until
            self._write()

    def still_alive(self, lease: int, etcd: Etcd) -> bool:
        """``lease`` is ours and still alive: a keepalive now (on ``etcd``, the fleet
        thread's, which joins again) succeeds. FleetUnavailable when etcd does not
        answer."""
        if lease != self.lease or time.monotonic() >= self.alive_until:
            return False
        sent = time.monotonic()
        ttl = etcd.keepalive(lease)
        if ttl > 0:
            self.renewed(lease, sent, ttl)
        else:
            self._expired(lease)
        return ttl > 0

    def may_run(self) -> bool:
        """May a fleet-placed workload be started (or kept) now?"""
        return self.synced and time.monotonic() < self.deadline

    def release(self, grace: float, revoking: bool) -> None:
        """The agent stops. Revoking: the node's work may move ``grace`` from now, so
        the fence acts before that; otherwise the last renewal's deadline stands (a
        restart in time keeps the workloads)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if revoking:
            with self._lock:
                self.deadline = min(self.deadline, time.monotonic()
                                    + grace * (1 - fence.RATE_MARGIN) - fence.margin_s(self.ttl))
                self._write()

    # -- renewals --------------------------------------------------------------------

    def _keepalive_loop(self) -> None:
        """Every tick; after a failure again soon (0.05 s, doubling up to the tick): an
        etcd leader election takes about a second, and the fence deadline is only TTL
        less margins away."""
        wait = retry = self.tick
        while not self._stop.wait(wait):
            retry = min(self.tick, RETRY_S if wait == self.tick else retry * 2)
            wait = self.tick
            lease = self.lease
            if not lease:
                continue
            sent = time.monotonic()
            try:
                ttl = self.etcd.keepalive_raced(lease)
            except FleetUnavailable as exc:
                self.error, wait = str(exc), retry
                self.on_expired()     # the fleet thread marks etcd lost
                continue
            except MCPError as exc:
                log.warning("fleet: keepalive: %s", exc)
                wait = retry
                continue
            if ttl <= 0:
                self._expired(lease)
                self.on_expired()
            else:
                self.renewed(lease, sent, ttl)

    def _expired(self, lease: int) -> None:
        """etcd says ``lease`` expired: its work may move after the grace; fence now."""
        with self._lock:
            if lease != self.lease:
                return
            log.warning("fleet: lease %x expired; fencing and joining again", lease)
            self.lease, self.synced = 0, False
            self.deadline = min(self.deadline, time.monotonic())
            self._write()

    def renewed(self, lease: int, sent: float, ttl: int) -> None:
        """A keepalive of ``lease`` sent at ``sent`` answered ``ttl`` (> 0)."""
        with self._lock:
            if lease != self.lease:
                return
            self.last_ok, self.leaderless, self.error = sent, False, ""
            self.alive_until = fence.fence_at(sent, min(ttl, self.ttl))
            if self.synced:
                self.deadline = self.alive_until
                self._write()

    def _guard_loop(self) -> None:
        """Watches the deadline, the fence process, and whether etcd has a leader while
        renewals fail."""
        checked = 0.0
        probed = 0.0
        was_fenced = False
        while not self._stop.wait(GUARD_POLL_S):
            now = time.monotonic()
            if now - checked >= FENCE_CHECK_S:
                checked = now
                self._ensure_fence()
            if now - self.last_ok > 1.2 * self.tick and now - probed >= GUARD_POLL_S:
                probed = now        # a renewal is late: is etcd without a leader?
                if self._leaderless():
                    self._hold(now, time.monotonic())
            fenced = now >= self.deadline
            if fenced and not was_fenced and self.deadline:
                self.fenced_count += 1
                log.warning("fleet: lease not known alive; fleet-placed workloads are fenced")
            was_fenced = fenced

    def _leaderless(self) -> bool:
        """Some member answers, says it has no leader, and none says it has one."""
        clients = self.etcd.status_all()
        with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:
            answers = list(pool.map(lambda f: f(), clients))
        said = [a for a in answers if a is not None]
        out = bool(said) and not any(said)
        if out != self.leaderless:
            log.warning("fleet: etcd %s", "has no leader: nothing is fenced, nothing moves"
                        if out else "has a leader again")
        self.leaderless = out
        return out

    def _hold(self, at: float, answered: float) -> None:
        """A member said it has no leader, between ``at`` and ``answered``. If the lease
        was surely alive then (``answered`` before its earliest expiry), it cannot
        expire before ``at`` + TTL: no leader expires leases, and the next one extends
        them all by their TTL. Otherwise it may have expired just before (and its work
        moved): nothing is extended."""
        with self._lock:
            if answered >= self.alive_until + fence.margin_s(self.ttl):
                return
            self.alive_until = max(self.alive_until, fence.fence_at(at, self.ttl))
            if self.synced or time.monotonic() < self.deadline:
                self.deadline = max(self.deadline, self.alive_until)
                self._write()

    # -- the fence process -----------------------------------------------------------

    def _write(self) -> None:
        owner, podman, exempt = self.facts()
        try:
            fence.write_beat(self.state_dir, fence.Beat(
                deadline=self.deadline, owner=owner, ttl=self.ttl, podman=podman,
                containers_conf=self.containers_conf, exempt=exempt))
        except OSError as exc:
            log.error("fleet: cannot write the fence's heartbeat: %s", exc)

    def _ensure_fence(self) -> None:
        try:
            if not fence.fence_running(self.state_dir):
                fence.spawn(self.state_dir)
        except OSError as exc:
            log.error("fleet: cannot start the fence: %s", exc)


def fence_facts(agent: Agent, managed: set[str], overlap: set[str]
                ) -> tuple[str, str, list[str]]:
    """For the fence: the owner id, the podman URL, and the services it must leave
    alone (deployed before fleet mode, or "overlap")."""
    urls = [u for rt in agent.loaded_runtimes().values()
            if isinstance(u := getattr(rt, "url", ""), str) and u.startswith("unix://")]
    url = urls[0] if urls else ""      # the podman API the container runtime uses
    if not url and agent.config.podman.socket:
        from .podman_service import socket_url
        url = socket_url(agent.config.podman.socket)
    names = {r.name for r in agent.registry.list_services()}
    return agent.owner, url, sorted((names - managed) | overlap)
