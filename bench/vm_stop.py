"""vm_stop: `mcp stop` of a unikernel VM vs what the guest itself needs, per case:

- initramfs and nanos-q35 (cooperative guest): the guest's own shutdown is measured on a
  hand-launched VM of the same image (QMP system_powerdown sent directly, until the qemu
  process exits). Against it: `mcp stop` (a fresh CLI process) and the bare HTTP stop
  call to the agent.                                  target: overhead <= 0.3 s
  Also, once, a guest that ignores SIGTERM (IGNORE_SIGTERM=1: the program ignores the
  power button's SIGTERM, so the guest never powers off): `mcp stop` vs the agent's
  10 s timeout.
- nanos-microvm: the guest cannot power itself off, so it is not waited for. Against
  `mcp stop`: by hand, QMP system_powerdown then quit, until qemu exits.
                                                      target: mcp stop <= 0.5 s
Run: .venv/bin/python bench/vm_stop.py [ROUNDS] [CASE ...]   (cases as vm_boot's)
"""

from __future__ import annotations

import time
import uuid

from common import bed, median, run_cases
from vm_boot import (
    CASES,
    Hand,
    deploy,
    hand_launch,
    host_port,
    keep_image,
    kill,
    reap_vms,
    start_bed,
    wait_http,
)
from vm_boot import vm_definition as definition

from mcp_node import qmp
from mcp_node.client import Client

AGENT_TIMEOUT_S = 10.0   # the agent's stop timeout per component


def qmp_stop(h: Hand, quit_after_powerdown: bool) -> float:
    """By hand: system_powerdown (then quit, for a guest that cannot power off) until
    the qemu process exits."""
    wait_http(h.port)
    t0 = time.perf_counter()
    qmp.execute(h.work / "qmp.sock", "system_powerdown")
    if quit_after_powerdown:
        qmp.execute(h.work / "qmp.sock", "quit")
    h.proc.wait(timeout=60)
    return time.perf_counter() - t0


def run_case(case: str, image: str, rounds: int) -> dict[str, object]:
    micro = case == "nanos-microvm"
    own: list[float] = []
    cli: list[float] = []
    api: list[float] = []
    stubborn: list[float] = []
    accel = "tcg"
    with bed(monitor_interval=1.0) as b:
        client: Client = start_bed(b, case)
        kept = b.dir / "image"
        hands: list[Hand] = []
        try:
            for i in range(rounds):
                svc = f"vs{uuid.uuid4().hex[:6]}"
                wait_http(deploy(b, definition(b.dir, svc, image, "MESSAGE=coop")))
                accel = str(keep_image(b, svc, kept)["accel"])
                t0 = time.perf_counter()
                b.mcp("stop", svc)
                cli.append(time.perf_counter() - t0)
                b.mcp("start", svc)
                wait_http(host_port(b, svc))
                t0 = time.perf_counter()
                client.post(f"/v1/services/{svc}/stop", {})
                api.append(time.perf_counter() - t0)
                b.mcp("undeploy", svc)
                h = hand_launch(case, kept, accel, b.dir / f"hand{i}")
                hands.append(h)
                own.append(qmp_stop(h, quit_after_powerdown=micro))
            if not micro:
                svc = f"vs{uuid.uuid4().hex[:6]}"
                wait_http(deploy(b, definition(b.dir, svc, image, "IGNORE_SIGTERM=1")))
                t0 = time.perf_counter()
                b.mcp("stop", svc)
                stubborn.append(time.perf_counter() - t0)
                b.mcp("undeploy", svc)
        finally:
            for h in hands:
                if h.proc.poll() is None:
                    kill(h.proc)
            reap_vms(b)
    return {"case": case, "accel": accel, "own": own, "cli": cli, "api": api,
            "stubborn": stubborn}


def fmt(xs: list[float]) -> str:
    return str([round(x, 3) for x in xs])


def report(r: dict[str, object], rounds: int) -> None:
    own, cli, api, stubborn = (list(r[k]) for k in ("own", "cli", "api", "stubborn"))  # type: ignore[call-overload]
    g, c, a = median(own), median(cli), median(api)
    print(f"vm_stop {r['case']} ({r['accel']}, {rounds} rounds, medians)")
    if r["case"] == "nanos-microvm":
        print(f"  by hand: powerdown + quit -> qemu exit : {g:6.3f} s  {fmt(own)}")
        print(f"  mcp stop (CLI process)                 : {c:6.3f} s  {fmt(cli)}"
              f"  (target <= 0.5 s; {c - g:+.3f} s vs by hand)")
        print(f"  stop via the HTTP API                  : {a:6.3f} s  {fmt(api)}")
        return
    print(f"  guest's own shutdown (powerdown -> exit): {g:6.3f} s  {fmt(own)}")
    print(f"  mcp stop (CLI process)                  : {c:6.3f} s  overhead {c - g:+.3f} s"
          f"  {fmt(cli)}  (target <= +0.3 s)")
    print(f"  stop via the HTTP API                   : {a:6.3f} s  overhead {a - g:+.3f} s"
          f"  {fmt(api)}")
    if stubborn:
        print(f"  guest ignoring SIGTERM, mcp stop        : {stubborn[0]:6.3f} s  vs timeout "
              f"{AGENT_TIMEOUT_S:.0f} s: overhead {stubborn[0] - AGENT_TIMEOUT_S:+.3f} s")


def main() -> None:
    run_cases(CASES, run_case, report)


if __name__ == "__main__":
    main()
