"""qmp_calls: the runtime's QMP wrapper (qemu.qmp's QEMUMonitorProtocol) against the
plain-socket client it replaced (kept below as the baseline), same run, same qemu.

1. First call in a fresh process that has already loaded the agent's modules (what the
   first VM start or stop after an agent start pays: asyncio and qemu.qmp load then),
   and the RSS that loading adds. Fresh processes take turns.
2. Steady per-call cost: ``query-status`` against one paused qemu, the two clients
   taking turns, median of N each.
3. What a VM stop pays for it: the runtime makes one call per power-button press
   (one a second) and one ``quit``; on microvm that is two calls.

Run: .venv/bin/python bench/qmp_calls.py [ROUNDS] [CALLS]
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TOP, median

from mcp_node import qmp


def plain_execute(socket_path: Path, command: str, timeout: float = 3.0) -> Any:
    """The previous mcp_node.qmp: JSON lines over a blocking socket with a deadline."""
    dirfd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            deadline = time.monotonic() + timeout
            s.settimeout(timeout)
            s.connect(f"/proc/self/fd/{dirfd}/{socket_path.name}")
            buf = b""

            def recv() -> dict[str, Any]:
                nonlocal buf
                while b"\n" not in buf:
                    s.settimeout(max(deadline - time.monotonic(), 0.001))
                    chunk = s.recv(65536)
                    if not chunk:
                        raise EOFError
                    buf += chunk
                ln, _, buf = buf.partition(b"\n")
                return dict(json.loads(ln))

            def call(cmd: str) -> Any:
                s.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
                while True:
                    msg = recv()
                    if "return" in msg:
                        return msg["return"]
                    if "error" in msg:
                        raise RuntimeError(msg["error"])

            assert "QMP" in recv()
            call("qmp_capabilities")
            return call(command)
    finally:
        os.close(dirfd)


FIRST_CALL = """
import os, sys, time
sys.path[:0] = [{top!r}, {bench!r}]
import mcp_node.agent, mcp_node.qemu, mcp_node.server   # what an agent has loaded
from pathlib import Path
from mcp_node import qmp
from qmp_calls import plain_execute
from common import rss_kb
which, sock = sys.argv[1], Path(sys.argv[2])
rss0 = rss_kb(os.getpid())
t0 = time.perf_counter()
if which == "qemu.qmp":
    qmp.execute(sock, "query-status")
else:
    plain_execute(sock, "query-status")
print(time.perf_counter() - t0, rss_kb(os.getpid()) - rss0)
"""


def paused_qemu(work: Path) -> int:
    subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "32",
                    "-nodefaults", "-no-user-config", "-display", "none", "-S",
                    "-daemonize", "-pidfile", "qemu.pid",
                    "-qmp", "unix:qmp.sock,server=on,wait=off"],
                   cwd=work, check=True, capture_output=True, timeout=60)
    return int((work / "qemu.pid").read_text())


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    work = Path(tempfile.mkdtemp(prefix="mcp-bench-qmp-"))
    pid = paused_qemu(work)
    sock = work / "qmp.sock"
    try:
        script = FIRST_CALL.format(top=str(TOP), bench=str(Path(__file__).parent))
        first: dict[str, list[float]] = {"plain": [], "qemu.qmp": []}
        rss: dict[str, list[float]] = {"plain": [], "qemu.qmp": []}
        for r in range(rounds):
            for which in (("plain", "qemu.qmp") if r % 2 == 0 else ("qemu.qmp", "plain")):
                out = subprocess.run([sys.executable, "-c", script, which, str(sock)],
                                     check=True, capture_output=True, text=True, timeout=60)
                t, kb = out.stdout.split()
                first[which].append(float(t))
                rss[which].append(float(kb))
        per: dict[str, list[float]] = {"plain": [], "qemu.qmp": []}
        for i in range(calls):
            for which in (("plain", "qemu.qmp") if i % 2 == 0 else ("qemu.qmp", "plain")):
                t0 = time.perf_counter()
                if which == "plain":
                    plain_execute(sock, "query-status")
                else:
                    qmp.execute(sock, "query-status")
                per[which].append(time.perf_counter() - t0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    fp, fq = median(first["plain"]), median(first["qemu.qmp"])
    cp, cq = median(per["plain"]), median(per["qemu.qmp"])
    print(f"first call in an agent-like process: plain {fp * 1000:.1f} ms, "
          f"qemu.qmp {fq * 1000:.1f} ms (+{(fq - fp) * 1000:.1f} ms, once per agent process); "
          f"RSS +{median(rss['plain']):.0f} KiB vs +{median(rss['qemu.qmp']):.0f} KiB")
    print(f"per call (median of {calls}): plain {cp * 1000:.2f} ms, qemu.qmp "
          f"{cq * 1000:.2f} ms ({cq / cp:.2f}x, +{(cq - cp) * 1000:.2f} ms)")
    print(f"microvm stop (power button + quit, 2 calls): +{2 * (cq - cp) * 1000:.2f} ms; "
          f"a q35 stop adds that per power-button second")


if __name__ == "__main__":
    main()
