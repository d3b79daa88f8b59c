"""ps_scale: `mcp ps --json` with 10, 50 and 100 running containers vs
`podman ps -a --format json` (target: ratio <= 1.5 at 100), and the podman API
calls per listing, which must not grow with N.

All figures come from one run on one podman service. Containers are deployed
through a real agent daemon (bench/common.py), so `mcp ps --json` is measured
as a user meets it: a fresh `mcp` process asking the agent. Beside it:
`PodmanRuntime.list()` in-process (the one listing call the agent's monitor
makes) and the agent's own REST-call counters, read from /v1/health.
Everything is removed at the end (containers by the agent's owner label).
With ``--vms K`` (issue 4), K unikernel VMs (TCG) run among the containers and
the unikernel runtime's listing is timed too: one directory scan, no QMP call
and no subprocess per VM.
Run: .venv/bin/python bench/ps_scale.py [ROUNDS] [N ...] [--vms K]
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

from common import TOP, Bed, bed, hello_image, median, timed

from mcp_node.client import Client
from mcp_node.config import from_dict
from mcp_node.podman import PodmanRuntime
from mcp_node.qemu import QemuRuntime

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


def deploy_vms(client: Client, image: str, count: int) -> None:
    client.post("/v1/services", {"name": "psvms", "runtime": "unikernel", "components": [
        {"name": f"vm{i}", "image": image, "memory_mb": 128, "routes": [{"port": 8080}]}
        for i in range(count)]})


def main() -> None:
    args = sys.argv[1:]
    vms = 0
    if "--vms" in args:
        i = args.index("--vms")
        vms = int(args[i + 1])
        del args[i:i + 2]
    rounds = int(args[0]) if args else 15
    sizes = [int(x) for x in args[1:]] or [10, 50, 100]
    image = hello_image()
    kernel = TOP / ".build" / "kernel" / "vmlinuz"
    extra = f'[qemu]\nkernel = "{kernel}"\naccel = "tcg"\n' if vms else ""
    podman_ps = ["podman", "ps", "-a", "--format", "json"]
    rows_out = []
    vm_list: list[float] = []
    with bed(MONITOR_INTERVAL_S, extra) as b:
        client = b.start_agent()
        cfg = from_dict({"podman": {"socket": b.podman.url}})
        runtime = PodmanRuntime(cfg, Path(tempfile.mkdtemp(dir=b.dir)), b.owner)
        if vms:
            deploy_vms(client, image, vms)
            qemu = QemuRuntime(from_dict({"qemu": {"kernel": str(kernel)}}), b.state, b.owner)
        deployed = 0
        try:
            for n in sizes:
                deploy(b, image, n - deployed)
                deployed = n
                wait_running(client, n + vms)
                # warm every path once (page cache, connections) and check what it sees
                assert len(runtime.list()) == n
                assert len(json.loads(b.mcp("--json", "ps").stdout)) == n + vms
                if vms:
                    assert len(qemu.list()) == vms
                    vm_list.extend(timed(qemu.list) for _ in range(rounds))
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
    if vms:
        print(f"  with {vms} VMs among the containers: QemuRuntime.list() "
              f"{median(vm_list) * 1000:.2f} ms (one scan of the VM state directory)")
    print("  `mcp ps` itself costs no podman call: the agent answers from its monitor's view, "
          "which lists once per refresh (agent calls/refresh above)")


if __name__ == "__main__":
    sys.exit(main())
