#!/usr/bin/env python3
"""Node proxy overhead: requests through an l7 node route (TLS + reverse proxy in Caddy)
against requests straight to the component's host port, 16 clients (wrk), same run.

Beside it, Caddy's own figure on this machine: a plain-HTTP Caddy reverse proxy to the
same backend, configured by hand, so what TLS and our route add shows apart from what
any Caddy hop costs. The backend is tests/images/hello.c built here and run on the
route's host port; the route is set up by a real deploy (BIND, Pebble, Caddy from
bench/route_setup.py). wrk runs in its own mount namespace with a hosts file naming the
route's hostname (SNI needs the name; /etc is left alone). Processes stopped by pid.

    .venv/bin/python bench/proxy_overhead.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP), str(TOP / "tests"), str(TOP / "bench")]

from edge_env import free_port, wait_until  # noqa: E402
from fake_runtime import FakeWorld  # noqa: E402
from route_env import ZONE  # noqa: E402
from route_setup import stack  # noqa: E402

from mcp_node.agent import Agent  # noqa: E402
from mcp_node.servicedef import from_dict as service_from_dict  # noqa: E402

CLIENTS = 16


def wrk(url: str, seconds: int, hosts: Path, cafile: Path) -> tuple[float, float]:
    """(requests/s, p99 ms). wrk does not verify certificates; the route's was checked by
    the deploy and is the one Caddy serves."""
    del cafile
    cmd = (f"mount --bind {hosts} /etc/hosts && exec wrk -t4 -c{CLIENTS} -d{seconds}s "
           f"--latency {url}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                         timeout=seconds + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert m is not None, out
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return rps, p99


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcp-proxy-bench-") as d, stack() as s:
        tmp = Path(d)
        hello = tmp / "hello"
        subprocess.run(["gcc", "-O2", "-o", str(hello), str(TOP / "tests/images/hello.c")],
                       check=True, timeout=120)
        agent = Agent(s.config(tmp / "state"), runtimes=FakeWorld().runtimes())
        port = free_port()
        st = agent.deploy(service_from_dict({"name": "ovh", "components": [
            {"name": "web", "image": "x:1", "routes": [{"port": port}]}]}))
        route = st["components"][0]["routes"][0]
        hp = route["host_port"]
        backend = subprocess.Popen([str(hello)], env={**os.environ, "PORT": str(hp)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: bool(socket.create_connection(("127.0.0.1", hp), 1).close()
                                    or True), "backend")
            plain = free_port()
            agent.node_routes.caddy.call("PUT", f"/config/apps/http/servers/plain_{plain}", {
                "listen": [f"127.0.0.1:{plain}"], "automatic_https": {"disable": True},
                "routes": [{"handle": [{"handler": "reverse_proxy",
                                        "upstreams": [{"dial": f"127.0.0.1:{hp}"}]}]}]})
            hosts = tmp / "hosts"
            hosts.write_text(f"127.0.0.1 localhost ovh.{ZONE}\n")
            time.sleep(0.2)
            direct = wrk(f"http://127.0.0.1:{hp}/", args.seconds, hosts, s.pebble.ca_bundle)
            node = wrk(route["url"], args.seconds, hosts, s.pebble.ca_bundle)
            caddy = wrk(f"http://127.0.0.1:{plain}/", args.seconds, hosts, s.pebble.ca_bundle)
        finally:
            os.kill(backend.pid, signal.SIGTERM)
            backend.wait(timeout=10)
            agent.close()
    print(f"{CLIENTS} clients, {args.seconds} s each, same run")
    for label, (rps, p99) in [("direct to host port", direct),
                              ("node proxy (TLS, l7 route)", node),
                              ("Caddy plain HTTP reverse proxy (reference)", caddy)]:
        print(f"{label:45s} {rps:10.0f} req/s  p99 {p99:7.2f} ms  "
              f"throughput ratio {rps / direct[0]:.2f}x")


if __name__ == "__main__":
    main()
