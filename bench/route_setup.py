#!/usr/bin/env python3
"""Route setup latency: a deploy with one l7 route (DNS + certificate + proxy) against
the same steps done by hand, alternating, same run (target <= 1.2x).

Starts its own BIND9 (TSIG updates), Pebble (real HTTP-01, names resolved through
BIND) and Caddy on free loopback ports, stopped by pid at the end. The agent runs on
the in-memory runtime (tests/fake_runtime.py), so the deploy's time is the route's:
``Agent.deploy`` of a service with one l7 route on 127.0.0.1. By hand: ``nsupdate``
(TSIG) for the A record, an ACME order (AcmeClient.issue with an HTTP-01 responder,
key and chain written), one Caddy admin call (PUT of a server with the route) and one
for the certificate (POST to load_files).

    .venv/bin/python bench/route_setup.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP), str(TOP / "tests")]

from edge_env import Caddy, Pebble, free_port  # noqa: E402
from fake_runtime import FakeWorld  # noqa: E402
from route_env import TSIG_NAME, ZONE, Bind  # noqa: E402

from mcp_node import nodeproxy  # noqa: E402
from mcp_node.acme import AcmeClient, Http01Responder, issue_files  # noqa: E402
from mcp_node.agent import Agent  # noqa: E402
from mcp_node.config import AgentConfig, from_dict  # noqa: E402
from mcp_node.proxy import CaddyRouter  # noqa: E402
from mcp_node.servicedef import from_dict as service_from_dict  # noqa: E402


@dataclass
class Stack:
    tmp: Path
    bind: Bind
    pebble: Pebble
    caddy: Caddy
    secret: Path

    def config(self, state: Path) -> AgentConfig:
        return from_dict({
            "state": {"dir": str(state)},
            "proxy": {"admin": self.caddy.admin_url, "https_port": self.caddy.https_port,
                      "serve_routes": True},
            "acme": {"directory": self.pebble.directory_url,
                     "ca_bundle": str(self.pebble.ca_bundle),
                     "http01_port": self.pebble.http01_port},
            "dns": {"update_server": f"127.0.0.1:{self.bind.port}", "tsig_name": TSIG_NAME,
                    "tsig_secret_file": str(self.secret)},
            "edge": {"internal_zone": ZONE},
        })


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """BIND, Pebble through BIND, Caddy; every process stopped by its pid."""
    with tempfile.TemporaryDirectory(prefix="mcp-route-bench-") as d:
        tmp = Path(d)
        bind = Bind(tmp / "bind").start()
        pebble = caddy = None
        try:
            pebble = Pebble(tmp / "pebble", bind.port).start()
            caddy = Caddy(tmp / "caddy").start()
            yield Stack(tmp, bind, pebble, caddy, bind.secret_file(tmp / "tsig.secret"))
        finally:
            for p in (caddy, pebble, bind):
                if p is not None:
                    p.stop()


def by_hand(s: Stack, acme: AcmeClient, router: CaddyRouter, name: str) -> float:
    host = f"{name}.{ZONE}"
    port = free_port()
    t0 = time.perf_counter()
    subprocess.run(["nsupdate", "-y", f"hmac-sha256:{TSIG_NAME}:{s.bind.secret}"], check=True,
                   input=f"server 127.0.0.1 {s.bind.port}\nzone {ZONE}\n"
                         f"update add {host} 60 A 127.0.0.1\nsend\n", text=True, timeout=30)
    cert, key, _ = issue_files(acme, host, Http01Responder(s.pebble.http01_port, "127.0.0.1"),
                               lambda serial: (s.tmp / f"{host}.{serial}.crt",
                                               s.tmp / f"{host}.{serial}.key"))
    router.call("PUT", f"/config/apps/http/servers/hand_{port}", nodeproxy.build_server(
        "127.0.0.1", port, [nodeproxy.L7Route(port, host, 10000)]))
    router.call("POST", "/config/apps/tls/certificates/load_files",
                {"certificate": str(cert), "key": str(key)})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    with stack() as s:
        agent = Agent(s.config(s.tmp / "state"), runtimes=FakeWorld().runtimes())
        acme = AcmeClient(s.pebble.directory_url, s.tmp / "hand-account.key",
                          ca_bundle=str(s.pebble.ca_bundle))
        router = CaddyRouter(s.caddy.admin_url, s.caddy.https_port, s.tmp)
        # warm-up: accounts registered, Caddy apps tree made, code paths loaded
        agent.deploy(service_from_dict({"name": "warm", "components": [
            {"name": "web", "image": "x:1", "routes": [{"port": free_port()}]}]}))
        by_hand(s, acme, router, "hand-warm")
        ours, hand = [], []
        for i in range(args.rounds):
            defn = service_from_dict({"name": f"b{i}", "components": [
                {"name": "web", "image": "x:1", "routes": [{"port": free_port()}]}]})
            t0 = time.perf_counter()
            agent.deploy(defn)
            ours.append(time.perf_counter() - t0)
            hand.append(by_hand(s, acme, router, f"h{i}"))
        agent.close()
    mo, mh = statistics.median(ours), statistics.median(hand)
    print(f"rounds={args.rounds}")
    print(f"deploy with one l7 route (DNS+cert+proxy): median {mo * 1000:.0f} ms")
    print(f"same steps by hand (nsupdate, ACME order, 2 caddy calls): median {mh * 1000:.0f} ms")
    print(f"ratio agent/by-hand: {mo / mh:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
