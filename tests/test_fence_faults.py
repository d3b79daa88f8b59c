"""Never two copies (issue 18), with real processes: three etcd members, three
``mcp-agent`` daemons (each in a network namespace, with a podman of its own), one
unpinned service. Faults at seeded random points of the lease's keepalive cycle:

- the holder's agent SIGKILLed (its lease is not revoked, its containers keep
  running until its fence stops them); restarted later;
- the holder's agent SIGSTOPped; SIGCONT once the service moved (it must not start
  its copy again);
- the holder's node cut off from etcd (its link taken down); up again once moved;
- the etcd leader SIGKILLed (nothing should move; at most one copy), restarted.

A poller reads every node's podman every 100 ms; any instant with two running copies
fails the test. Also: while etcd has no quorum nothing is fenced and nothing moves;
``failover = "overlap"`` is not fenced. Rounds per kind: MCP_FAULT_ROUNDS (default
20, CI); seeds are printed (MCP_FAULT_SEED replays one). The long soak and the
timings are bench/failover.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need, until
from etcd_env import NodePodman
from fault_env import TTL, AgentProc, NsEtcd, Poller, Topology, running_copies

from mcp_node.errors import RemoteError

ROUNDS = int(os.environ.get("MCP_FAULT_ROUNDS", "20"))
SEED = int(os.environ.get("MCP_FAULT_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 30)


class Fleet:
    def __init__(self, base: Path, image: str, ttl: int = TTL) -> None:
        from podman_env import containers_conf

        self.base, self.image, self.ttl = base, image, ttl
        self.topo = Topology()
        self.etcd: NsEtcd | None = None
        self.pods: list[NodePodman] = []
        self.agents: list[AgentProc] = []
        self.conf = containers_conf()

    def start(self) -> Fleet:
        self.topo.start()
        (self.base / "etcd").mkdir()
        self.etcd = NsEtcd(self.base / "etcd", self.topo)
        for i in range(3):
            self.etcd.start(i)
        for i in range(3):
            pod = NodePodman(self.base / f"podman-n{i + 1}", 5 + i, self.conf)
            self.pods.append(pod)
            pod.start([self.image])
        self.etcd.wait_healthy()
        for i in range(3):
            a = AgentProc(self.base / f"n{i + 1}", i, self.topo.node_ns[i],
                          self.etcd.endpoints_for(i), self.pods[i], self.ttl)
            self.agents.append(a)
            a.start()
        for a in self.agents:
            a.wait_up()
        return self

    def deploy(self, name: str, **extra: Any) -> None:
        defn = {"name": name, **extra,
                "components": [{"name": "web", "image": self.image, "restart": "always",
                                "env": [f"MESSAGE={name}"]}]}
        assert self.etcd is not None
        self.etcd.ensure_running()
        for a in self.agents:
            if a.alive() and not a.stopped:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        a.call(lambda c: c.post("/v1/services", defn))
                        return
                    except RemoteError as exc:   # etcd settling after the last fault
                        if exc.status != 503 or time.monotonic() > deadline:
                            raise
                        print(f"deploy {name}: {exc.message[:120]}; again")
                        time.sleep(0.5)
        raise AssertionError("no agent to deploy through")

    def close(self) -> None:
        for a in self.agents:
            with contextlib.suppress(Exception):
                a.stop()
        if self.etcd is not None:
            self.etcd.stop_all()
        for p in self.pods:
            with contextlib.suppress(Exception):
                p.stop()
        self.topo.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, hello_images: dict[str, str]
          ) -> Iterator[Fleet]:
    """One fleet for the module: its start (etcd, three podmans, three agents) is the
    dear part; each test deploys a service of its own."""
    need("etcd", "ip", "podman")
    f = Fleet(tmp_path_factory.mktemp("fence"), hello_images["v1"])
    try:
        yield f.start()
    finally:
        f.close()


def _inject(f: Fleet, kind: str, node: int) -> Callable[[], None]:
    """Do the fault on ``node``; returns what undoes it."""
    a = f.agents[node]
    if kind == "kill":
        a.signal(signal.SIGKILL)
        return a.start
    if kind == "stop":
        a.signal(signal.SIGSTOP)
        return lambda: a.signal(signal.SIGCONT)
    if kind == "partition":
        f.topo.cut(node)
        return lambda: f.topo.cut(node, down=False)
    raise AssertionError(kind)


def _rounds(f: Fleet, kind: str, service: str) -> None:
    rng = random.Random(f"{SEED}-{kind}")
    print(f"fault={kind} rounds={ROUNDS} seed={SEED} (MCP_FAULT_SEED={SEED} replays it)")
    poller = Poller(f.pods, service).start()
    try:
        holder = poller.wait_holder(timeout=60)
        pending: list[Callable[[], None]] = []
        for r in range(ROUNDS):
            time.sleep(rng.uniform(0, TTL / 4))       # a random point of the keepalive cycle
            undo = _inject(f, kind, holder)
            moved = poller.wait_holder(not_on=holder, timeout=40)
            assert not poller.doubles, (kind, r, poller.doubles[:3])
            undo()
            for done in pending:                      # the round before's node is back
                done()
            pending = []
            if kind == "kill":                         # it must be up to be a target again
                a = f.agents[holder]
                pending.append(a.wait_up)
            holder = moved
        for done in pending:
            done()
        time.sleep(2 * TTL)      # the last one back: it must not start its copy again
        assert poller.holder is not None
    finally:
        poller.stop()
    assert not poller.doubles, f"{kind}: two copies at {poller.doubles[:5]} (seed {SEED})"
    assert poller.polls > 10 * ROUNDS
    print(f"fault={kind}: {ROUNDS} failovers, 0 instants with two copies in "
          f"{poller.polls} polls; longest gap with none {max(poller.gaps or [0]):.2f} s")


def test_never_two_copies_under_faults(fleet: Fleet) -> None:
    fleet.deploy("solo")
    for kind in ("kill", "stop", "partition"):
        _rounds(fleet, kind, "solo")
    # the etcd leader killed: the service stays where it is, never twice
    etcd = fleet.etcd
    assert etcd is not None
    rng = random.Random(f"{SEED}-leader")
    poller = Poller(fleet.pods, "solo").start()
    try:
        holder = poller.wait_holder(timeout=30)
        for _ in range(ROUNDS):
            time.sleep(rng.uniform(0, TTL / 4))
            etcd.kill_leader(rng)
        assert poller.wait_holder(timeout=30) is not None
    finally:
        poller.stop()
    assert not poller.doubles, f"leader kills: two copies at {poller.doubles[:5]} (seed {SEED})"
    print(f"fault=etcd-leader: {ROUNDS} kills, holder n{holder + 1}, 0 instants with two "
          f"copies in {poller.polls} polls")


def test_quorum_lost_fences_nothing_and_overlap_is_not_fenced(fleet: Fleet) -> None:
    fleet.deploy("calm")
    fleet.deploy("twice", failover="overlap")
    poller = Poller(fleet.pods, "calm").start()
    try:
        holder = poller.wait_holder(timeout=60)
        before = running_copies(fleet.pods[holder], "calm")
        etcd = fleet.etcd
        assert etcd is not None
        etcd.kill(0)
        etcd.kill(1)                 # one member answers, with no leader
        time.sleep(4 * TTL)          # past every fence deadline
        assert running_copies(fleet.pods[holder], "calm") == before   # not fenced
        assert poller.holder == holder
        etcd.start(0)
        etcd.start(1)
        etcd.wait_healthy()
        time.sleep(2 * TTL)
        assert running_copies(fleet.pods[holder], "calm") == before   # nothing moved
        assert not poller.doubles
    finally:
        poller.stop()
    # an "overlap" service is not fenced: the cut-off node keeps its copy running
    placed = until(lambda: [i for i, p in enumerate(fleet.pods) if running_copies(p, "twice")],
                   30, "twice did not start")
    node = placed[0]
    ids = running_copies(fleet.pods[node], "twice")
    fleet.topo.cut(node)
    until(lambda: any(running_copies(p, "twice") for i, p in enumerate(fleet.pods)
                      if i != node), 40, "twice did not move")
    assert running_copies(fleet.pods[node], "twice") == ids   # the old copy still runs
    fleet.topo.cut(node, down=False)
    until(lambda: not running_copies(fleet.pods[node], "twice"), 30,
          "the node that came back kept its overlap copy")


def test_an_agent_restarted_within_the_fence_deadline_stops_and_moves_nothing(
        tmp_path: Path, hello_images: dict[str, str]) -> None:
    """The README's row: SIGKILL the holder's agent and start it again at once; its
    copy keeps running (the same container, no instant without it) and nothing moves.
    A fleet of its own at an 8 s lease TTL: the deadline (TTL less the margins, 6.6 s)
    must leave room for an agent's start."""
    need("etcd", "ip", "podman")
    f = Fleet(tmp_path, hello_images["v1"], ttl=8)
    try:
        f.start()
        f.deploy("stay")
        poller = Poller(f.pods, "stay").start()
        try:
            holder = poller.wait_holder(timeout=60)
            ids = running_copies(f.pods[holder], "stay")
            rng = random.Random(f"{SEED}-restart")
            for r in range(3):
                time.sleep(rng.uniform(0, 2))          # a random point of the cycle
                a = f.agents[holder]
                a.signal(signal.SIGKILL)
                a.start()
                a.wait_up()
                print(f"restart round {r} (seed {SEED}): agent n{holder + 1} up again")
            time.sleep(8 + 2)                           # past the first lease's expiry
            assert running_copies(f.pods[holder], "stay") == ids
            assert poller.holder == holder and poller.holder_id == ids[0]
            assert not poller.gaps and poller.gap_since is None, poller.gaps
            assert not poller.doubles
            assert not any(running_copies(p, "stay") for i, p in enumerate(f.pods)
                           if i != holder)
        finally:
            poller.stop()
        fence_log = f.agents[holder].state / "fence.log"
        assert not fence_log.exists() or "is not known alive" not in fence_log.read_text()
    finally:
        f.close()
