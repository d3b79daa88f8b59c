"""vm_boot: `mcp deploy` of a unikernel component to its first HTTP answer, vs the same
built image launched with a hand-written qemu command line (target: ratio <= 1.15).

Both sides boot the identical kernel + initramfs (the image is reproducible and holds no
per-deploy settings) with the same accel, memory and user-mode port forward; the hand
side gets the guest config with its own port. Rounds alternate which side goes first.
Absolute figures are printed too: under TCG a Linux kernel + initramfs answers after
roughly 9-10 s here, so the ratio is dominated by the guest's boot.
Run: .venv/bin/python bench/vm_boot.py [ROUNDS]
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from common import TOP, Bed, bed, free_port, hello_image, median

KERNEL = Path(os.environ.get("MCP_KERNEL") or TOP / ".build" / "kernel" / "vmlinuz")


def wait_http(port: int, timeout: float = 180.0) -> float:
    """Seconds until GET / answers (polling every 20 ms), from the call."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                r.read()
                return time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def with_qemu(b: Bed) -> None:
    """Point the bench agent at the kernel, TCG unless KVM really works (auto)."""
    b.config.write_text(b.config.read_text() + f'[qemu]\nkernel = "{KERNEL}"\n')


def vm_definition(dirpath: Path, svc: str, image: str, env: str = "MESSAGE=bench") -> Path:
    path = dirpath / f"{svc}.toml"
    path.write_text(f'name = "{svc}"\n[[components]]\nname = "web"\nimage = "{image}"\n'
                    f'runtime = "unikernel"\nmemory_mb = 192\nenv = ["{env}"]\n'
                    '[[components.routes]]\nport = 8080\n')
    return path


def host_port(b: Bed, svc: str) -> int:
    st = json.loads(b.mcp("--json", "status", svc).stdout)
    return int(st["components"][0]["routes"][0]["host_port"])


def keep_image(b: Bed, svc: str, dest: Path) -> dict[str, object]:
    """Copy the built image and its meta out of the agent's state (for the hand launch)."""
    vm = b.state / "vms" / f"{svc}-web"
    if not dest.exists():
        shutil.copytree(vm / "image", dest)
    meta: dict[str, object] = json.loads((vm / "meta.json").read_text())
    return meta


def hand_argv(image: Path, port: int, accel: str, memory_mb: int, work: Path) -> list[str]:
    """What an operator would type: the same boot, no daemonising or agent plumbing."""
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-m", f"{memory_mb}M",
            "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(KERNEL), "-initrd", str(image / "initrd.img"),
            "-append", "console=ttyS0 quiet panic=1 rdinit=/init",
            "-fw_cfg", f"name=opt/mcp/config,file={work / 'guest.conf'}",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{port}",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{work / 'console.log'}",
            "-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off"]


def hand_launch(image: Path, accel: str, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = (image / "guest.conf").read_text()
    conf = "\n".join(f"  export PORT={port}" if line.strip().startswith("export PORT=") else line
                     for line in conf.splitlines()) + "\n"
    (work / "guest.conf").write_text(conf)
    proc = subprocess.Popen(hand_argv(image, port, accel, 192, work),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, port


def reap_vms(b: Bed) -> None:
    """SIGKILL, by pid, any qemu still running from this bench agent's state (the bed only
    cleans up containers)."""
    for pidfile in (b.state / "vms").glob("*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            if str(pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    image = hello_image()
    with bed(monitor_interval=1.0) as b:
        with_qemu(b)
        b.start_agent()
        b.mcp("node", "health")   # the one-off KVM probe happens here, not in a round
        deploy_t, deploy_ret_t, hand_t = [], [], []
        kept = b.dir / "image"
        accel = "tcg"
        hand_procs: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(rounds):
                order = ("agent", "hand") if i % 2 == 0 else ("hand", "agent")
                for side in order:
                    if side == "agent":
                        svc = f"vb{uuid.uuid4().hex[:6]}"
                        path = vm_definition(b.dir, svc, image)
                        t0 = time.perf_counter()
                        b.mcp("deploy", str(path))
                        deploy_ret_t.append(time.perf_counter() - t0)
                        wait_http(host_port(b, svc))
                        deploy_t.append(time.perf_counter() - t0)
                        meta = keep_image(b, svc, kept)
                        accel = str(meta["accel"])
                        b.mcp("undeploy", svc)
                    else:   # round 0 runs the agent first, so the image is kept by now
                        t0 = time.perf_counter()
                        proc, port = hand_launch(kept, accel, b.dir / f"hand{i}")
                        hand_procs.append(proc)
                        wait_http(port)
                        hand_t.append(time.perf_counter() - t0)
                        kill(proc)
        finally:
            for p in hand_procs:
                if p.poll() is None:
                    kill(p)
            reap_vms(b)
    d, h = median(deploy_t), median(hand_t)
    print(f"vm_boot ({accel}, {rounds} rounds, medians)")
    print(f"  mcp deploy -> first HTTP answer : {d:6.2f} s  {[round(x, 2) for x in deploy_t]}")
    print(f"    of which mcp deploy returned  : {median(deploy_ret_t):6.2f} s "
          "(pull + build + launch)")
    print(f"  hand-written qemu -> first HTTP : {h:6.2f} s  {[round(x, 2) for x in hand_t]}")
    print(f"  ratio                            : {d / h:6.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
