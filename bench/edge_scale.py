#!/usr/bin/env python3
"""Edge routes at scale: 200 routes set up, list time, Caddy config size, and the number
of Caddy admin calls a route update costs (O(1): the same at 10 routes as at 200).

Starts its own dnsmasq, Pebble (real HTTP-01 unless --always-valid) and Caddy on free
loopback ports and stops them by pid. `mcp edge list --json` is timed as the real CLI
(a subprocess) against an in-process agent HTTP server. No connection is ever made to
the backend address (Caddy only dials it on a request).

    .venv/bin/python bench/edge_scale.py [--routes 200] [--always-valid]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP), str(TOP / "tests")]

from edge_env import (  # noqa: E402
    BACKEND_HOST,
    INTERNAL_ZONE,
    Caddy,
    Dnsmasq,
    Pebble,
    make_edge_config,
)

from mcp_node.agent import Agent  # noqa: E402
from mcp_node.config import ServerConfig  # noqa: E402
from mcp_node.edge import EdgeManager  # noqa: E402
from mcp_node.proxy import CaddyRouter  # noqa: E402
from mcp_node.server import serve  # noqa: E402

BACKEND2 = f"app2.{INTERNAL_ZONE}"


def calls(em: EdgeManager, fn) -> tuple[int, int, float]:  # type: ignore[no-untyped-def]
    """(Caddy admin calls, ACME requests, seconds) spent by fn()."""
    router = em.router
    assert isinstance(router, CaddyRouter)
    a0, i0 = router.admin_calls, em.issuer.requests
    t0 = time.perf_counter()
    fn()
    return router.admin_calls - a0, em.issuer.requests - i0, time.perf_counter() - t0


def update_costs(em: EdgeManager, host: str) -> dict[str, tuple[int, int, float]]:
    return {
        "identical setup": calls(em, lambda: em.setup(host, BACKEND_HOST, 8443)),
        "new backend": calls(em, lambda: em.setup(host, BACKEND2, 8443)),
        "backend back": calls(em, lambda: em.setup(host, BACKEND_HOST, 8443)),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--routes", type=int, default=200)
    ap.add_argument("--always-valid", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mcp-bench-edge-scale-"))
    dns = pebble = caddy = None
    srv = agent = None
    try:
        dns = Dnsmasq(work / "dns").start()
        pebble = Pebble(work / "pebble", dns.port, always_valid=args.always_valid).start()
        caddy = Caddy(work / "caddy").start()
        edge_cfg = make_edge_config(work / "state", caddy, pebble, dns)
        cfg = replace(edge_cfg, server=ServerConfig(listen="127.0.0.1:0"))
        agent = Agent(cfg)
        srv = serve(agent, cfg)
        em = agent.edge
        router = em.router
        assert isinstance(router, CaddyRouter)

        setup_times: list[float] = []
        proxy_times: list[float] = []
        small: dict[str, tuple[int, int, float]] = {}
        new_route_calls: dict[int, int] = {}
        t_all = time.perf_counter()
        for i in range(args.routes):
            host = f"r{i:04d}.example.net"
            a0 = router.admin_calls
            em.setup(host, BACKEND_HOST, 8443)
            new_route_calls[i + 1] = router.admin_calls - a0
            setup_times.append(em.last_timings["total"])
            proxy_times.append(em.last_timings["proxy"])
            if i + 1 == 10:
                small = update_costs(em, "r0000.example.net")
        t_all = time.perf_counter() - t_all
        large = update_costs(em, "r0000.example.net")

        t0 = time.perf_counter()
        rows = em.list()
        t_list = time.perf_counter() - t0
        assert len(rows) == args.routes
        assert srv.token_file is not None
        mcp = [str(Path(sys.executable).parent / "mcp"), "--agent", srv.url, "--token-file",
               str(srv.token_file), "--json", "edge", "list"]
        cli_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = subprocess.run(mcp, check=True, capture_output=True, text=True).stdout
            cli_times.append(time.perf_counter() - t0)
            assert len(json.loads(out)) == args.routes
        mcp_version = [mcp[0], "--version"]
        base_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run(mcp_version, check=True, capture_output=True)
            base_times.append(time.perf_counter() - t0)
        size = router.config_size()

        # a restarted, empty Caddy: reconcile puts every route back
        caddy.stop()
        caddy.start()
        a0 = router.admin_calls
        t0 = time.perf_counter()
        actions = em.reconcile()
        t_rec = time.perf_counter() - t0
        rec_calls = router.admin_calls - a0
        assert len(router.list_routes()) == args.routes

        ms = 1000.0
        n = args.routes
        print(f"edge_scale: {n} routes, Pebble "
              f"{'always-valid' if args.always_valid else 'real HTTP-01'}")
        med = statistics.median(setup_times) * ms
        first, last = statistics.median(setup_times[:10]), statistics.median(setup_times[-10:])
        print(f"  setup all: {t_all:.1f} s; per setup median {med:.1f} ms "
              f"(first 10: {first * ms:.1f} ms, last 10: {last * ms:.1f} ms)")
        print(f"  proxy step median: first 10 {statistics.median(proxy_times[:10]) * ms:.1f} ms,"
              f" last 10 {statistics.median(proxy_times[-10:]) * ms:.1f} ms "
              f"(Caddy re-provisions its config on every change)")
        print(f"  admin calls for a new route: route #2 {new_route_calls.get(2)}, "
              f"route #{n} {new_route_calls[n]}")
        print(f"  EdgeManager.list(): {t_list * ms:.2f} ms")
        print(f"  `mcp --json edge list` (subprocess, HTTP): median "
              f"{statistics.median(cli_times) * ms:.0f} ms; `mcp --version` baseline "
              f"{statistics.median(base_times) * ms:.0f} ms; ratio "
              f"{statistics.median(cli_times) / statistics.median(base_times):.2f}x")
        print(f"  Caddy config: {size} bytes ({size / n:.0f} bytes/route)")
        print("  route update cost (admin calls, ACME requests, ms):")
        for k in small:
            s, big = small[k], large[k]
            print(f"    {k:<16} at 10 routes: {s[0]} calls, {s[1]} acme, {s[2] * ms:.1f} ms;"
                  f" at {n}: {big[0]} calls, {big[1]} acme, {big[2] * ms:.1f} ms")
        print(f"  reconcile after empty Caddy restart: {len(actions)} routes back in "
              f"{t_rec:.2f} s, {rec_calls} admin calls ({rec_calls / n:.1f}/route)")
        return 0
    finally:
        if srv is not None:
            srv.shutdown()
        if agent is not None:
            agent.close()
        for p in (caddy, pebble, dns):
            if p is not None:
                p.stop()


if __name__ == "__main__":
    sys.exit(main())
