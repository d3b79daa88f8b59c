"""ps_scale: `mcp ps --json` with 10, 50 and 100 running containers vs
`podman ps -a --format json` (target: ratio <= 1.5 at 100), and the podman API
calls per listing, which must not grow with N.

All figures come from one run on one podman service. Containers are deployed
through a real agent daemon (bench/common.py), so `mcp ps --json` is measured
as a user meets it: a fresh `mcp` process asking the agent. Beside it:
`PodmanRuntime.list()` in-process (the one listing call the agent's monitor
makes) and the agent's own REST-call counters, read from /v1/health.
Everything is removed at the end (containers by the agent's owner label).
Run: .venv/bin/python bench/ps_scale.py [ROUNDS] [N ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import Bed, bed, hello_image, median, timed

from mcp_node.client import Client
from mcp_node.config import from_dict
from mcp_node.podman import PodmanRuntime

MONITOR_INTERVAL_S = 2.0


def deploy(b: Bed, image: str, count: int) -> list[str]:
    """Deploy ``count`` one-container services, 4 at a time (the agent runs them in parallel)."""
    token = (b.state / "token").read_text().strip()
    names = [f"ps{uuid.uuid4().hex[:8]}" for _ in range(count)]

    def one(name: str) -> None:
        Client(b.url, token).post("/v1/services", {"name": name, "components": [
            {"name": "web", "image": image, "routes": [{"port": 8080}]}]})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, names))
    return names


def wait_running(client: Client, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = client.get("/v1/services")
        running = sum(1 for r in rows if r["state"] == "running")
        if running == n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {running}/{n} components running after {timeout}s")
        time.sleep(0.2)


def agent_counters(client: Client) -> dict[str, Any]:
    info: dict[str, Any] = client.get("/v1/health")["runtimes"]["container"]
    return info


def agent_calls_per_refresh(client: Client) -> tuple[int, int]:
    """(REST calls, monitor listings) the agent made over ~3 refreshes."""
    first = agent_counters(client)
    deadline = time.monotonic() + 10 * MONITOR_INTERVAL_S
    while True:
        time.sleep(MONITOR_INTERVAL_S / 2)
        last = agent_counters(client)
        if last["listings"] - first["listings"] >= 3 or time.monotonic() > deadline:
            return (last["api_calls"] - first["api_calls"], last["listings"] - first["listings"])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    sizes = [int(x) for x in sys.argv[2:]] or [10, 50, 100]
    image = hello_image()
    podman_ps = ["podman", "ps", "-a", "--format", "json"]
    rows_out = []
    with bed(MONITOR_INTERVAL_S) as b:
        client = b.start_agent()
        cfg = from_dict({"podman": {"socket": b.podman.url}})
        runtime = PodmanRuntime(cfg, Path(tempfile.mkdtemp(dir=b.dir)), b.owner)
        deployed = 0
        try:
            for n in sizes:
                deploy(b, image, n - deployed)
                deployed = n
                wait_running(client, n)
                # warm every path once (page cache, connections) and check what it sees
                assert len(runtime.list()) == n
                assert len(json.loads(b.mcp("--json", "ps").stdout)) == n
                subprocess.run(podman_ps, check=True, capture_output=True)

                calls = []
                list_t, cli_t, api_t, podman_t = [], [], [], []
                for _ in range(rounds):
                    before = runtime.api_calls
                    list_t.append(timed(runtime.list))
                    calls.append(runtime.api_calls - before)
                    cli_t.append(timed(lambda: b.mcp("--json", "ps")))
                    api_t.append(timed(lambda: client.get("/v1/services")))
                    podman_t.append(timed(lambda: subprocess.run(podman_ps, check=True,
                                                                 capture_output=True)))
                agent_calls, refreshes = agent_calls_per_refresh(client)
                rows_out.append((n, median(cli_t), median(api_t), median(list_t),
                                 median(podman_t), sorted(set(calls)), agent_calls, refreshes))
        finally:
            runtime.close()
    print(f"ps_scale rounds={rounds} (medians; podman ps lists every container on the host)")
    print(f"  {'N':>4} {'mcp ps --json':>14} {'GET /v1/services':>17} {'list()':>9} "
          f"{'podman ps':>10} {'mcp/podman':>11} {'list/podman':>12} {'calls/list()':>13} "
          f"{'agent calls/refresh':>20}")
    for n, cli, api, lst, pod, calls, agent_calls, refreshes in rows_out:
        per_refresh = f"{agent_calls}/{refreshes}" if refreshes else "n/a"
        print(f"  {n:>4} {cli * 1000:>11.1f} ms {api * 1000:>14.1f} ms {lst * 1000:>6.1f} ms "
              f"{pod * 1000:>7.1f} ms {cli / pod:>10.2f}x {lst / pod:>11.2f}x "
              f"{','.join(map(str, calls)):>13} {per_refresh:>20}")
    last = rows_out[-1]
    print(f"  ratio mcp ps --json / podman ps at N={last[0]}: {last[1] / last[4]:.2f}x "
          "(target <= 1.5x)")
    print("  podman REST calls per list(): " + ", ".join(
        f"N={r[0]}: {','.join(map(str, r[5]))}" for r in rows_out)
        + " (independent of N: one containers/json request)")
    print("  `mcp ps` itself costs no podman call: the agent answers from its monitor's view, "
          "which lists once per refresh (agent calls/refresh above)")


if __name__ == "__main__":
    sys.exit(main())
