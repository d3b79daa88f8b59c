"""fleet: fleet mode on etcd against a single node, same run, same machine.

1. Deploy through the fleet (the edge agent places it in etcd, the compute node's
   watch wakes it, it converges locally and publishes; the deploy returns once the
   node answered) vs a direct deploy of the same service on that same node, the
   single-node path (``deploy_local``: the same runtime, node proxy route, DNS name
   and certificate, no etcd). Median of ROUNDS deploy+undeploy pairs, alternating.
   Target: ratio <= 1.3.
2. Failover: a compute node dies (agent and workloads); from its lease's expiry
   (the node record's delete, seen on a watch) to the public hostname answering
   again through the edge, against the service's own start time (podman run to
   answering on its host port, from the direct deploys). Both reported.
3. etcd traffic per idle agent per minute: requests and bytes (request and
   response bodies) each agent sent while nothing happened for IDLE_S seconds,
   with the default lease TTL (10 s; used throughout, failover is timed from the
   expiry) and resync (60 s).

Run: .venv/bin/python bench/fleet.py [ROUNDS] [IDLE_S]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from common import TOP, hello_image, median

sys.path.insert(0, str(TOP / "tests"))

from etcd_env import PUBLIC, EtcdCluster, SimFleet  # noqa: E402

from mcp_node.cluster import NODES, Etcd  # noqa: E402
from mcp_node.servicedef import from_dict  # noqa: E402


def until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # noqa: S110 - not yet
            pass
        time.sleep(0.02)
    raise SystemExit(f"timed out: {what}")


def answers(port: int) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
        return b"hello" in r.read()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    idle_s = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    image = hello_image()
    base = Path(tempfile.mkdtemp(prefix="mcp-bench-fleet-"))
    etcd = EtcdCluster(base / "etcd")
    etcd.base.mkdir()
    sim = SimFleet(base / "fleet", etcd.endpoints, image, ttl=10, grace=1.0)
    try:
        for i in range(3):
            etcd.start(i)
        etcd.wait_healthy()
        sim.start()
        e1 = sim.agent("e1")
        single = sim.agent("c1")

        # 1. deploy through the fleet vs direct (no public hostname: what is compared is
        # placement + watch + converge, not edge set-up)
        def defn(name: str, node: str = "") -> object:
            return from_dict({"name": name, **({"node": node} if node else {}),
                              "components": [{
                "name": "web", "image": image, "memory_mb": 64,
                "routes": [{"port": sim.route_port}]}]})

        fleet_t, direct_t, start_t = [], [], []
        for r in range(rounds):
            for side in (("fleet", "direct") if r % 2 == 0 else ("direct", "fleet")):
                name = f"b{side[0]}{r}"
                if side == "fleet":
                    t0 = time.perf_counter()
                    st = e1.deploy(defn(name, "c1"))  # type: ignore[arg-type]
                    fleet_t.append(time.perf_counter() - t0)
                    assert st["components"][0]["state"] in ("running", "starting"), st
                    e1.undeploy(name)
                else:
                    t0 = time.perf_counter()
                    st = single.deploy_local(defn(name))  # type: ignore[arg-type]
                    direct_t.append(time.perf_counter() - t0)
                    port = st["components"][0]["routes"][0]["host_port"]
                    until(lambda port=port: answers(port), 30, "direct service answering")
                    start_t.append(time.perf_counter() - t0)
                    single.undeploy_local(name)
        for n in ("c1", "c2"):
            until(lambda n=n: not sim.agent(n).local.registry.list_services(), 30, "undeploys")
        ratio = median(fleet_t) / median(direct_t)
        print(f"deploy: fleet {median(fleet_t) * 1000:.0f} ms, direct {median(direct_t) * 1000:.0f}"
              f" ms (median of {rounds}): ratio {ratio:.2f} (target <= 1.3)")

        # 3. idle etcd traffic, with the default lease TTL: three fresh agents' counters
        # over IDLE_S seconds of nothing happening (measured before the failover)
        for n in sim.nodes.values():
            assert n.agent is not None and n.agent.fleet is not None
        before = {k: (sim.agent(k).fleet.traffic.requests,  # type: ignore[union-attr]
                      sim.agent(k).fleet.traffic.bytes) for k in sim.nodes}  # type: ignore
        time.sleep(idle_s)
        per_min = 60.0 / idle_s
        for k in sim.nodes:
            t = sim.agent(k).fleet.traffic  # type: ignore[union-attr]
            req = (t.requests - before[k][0]) * per_min
            kib = (t.bytes - before[k][1]) * per_min / 1024
            print(f"idle etcd traffic, agent {k}: {req:.0f} requests/min, {kib:.1f} KiB/min "
                  f"(lease ttl {sim.ttl} s: keepalive every {max(0.5, sim.ttl / 3):.1f} s)")

        # 2. failover: lease expiry -> public hostname answering again
        st = e1.deploy(from_dict({"name": "pub", "components": [{
            "name": "web", "image": image, "memory_mb": 64,
            "routes": [{"port": sim.route_port, "public_hostname": PUBLIC}]}]}))
        first = st["node"]
        until(lambda: "hello" in sim.public_body(), 90, "public hostname answering")
        expired: list[float] = []
        watcher = Etcd(sim.agent("e1").local.config.cluster)
        stop = threading.Event()

        def on_event(kind: str, key: str) -> None:
            if kind == "DELETE" and key == NODES + first and not expired:
                expired.append(time.perf_counter())

        rev, _ = watcher.get_prefix(NODES)
        th = threading.Thread(target=watcher.watch, args=(NODES, rev + 1, stop, on_event),
                              daemon=True)
        th.start()
        killed = time.perf_counter()
        sim.nodes[first].crash()
        until(lambda: expired, 60, "lease expiry")
        until(lambda: sim.agent("e1").status("pub")["node"] != first, 60, "re-placement")
        until(lambda: "hello" in sim.public_body(), 120, "public hostname answering again")
        back = time.perf_counter()
        stop.set()
        th.join(timeout=5)
        own = median(start_t)
        print(f"failover: lease expired {expired[0] - killed:.1f} s after the kill (ttl "
              f"{sim.ttl} s); public hostname answering again {back - expired[0]:.2f} s after "
              f"the expiry (grace {sim.grace:g} s included); the service's own start "
              f"(deploy to answering, direct): {own:.2f} s; ratio {(back - expired[0]) / own:.1f}")
    finally:
        sim.close()
        etcd.stop_all()


if __name__ == "__main__":
    main()
