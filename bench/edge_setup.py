#!/usr/bin/env python3
"""Edge setup latency, split into DNS, issuance and proxy steps, against local Pebble.

Starts its own dnsmasq, Pebble (real HTTP-01 unless --always-valid) and Caddy
(free loopback ports; stopped by pid at the end). Each round sets up one new
route with EdgeManager.setup and one with the same steps done by hand
(tailnet.resolve_tailnet, AcmeClient.issue + file writes, CaddyRouter.add_route),
alternating, and prints medians and the ratio agent / sum-of-steps (target <= 1.2x).
No connection is made to the backend address: Caddy only dials it on a request.

    .venv/bin/python bench/edge_setup.py [--rounds 10] [--always-valid]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP), str(TOP / "tests")]

from edge_env import BACKEND_HOST, Caddy, Dnsmasq, Pebble, make_edge_config  # noqa: E402

from mcp_node import tailnet  # noqa: E402
from mcp_node.acme import (  # noqa: E402
    AcmeClient,
    Http01Responder,
    cert_info,
    key_pem,
    new_key,
)
from mcp_node.edge import EdgeManager  # noqa: E402
from mcp_node.files import atomic_write  # noqa: E402
from mcp_node.proxy import CaddyRouter, ProxyRoute  # noqa: E402
from mcp_node.registry import Registry  # noqa: E402


def by_hand(cfg, router: CaddyRouter, client: AcmeClient, host: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    addrs = tailnet.resolve_tailnet(BACKEND_HOST, cfg.dns.nameservers, cfg.dns.timeout_s)
    t["dns"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    key = new_key()
    responder = Http01Responder(cfg.acme.http01_port)
    try:
        chain = client.issue(host, key, responder)
    finally:
        responder.close()
    info = cert_info(chain)
    cert, keyf = router.cert_path(host, info.serial), router.key_path(host, info.serial)
    atomic_write(keyf, key_pem(key), 0o600)
    atomic_write(cert, chain)
    t["certificate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    router.add_route(ProxyRoute(host, addrs[0], 8443, BACKEND_HOST, str(cert), str(keyf)))
    t["proxy"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--always-valid", action="store_true",
                    help="PEBBLE_VA_ALWAYS_VALID=1 (skip HTTP-01 validation)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mcp-bench-edge-"))
    dns = pebble = caddy = None
    try:
        dns = Dnsmasq(work / "dns").start()
        pebble = Pebble(work / "pebble", dns.port, always_valid=args.always_valid).start()
        caddy = Caddy(work / "caddy").start()
        cfg = make_edge_config(work / "state", caddy, pebble, dns)
        em = EdgeManager(cfg, Registry(cfg.state_dir / "registry.db"))
        router = CaddyRouter(caddy.admin_url, caddy.https_port, work / "hand-certs")
        client = AcmeClient(cfg.acme.directory, work / "hand-account.key",
                            ca_bundle=cfg.acme.ca_bundle)
        # warm both paths (account registration, first Caddy skeleton)
        em.setup("warm-agent.example.net", BACKEND_HOST, 8443)
        by_hand(cfg, router, client, "warm-hand.example.net")

        agent: list[dict[str, float]] = []
        hand: list[dict[str, float]] = []
        for i in range(args.rounds):
            em.setup(f"a{i}.example.net", BACKEND_HOST, 8443)
            agent.append(dict(em.last_timings))
            hand.append(by_hand(cfg, router, client, f"h{i}.example.net"))

        def med(rows: list[dict[str, float]], k: str) -> float:
            return statistics.median(r.get(k, 0.0) for r in rows) * 1000

        mode = "always-valid" if args.always_valid else "real HTTP-01"
        print(f"edge_setup: {args.rounds} rounds, Pebble {mode}, medians in ms")
        print(f"{'step':<14}{'agent':>10}{'by hand':>10}")
        for k in ("dns", "proxy_check", "certificate", "proxy", "persist"):
            print(f"{k:<14}{med(agent, k):>10.1f}{med(hand, k):>10.1f}")
        ratios = [a["total"] / h["total"] for a, h in zip(agent, hand, strict=True)]
        total_a, total_h = med(agent, "total"), med(hand, "total")
        print(f"{'total':<14}{total_a:>10.1f}{total_h:>10.1f}")
        print(f"ratio agent/by-hand: median-of-totals {total_a / total_h:.3f}x, "
              f"median per-round {statistics.median(ratios):.3f}x (target <= 1.2x)")
        overhead = [a["total"] - (a["dns"] + a["certificate"] + a["proxy"]) for a in agent]
        print(f"agent overhead outside dns/certificate/proxy: median "
              f"{statistics.median(overhead) * 1000:.1f} ms")
        return 0
    finally:
        for p in (caddy, pebble, dns):
            if p is not None:
                p.stop()


if __name__ == "__main__":
    sys.exit(main())
