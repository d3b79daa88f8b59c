"""vm_stop: `mcp stop` of a unikernel VM vs what the guest itself needs (target: overhead
<= 0.5 s), for a cooperative guest and for one that ignores the power button.

- cooperative: the guest's own shutdown time is measured on a hand-launched VM of the same
  image: QMP system_powerdown sent directly, until the qemu process exits. Against it,
  `mcp stop` (a fresh CLI process) and the bare HTTP stop call to the agent.
- uncooperative (IGNORE_SIGTERM=1: the program ignores the SIGTERM the power button
  turns into, so the guest never powers off): `mcp stop` vs the agent's 10 s timeout.
Run: .venv/bin/python bench/vm_stop.py [ROUNDS]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from common import Bed, bed, hello_image, median
from qemu.qmp import QMPClient
from vm_boot import (
    hand_launch,
    host_port,
    keep_image,
    kill,
    reap_vms,
    vm_definition,
    wait_http,
    with_qemu,
)

from mcp_node.client import Client

AGENT_TIMEOUT_S = 10.0   # Agent.stop's timeout per component


def guest_shutdown(image: Path, accel: str, work: Path) -> float:
    """system_powerdown over QMP to process exit, on a hand-launched VM."""
    proc, port = hand_launch(image, accel, work)
    try:
        wait_http(port)

        async def powerdown() -> None:
            c = QMPClient("bench")
            await c.connect(str(work / "qmp.sock"))
            await c.execute("system_powerdown")
            await c.disconnect()

        t0 = time.perf_counter()
        asyncio.run(powerdown())
        proc.wait(timeout=60)
        return time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            kill(proc)


def deploy(b: Bed, image: str, env: str) -> str:
    svc = f"vs{uuid.uuid4().hex[:6]}"
    b.mcp("deploy", str(vm_definition(b.dir, svc, image, env)))
    wait_http(host_port(b, svc))
    return svc


def measure(b: Bed, client: Client, image: str, kept: Path, rounds: int, own: list[float],
            cli: list[float], api: list[float], stubborn: list[float]) -> None:
    for i in range(rounds):
        svc = deploy(b, image, "MESSAGE=coop")
        meta = keep_image(b, svc, kept)
        (b.dir / "meta").mkdir(exist_ok=True)
        (b.dir / "meta" / f"{svc}.json").write_text(json.dumps(meta))
        t0 = time.perf_counter()
        b.mcp("stop", svc)
        cli.append(time.perf_counter() - t0)
        b.mcp("start", svc)
        wait_http(host_port(b, svc))
        t0 = time.perf_counter()
        client.post(f"/v1/services/{svc}/stop", {})
        api.append(time.perf_counter() - t0)
        b.mcp("undeploy", svc)
        own.append(guest_shutdown(kept, str(meta["accel"]), b.dir / f"hand{i}"))
    svc = deploy(b, image, "IGNORE_SIGTERM=1")
    t0 = time.perf_counter()
    b.mcp("stop", svc)
    stubborn.append(time.perf_counter() - t0)
    b.mcp("undeploy", svc)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    image = hello_image()
    with bed(monitor_interval=1.0) as b:
        with_qemu(b)
        client = b.start_agent()
        b.mcp("node", "health")   # the one-off KVM probe happens here, not in a round
        kept = b.dir / "image"
        own: list[float] = []
        cli: list[float] = []
        api: list[float] = []
        stubborn: list[float] = []
        accel = "tcg"
        try:
            measure(b, client, image, kept, rounds, own, cli, api, stubborn)
            accel = str(json.loads(next((b.dir / "meta").glob("*.json")).read_text())["accel"])
        finally:
            reap_vms(b)
    g = median(own)

    print(f"vm_stop ({accel}, {rounds} rounds, medians)")
    print(f"  cooperative guest's own shutdown (QMP powerdown -> exit): {g:6.2f} s "
          f"{[round(x, 2) for x in own]}")
    print(f"  mcp stop (CLI process)            : {median(cli):6.2f} s  overhead "
          f"{median(cli) - g:+.2f} s  {[round(x, 2) for x in cli]}")
    print(f"  stop via the HTTP API             : {median(api):6.2f} s  overhead "
          f"{median(api) - g:+.2f} s  {[round(x, 2) for x in api]}")
    print(f"  uncooperative guest, mcp stop     : {stubborn[0]:6.2f} s  vs timeout "
          f"{AGENT_TIMEOUT_S:.0f} s: overhead {stubborn[0] - AGENT_TIMEOUT_S:+.2f} s")
    print("  (target: overhead <= 0.5 s)")


if __name__ == "__main__":
    main()
