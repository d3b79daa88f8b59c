"""rollout: what a replace costs a client (issue 19), in one run, through the node proxy.

A service of one container component (the hello image, an HTTP check every 0.5 s) with
one l7 route served by the node proxy (Caddy, its certificate from Pebble, its name in
BIND: the stack of ``route_setup``) is redeployed ROUNDS times with a changed env in
each order while a client GETs https://<route>/ through Caddy every 20 ms. Reported per
order: failed requests per redeploy and the longest gap with no answer (``stop-first``:
the old workload stops before the new one starts; ``start-first``: the new one beside
it, switched at the proxy once its check passes; goal 0 failed), and the time from the
deploy call to the new version's first answer through the proxy against the new
workload's own time to its first answer (``podman run -d`` of the same image by hand,
polled the same way, same run; goal <= 1.2x plus one check interval).

Run: .venv/bin/python bench/rollout.py [ROUNDS]
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from common import bed, free_port, hello_image, median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from route_env import ZONE  # noqa: E402
from route_setup import Stack, stack  # noqa: E402

from mcp_node.client import Client

RATE_S = 0.02
CHECK_INTERVAL_S = 0.5


def get(port: int) -> str:
    """Straight to a host port (the workload by hand)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
            return r.read().decode(errors="replace")
    except OSError:
        return ""


class Proxied:
    """GET / through the node proxy: TLS to 127.0.0.1:port with the route's name."""

    def __init__(self, port: int, host: str, cafile: Path) -> None:
        self.port, self.host = port, host
        self.why: list[str] = []   # each failed request's answer or error
        self.tls = ssl.create_default_context(cafile=str(cafile))

    def __call__(self) -> str:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw, \
                    self.tls.wrap_socket(raw, server_hostname=self.host) as s:
                s.sendall(f"GET / HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
            if " 200 " in head.split("\r\n")[0] + " ":
                return body
            self.why.append(head.split("\r\n")[0] or "empty answer")
        except OSError as exc:
            self.why.append(str(exc))
        return ""


def definition(name: str, image: str, message: str, order: str,
               port: int) -> dict[str, object]:
    return {"name": name, "update": {"min_healthy_s": 1, "healthy_deadline_s": 30,
                                     "order": order, "drain_s": 1},
            "components": [{"name": "web", "image": image, "env": [f"MESSAGE={message}"],
                            "check": "http:/", "check_interval_s": CHECK_INTERVAL_S,
                            "routes": [{"port": port}]}]}


def proxy_config(s: Stack) -> str:
    return (f'[proxy]\nadmin = "{s.caddy.admin_url}"\nhttps_port = {s.caddy.https_port}\n'
            f'serve_routes = true\n'
            f'[acme]\ndirectory = "{s.pebble.directory_url}"\n'
            f'ca_bundle = "{s.pebble.ca_bundle}"\nhttp01_port = {s.pebble.http01_port}\n'
            f'[dns]\nupdate_server = "127.0.0.1:{s.bind.port}"\n'
            f'tsig_name = "mcp-test-key"\ntsig_secret_file = "{s.secret}"\n'
            f'[edge]\ninternal_zone = "{ZONE}"\n')


class Poller:
    """GETs every RATE_S; each answer's time and text ("" failed)."""

    def __init__(self, fetch: Proxied) -> None:
        self.fetch, self.seen = fetch, list[tuple[float, str]]()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.seen.append((time.monotonic(), self.fetch()))
            time.sleep(RATE_S)


def own_first_answer(image: str, podman_url: str, env: dict[str, str]) -> float:
    """``podman run -d`` to the first answer, by hand."""
    port = free_port()
    name = f"mcp-bench-own-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    subprocess.run(["podman", "--url", podman_url, "run", "-d", "--name", name, "-e",
                    "PORT=8080", "-p", f"127.0.0.1:{port}:8080", image], check=True,
                   capture_output=True, env=env)
    while not get(port):
        time.sleep(0.005)
    took = time.monotonic() - t0
    subprocess.run(["podman", "--url", podman_url, "rm", "-f", "-t", "0", name],
                   capture_output=True, env=env)
    return took


def redeploys(api: Client, name: str, image: str, order: str, port: int, rounds: int,
              fetch: Proxied, own: list[float], podman_url: str,
              env: dict[str, str]) -> tuple[list[int], list[float], list[float]]:
    st = api.post("/v1/services", definition(name, image, "m0", order, port))
    assert st["components"][0]["routes"], st
    while "m0" not in fetch():
        time.sleep(0.05)
    c = Poller(fetch)
    c.t.start()
    failed: list[int] = []
    gaps: list[float] = []
    to_new: list[float] = []
    try:
        for r in range(1, rounds + 1):
            own.append(own_first_answer(image, podman_url, env))
            before = len(c.seen)
            t0 = time.monotonic()
            api.post("/v1/services", definition(name, image, f"m{r}", order, port))
            while not any(f"m{r}" in text for _, text in c.seen[before:]):
                time.sleep(0.005)
            first = next(t for t, text in c.seen[before:] if f"m{r}" in text)
            to_new.append(first - t0)
            while api.get(f"/v1/services/{name}")["rollout"]["state"] == "in_progress":
                time.sleep(0.1)
            window = c.seen[before:]
            failed.append(sum(1 for _, text in window if not text))
            gap, since = 0.0, None
            for t, text in window:
                if not text and since is None:
                    since = t
                elif text and since is not None:
                    gap, since = max(gap, t - since), None
            gaps.append(gap)
    finally:
        c.stop.set()
        c.t.join()
    api.delete(f"/v1/services/{name}")
    return failed, gaps, to_new


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    image = hello_image()
    results = {}
    whys: dict[str, list[str]] = {}
    own: list[float] = []
    with stack() as s, bed(monitor_interval=0.5, extra_config=proxy_config(s)) as b:
        api: Client = b.start_agent()
        root = s.tmp / "pebble-root.pem"
        root.write_bytes(s.pebble.root_pem())
        for order in ("stop-first", "start-first"):
            name = f"ro{order[:4]}{uuid.uuid4().hex[:4]}"
            port = free_port()
            fetch = Proxied(port, f"{name}.{ZONE}", root)
            results[order] = redeploys(api, name, image, order, port, rounds, fetch, own,
                                       b.podman.url, b.env)
            whys[order] = fetch.why
    print(f"rollout bench: {rounds} redeploys per order, a GET through the node proxy "
          f"every {RATE_S * 1000:.0f} ms")
    for order, (failed, gaps, to_new) in results.items():
        print(f"{order}: failed requests per redeploy median {median(failed):.0f}, "
              f"worst {max(failed)}, total {sum(failed)}; longest gap median "
              f"{median(gaps) * 1000:.0f} ms, worst {max(gaps) * 1000:.0f} ms")
        bound = 1.2 * median(own) + CHECK_INTERVAL_S
        print(f"  deploy call to the new version's first answer through the proxy: median "
              f"{median(to_new):.2f} s; the workload's own run to first answer (by hand): "
              f"median {median(own):.2f} s; ratio {median(to_new) / median(own):.2f}x; "
              f"within 1.2x + one check interval ({bound:.2f} s): "
              f"{'met' if median(to_new) <= bound else 'NOT met'}")
        if whys[order]:
            print(f"  failed requests: {dict(Counter(whys[order]))}")
    print(f"start-first, 0 failed: {'met' if sum(results['start-first'][0]) == 0 else 'NOT met'}")


if __name__ == "__main__":
    main()
