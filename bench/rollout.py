"""rollout: what a replace costs a client today (issue 19), in one run.

A service of one container component (the hello image, an HTTP check every 0.5 s)
is redeployed ROUNDS times with a changed env while a client GETs its host port
every 20 ms. Reported: failed requests per redeploy and the longest gap with no
answer (``stop-first``, the only order built: the old workload stops before the new
one starts on the same host port), and the time from the deploy call to the new
version's first answer against the new workload's own time to its first answer
(``podman run -d`` of the same image by hand, polled the same way, same run).
``start-first`` (new beside old, switched at the node proxy; goal 0 failed) is not
built, so it has no row; the requests go to the host port, not through Caddy.

Run: .venv/bin/python bench/rollout.py [ROUNDS]
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
import uuid

from common import bed, free_port, hello_image, median

from mcp_node.client import Client

RATE_S = 0.02


def get(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
            return r.read().decode(errors="replace")
    except OSError:
        return ""


def definition(name: str, image: str, message: str) -> dict[str, object]:
    return {"name": name, "update": {"min_healthy_s": 1, "healthy_deadline_s": 30},
            "components": [{"name": "web", "image": image, "env": [f"MESSAGE={message}"],
                            "check": "http:/", "check_interval_s": 0.5,
                            "routes": [{"port": 8080}]}]}


class Poller:
    """GETs every RATE_S; each answer's time and text ("" failed)."""

    def __init__(self, port: int) -> None:
        self.port, self.seen = port, list[tuple[float, str]]()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.seen.append((time.monotonic(), get(self.port)))
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


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    image = hello_image()
    with bed(monitor_interval=0.5) as b:
        api: Client = b.start_agent()
        name = f"rollout{uuid.uuid4().hex[:4]}"
        st = api.post("/v1/services", definition(name, image, "m0"))
        port = st["components"][0]["routes"][0]["host_port"]
        while "m0" not in get(port):
            time.sleep(0.05)
        c = Poller(port)
        c.t.start()
        failed: list[int] = []
        gaps: list[float] = []
        to_new: list[float] = []
        own: list[float] = []
        for r in range(1, rounds + 1):
            own.append(own_first_answer(image, b.podman.url, b.env))
            before = len(c.seen)
            t0 = time.monotonic()
            api.post("/v1/services", definition(name, image, f"m{r}"))
            while not any(f"m{r}" in text for _, text in c.seen[before:]):
                time.sleep(0.005)
            first = next(t for t, text in c.seen[before:] if f"m{r}" in text)
            to_new.append(first - t0)
            window = c.seen[before:]
            failed.append(sum(1 for _, text in window if not text))
            gap, since = 0.0, None
            for t, text in window:
                if not text and since is None:
                    since = t
                elif text and since is not None:
                    gap, since = max(gap, t - since), None
            gaps.append(gap)
            while api.get(f"/v1/services/{name}")["rollout"]["state"] == "in_progress":
                time.sleep(0.1)
        c.stop.set()
        c.t.join()
    print(f"rollout bench: {rounds} redeploys, a GET every {RATE_S * 1000:.0f} ms")
    print(f"stop-first: failed requests per redeploy median {median(failed):.0f}, "
          f"worst {max(failed)}; longest gap median {median(gaps) * 1000:.0f} ms, "
          f"worst {max(gaps) * 1000:.0f} ms")
    print(f"deploy call to the new version's first answer: median "
          f"{median(to_new):.2f} s; the workload's own run to first answer: median "
          f"{median(own):.2f} s; ratio {median(to_new) / median(own):.2f}x")
    print("start-first: not built (refused by the definition check)")


if __name__ == "__main__":
    main()
