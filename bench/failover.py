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

from fault_env import GRACE, TTL, Poller  # noqa: E402
from test_fence_faults import Fleet  # noqa: E402


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
                        leader = None
                        while leader is None:
                            leader = f.etcd.leader()
                        f.etcd.kill(leader)
                        time.sleep(rng.uniform(0.1, 0.6))
                        f.etcd.start(leader)
                        f.etcd.wait_healthy()
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


if __name__ == "__main__":
    main()
