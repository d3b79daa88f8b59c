"""failover: what a fleet does on each fault (issue 18), in one run.

The real-process fleet of tests/fault_env.py (three etcd members, three mcp-agent
daemons in network namespaces, a podman each, lease TTL 2 s, grace 0), one unpinned
service, and a poller reading every node's podman every 100 ms. Per fault kind,
ROUNDS times at seeded random points of the keepalive cycle:

- kill: the holder's agent SIGKILLed (restarted after the move);
- stop: the holder's agent SIGSTOPped (SIGCONT after the move);
- partition: the holder's node cut off from etcd (link down; up after the move);
- etcd-leader: the etcd leader SIGKILLed (restarted after 0.1-0.6 s): nothing moves.

Reported per kind: failover time from the fault to the new copy running (median and
worst), instants with two copies (goal 0), the gap with no copy (median and worst),
how often a fence fired (etcd-leader: goal 0) and the poller's failed reads, against
the bound lease TTL + grace + the service's own start (a fresh
deploy's time to running, measured in the same run).

The floor under that bound, measured in the same run on the same etcd: how late etcd
itself ends a lease nobody keeps alive (its leader revokes expired leases on a fixed
500 ms loop; seen through a watch from a node's namespace, as the agents see it), and
what the instrument adds (the poller's real period). Then the etcd leader kills again
on a second fleet at the default lease TTL (10 s), where an election is short beside
the fence's margin.

Run: .venv/bin/python bench/failover.py [ROUNDS] [SEED]   (a soak: ROUNDS 200)
"""

from __future__ import annotations

import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from common import TOP, hello_image, median

sys.path.insert(0, str(TOP / "tests"))

from fault_env import GRACE, TTL, Poller, in_netns  # noqa: E402
from test_fence_faults import Fleet  # noqa: E402

from mcp_node.cluster import Etcd  # noqa: E402
from mcp_node.config import ClusterConfig  # noqa: E402

DEFAULT_TTL = ClusterConfig().lease_ttl_s


def expiry_lateness(f: Fleet, n: int = 8) -> list[float]:
    """Seconds from a lease's expiry (its grant answered + TTL) to etcd's DELETE of a
    key on it reaching a watch, ``n`` times: etcd's share of every failover."""
    assert f.etcd is not None
    cfg = ClusterConfig(etcd=tuple(f.etcd.endpoints_for(0)), node="floor", timeout_s=2.0)

    def measure() -> list[float]:
        import threading

        etcd, out = Etcd(cfg), []
        for i in range(n):
            key = f"/mcp-bench-floor/{i}"
            lease = etcd.grant(TTL)
            due = time.monotonic() + TTL
            etcd.put(key, "x", lease=lease)
            rev = etcd.get_prefix(key)[0]
            stop, seen = threading.Event(), []

            def on_event(kind: str, _key: str, stop: threading.Event = stop,
                         seen: list[float] = seen) -> None:
                if kind == "DELETE":
                    seen.append(time.monotonic())
                    stop.set()

            while not stop.is_set():
                etcd.watch(key, rev + 1, stop, on_event)
            out.append(seen[0] - due)
        return out

    return in_netns(f.topo.node_ns[0], measure, timeout=n * (TTL + 5))


def leader_kills(f: Fleet, rounds: int, rng: random.Random) -> tuple[int, int]:
    """(fences fired, instants with two copies) over ``rounds`` etcd leader SIGKILLs."""
    assert f.etcd is not None
    poller = Poller(f.pods, "solo").start()
    f.deploy("solo")
    poller.wait_holder(timeout=60, stable=0.0)
    fired = _fence_firings(f)
    for _ in range(rounds):
        time.sleep(rng.uniform(0, 1))
        f.etcd.kill_leader(rng)
    time.sleep(2)
    poller.stop()
    return _fence_firings(f) - fired, len(poller.doubles)


def _fence_firings(f: Fleet) -> int:
    """How often the nodes' fences fired so far (their logs)."""
    n = 0
    for a in f.agents:
        log = a.state / "fence.log"
        if log.exists():
            n += log.read_text(errors="replace").count("is not known alive")
    return n


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else random.SystemRandom().randrange(1 << 30)
    print(f"failover bench: {rounds} rounds per fault kind, seed {seed}, lease TTL {TTL} s, "
          f"grace {GRACE} s")
    with tempfile.TemporaryDirectory(prefix="mcp-failover-") as tmp:
        f = Fleet(Path(tmp), hello_image())
        try:
            f.start()
            t0 = time.monotonic()
            poller = Poller(f.pods, "solo").start()
            f.deploy("solo")
            holder = poller.wait_holder(timeout=60, stable=0.0)
            start_s = poller.changed_at - t0
            bound = TTL + GRACE + start_s
            print(f"service start (fresh deploy to running): {start_s:.2f} s; "
                  f"bound TTL + grace + start = {bound:.2f} s")
            late = expiry_lateness(f)
            print(f"etcd ends an expired lease late by (n={len(late)}): median "
                  f"{median(late):.2f} s, worst {max(late):.2f} s")
            rows = []
            for kind in ("kill", "stop", "partition", "etcd-leader"):
                rng = random.Random(f"{seed}-{kind}")
                fired = _fence_firings(f)
                errors = poller.errors
                poller.doubles.clear()
                poller.gaps.clear()
                times = []
                for _ in range(rounds):
                    time.sleep(rng.uniform(0, TTL / 4))
                    t = time.monotonic()
                    if kind == "etcd-leader":
                        assert f.etcd is not None
                        f.etcd.kill_leader(rng)
                        continue
                    a = f.agents[holder]
                    if kind == "kill":
                        a.signal(signal.SIGKILL)
                    elif kind == "stop":
                        a.signal(signal.SIGSTOP)
                    else:
                        f.topo.cut(holder)
                    moved = poller.wait_holder(not_on=holder, timeout=60)
                    times.append(poller.changed_at - t)
                    if kind == "kill":
                        a.start()
                        a.wait_up()
                    elif kind == "stop":
                        a.signal(signal.SIGCONT)
                    else:
                        f.topo.cut(holder, down=False)
                    holder = moved
                time.sleep(2 * TTL)
                gaps = list(poller.gaps)
                rows.append((kind, times, len(poller.doubles), gaps,
                             _fence_firings(f) - fired, poller.errors - errors))
            poller.stop()
            period = (time.monotonic() - t0) / max(poller.polls, 1)
        finally:
            f.close()
    print(f"{'fault':<12} {'failover median/worst':>22} {'2 copies':>9} "
          f"{'no-copy gap median/worst':>25} {'fences':>7} {'poll errors':>12}")
    for kind, times, doubles, gaps, fences, errs in rows:
        fo = f"{median(times):.2f} / {max(times):.2f} s" if times else "no move"
        gp = f"{median(gaps):.2f} / {max(gaps):.2f} s" if gaps else "none"
        print(f"{kind:<12} {fo:>22} {doubles:>9} {gp:>25} {fences:>7} {errs:>12}")
    worst = max((max(t) for _, t, *_ in rows if t), default=0.0)
    print(f"worst failover {worst:.2f} s vs bound {bound:.2f} s: {worst / bound:.2f}x")
    floor = bound + max(late) + period
    print(f"poller period {period:.3f} s (the instrument: a change is seen up to one period "
          f"late); floor = bound + etcd's worst lateness + one period = {floor:.2f} s: "
          f"worst failover {worst / floor:.2f}x of it")
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="mcp-failover-") as tmp:
        g = Fleet(Path(tmp), hello_image(), ttl=DEFAULT_TTL)
        try:
            g.start()
            fences_default, doubles_default = leader_kills(
                g, rounds, random.Random(f"{seed}-leader-default-ttl"))
        finally:
            g.close()
    print(f"etcd-leader at the default lease TTL {DEFAULT_TTL} s: {rounds} kills, fences "
          f"fired {fences_default}, instants with two copies {doubles_default}")


if __name__ == "__main__":
    main()
