"""reboot: after a "reboot" (agent killed, every container stopped), the time from
starting ``mcp-agent`` to every component answering HTTP, against ``podman start`` of
the same containers by hand in the same run.                      target: ratio <= 1.3

20 container services of one component each. Each round stops all containers with
``podman stop -t 0`` (what a reboot leaves: containers that exist, not running),
then either starts the agent (its first monitor round reconciles: starts each stopped
container as it is) or runs one ``podman start`` with every name; both clocks stop when
the last port answers, polled the same way. Rounds alternate which side goes first;
medians are compared. With ``../shared/nanos`` present (or $MCP_NANOS_DIR), 2 Nanos VMs
(q35, TCG) are added: the reboot kills their qemu too; the hand side relaunches each
with the exact command line the agent had used (read from /proc before the first kill).

It also prints the podman REST calls per monitor interval while nothing differs:
reconcile must add nothing to the monitor's one listing per runtime.
Run: .venv/bin/python bench/reboot.py [ROUNDS] [SERVICES]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from common import TOP, Bed, bed, hello_image, median

from mcp_node.client import Client

INTERVAL_S = 1.0
POLL_S = 0.01
NANOS = Path(os.environ.get("MCP_NANOS_DIR") or TOP.parent / "shared" / "nanos")
VMS = 2 if (NANOS / "kernel.img").exists() else 0
HAND_VMS: list[list[str]] = []   # the agent's qemu command lines, relaunched by hand


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(1.0)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def wait_all(ports: list[int], t0: float, timeout: float = 120.0) -> float:
    pending = set(ports)
    while pending:
        pending = {p for p in pending if not answers(p)}
        if pending:
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"ports {sorted(pending)} never answered")
            time.sleep(POLL_S)
    return time.perf_counter() - t0


def podman(*args: str) -> None:
    subprocess.run(["podman", *args], check=True, capture_output=True)


def reboot(b: Bed, names: list[str], ports: list[int]) -> None:
    """Kill the agent, stop every container; nothing answers afterwards."""
    if b.daemon is not None and b.daemon.proc is not None and b.daemon.proc.poll() is None:
        b.daemon.kill()
    podman("stop", "-t", "0", *names)
    pids = []
    for pidfile in (b.state / "vms").glob("*/qemu.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            if len(HAND_VMS) < VMS:   # the agent's own command line, kept once
                raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
                # Without -S: the agent starts it paused and resumes it over QMP.
                HAND_VMS.append([a.decode() for a in raw if a != b"-S"])
            os.kill(pid, 9)
            pids.append(pid)
        except (OSError, ValueError):
            continue
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() and b"Z" not in _stat(p) for p in pids):
        if time.monotonic() > deadline:
            raise SystemExit(f"qemu {pids} did not die")
        time.sleep(0.02)
    assert not any(answers(p) for p in ports)


def _stat(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1][:3]
    except OSError:
        return b"Z"


def agent_side(b: Bed, names: list[str], ports: list[int]) -> float:
    reboot(b, names, ports)
    t0 = time.perf_counter()
    b.start_agent()
    return wait_all(ports, t0)


def hand_side(b: Bed, names: list[str], ports: list[int]) -> float:
    reboot(b, names, ports)
    t0 = time.perf_counter()
    # In the VM's directory, as the agent runs it (its QMP socket path is relative).
    vms = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            cwd=Path(argv[argv.index("-pidfile") + 1]).parent)
           for argv in HAND_VMS]
    podman("start", *names)
    try:
        took = wait_all(ports, t0)
    except SystemExit:
        for proc in vms:
            print(proc.args, proc.poll(), proc.stderr.read() if proc.stderr and
                  proc.poll() is not None else b"", file=sys.stderr)
        raise
    for proc in vms:   # a daemonising qemu has exited already; its VM is killed in reboot()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return took


def calls_per_interval(b: Bed, client: Client, rounds: int = 5) -> float:
    """Podman REST calls per monitor round once converged (health's runtime info)."""
    def snap() -> tuple[int, int]:
        info = client.get("/v1/health")["runtimes"]["container"]
        return int(info["api_calls"]), int(info["listings"])

    time.sleep(2 * INTERVAL_S)   # let the reconcile after start settle
    c0, l0 = snap()
    time.sleep(rounds * INTERVAL_S + INTERVAL_S / 2)
    c1, l1 = snap()
    if l1 == l0:
        raise SystemExit("no monitor round ran")
    return (c1 - c0) / (l1 - l0)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    image = hello_image("v1")
    qemu = f'[qemu]\nnanos_dir = "{NANOS}"\nmachine = "q35"\naccel = "tcg"\n' if VMS else ""
    with bed(INTERVAL_S, qemu) as b:
        client = b.start_agent()
        tag = uuid.uuid4().hex[:6]
        names, ports = [], []
        for i in range(VMS):
            st = client.post("/v1/services", {"name": f"rv{tag}-{i}", "components": [
                {"name": "web", "image": image, "runtime": "unikernel", "memory_mb": 256,
                 "routes": [{"port": 8080}]}]})
            ports.append(int(st["components"][0]["routes"][0]["host_port"]))
        for i in range(count):
            st = client.post("/v1/services", {"name": f"rb{tag}-{i}", "components": [
                {"name": "web", "image": image, "routes": [{"port": 8080}]}]})
            names.append(f"mcp-rb{tag}-{i}-web")
            ports.append(int(st["components"][0]["routes"][0]["host_port"]))
        wait_all(ports, time.perf_counter())
        agent: list[float] = []
        hand: list[float] = []
        for r in range(rounds):
            order = (agent_side, hand_side) if r % 2 == 0 else (hand_side, agent_side)
            for side in order:
                t = side(b, names, ports)
                (agent if side is agent_side else hand).append(t)
                print(f"round {r} {side.__name__}: {t:.2f}s", flush=True)
        if b.daemon is None or b.daemon.proc is None or b.daemon.proc.poll() is not None:
            client = b.start_agent()
        else:
            client = Client(b.url, (b.state / "token").read_text().strip())
        wait_all(ports, time.perf_counter())
        per = calls_per_interval(b, client)
        ratio = median(agent) / median(hand)
        print(f"{count} containers + {VMS} Nanos VMs: agent start -> all answering "
              f"{median(agent):.2f}s, podman start (+ qemu) by hand {median(hand):.2f}s "
              f"(medians of {rounds}); "
              f"ratio {ratio:.2f}x (target <= 1.3)")
        print(f"podman REST calls per monitor interval with nothing to do: {per:.2f} "
              f"(the monitor's one listing = 1.00)")


if __name__ == "__main__":
    main()
