"""vm_boot: `mcp deploy` of a unikernel component to its first HTTP answer, vs the same
image launched by hand, for each image builder / machine type:

- initramfs (q35): a Linux kernel + initramfs; the hand side boots the identical
  kernel + initramfs (the image is reproducible and holds no per-deploy settings) with
  the guest config carrying its own port.              target: ratio <= 1.15
- nanos-q35: the hand side writes the same manifest (its own port) with Nanos's mkfs
  and boots the disk with the testbed's q35 command line.   target: ratio <= 1.15
- nanos-microvm: the same, booted with `-kernel kernel.img` on microvm.  target <= 1.3

`mcp deploy` is also set against a minimal click+tomllib client sending the same
definition (common.MINIMAL_CLI), to the first HTTP answer (target <= 1.1x) and
start-up alone (exec to the request's first byte, common.start_up).

Both sides use the same accel, memory, user-mode port forward and the same HTTP poll
(a new attempt every 10 ms, the first answer wins; see ``wait_http``). Rounds
alternate which side goes first; medians of the rounds are compared. The hand side's clock includes
mkfs (Nanos), as an operator's would.
Run: .venv/bin/python bench/vm_boot.py [ROUNDS] [CASE ...]   (cases: initramfs,
nanos-q35, nanos-microvm; default all; $MCP_NANOS_DIR or ../shared/nanos for Nanos)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from common import BIN, MINIMAL_CLI, TOP, Bed, bed, free_port, median, run_cases, start_up

from mcp_node.client import Client

KERNEL = Path(os.environ.get("MCP_KERNEL") or TOP / ".build" / "kernel" / "vmlinuz")
NANOS = Path(os.environ.get("MCP_NANOS_DIR") or TOP.parent / "shared" / "nanos")
MEMORY_MB = 192
CASES = ("initramfs", "nanos-q35", "nanos-microvm")
TARGETS = {"initramfs": 1.15, "nanos-q35": 1.15, "nanos-microvm": 1.3}


def wait_http(port: int, timeout: float = 180.0, every: float = 0.01) -> float:
    """Seconds until GET / answers, from the call.

    A connection to a user-mode forward made before the guest listens is accepted by
    qemu and then hangs, so a poll that waits for one attempt at a time measures its own
    timeout. Instead a new attempt starts every ``every`` seconds, each given up to 2 s,
    and the first answer wins: the figure is right to about ``every``.
    """
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    bufs: dict[socket.socket, bytes] = {}
    try:
        next_at = 0.0
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"nothing answered on port {port} in {timeout:.0f}s")
            if now >= next_at:
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                sel.register(s, selectors.EVENT_WRITE)
                started[s], bufs[s], next_at = now, b"", now + every
            for key, events in sel.select(max(0.0, next_at - time.monotonic())):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    if events & selectors.EVENT_WRITE:
                        s.send(b"GET / HTTP/1.0\r\n\r\n")
                        sel.modify(s, selectors.EVENT_READ)
                        continue
                    chunk = s.recv(65536)
                except OSError:
                    chunk = b""
                bufs[s] += chunk
                if bufs[s].startswith(b"HTTP/1.0 200") and b"\r\n\r\n" in bufs[s]:
                    return time.perf_counter() - t0
                if not chunk:   # refused, reset or closed early: this attempt is over
                    sel.unregister(s)
                    s.close()
                    del started[s], bufs[s]
            for s, at in list(started.items()):
                if time.monotonic() - at > 2.0:
                    sel.unregister(s)
                    s.close()
                    del started[s], bufs[s]
    finally:
        for s in started:
            s.close()
        sel.close()


def qemu_section(case: str) -> str:
    """The bench agent's [qemu] section for a case (accel auto: TCG unless KVM works)."""
    if case == "initramfs":
        return f'[qemu]\nkernel = "{KERNEL}"\n'
    machine = case.removeprefix("nanos-")
    return f'[qemu]\nnanos_dir = "{NANOS}"\nmachine = "{machine}"\n'


def with_qemu(b: Bed, case: str = "initramfs") -> None:
    b.config.write_text(b.config.read_text() + qemu_section(case))


def vm_definition(dirpath: Path, svc: str, image: str, env: str = "MESSAGE=bench") -> Path:
    path = dirpath / f"{svc}.toml"
    path.write_text(f'name = "{svc}"\n[[components]]\nname = "web"\nimage = "{image}"\n'
                    f'runtime = "unikernel"\nmemory_mb = {MEMORY_MB}\nenv = ["{env}"]\n'
                    'restart = "no"\n[[components.routes]]\nport = 8080\n')
    return path


def host_port(b: Bed, svc: str) -> int:
    return port_of(b.mcp("--json", "status", svc).stdout)


def port_of(status_json: str) -> int:
    """The VM's host port from a status (``mcp --json deploy`` prints one)."""
    st = json.loads(status_json)
    st = st[0] if isinstance(st, list) else st
    return int(st["components"][0]["routes"][0]["host_port"])


def deploy(b: Bed, path: Path) -> int:
    """``mcp deploy`` (one CLI process); the VM's host port from its reply."""
    return port_of(b.mcp("--json", "deploy", str(path)).stdout)


def keep_image(b: Bed, svc: str, dest: Path) -> dict[str, object]:
    """Copy the built image (and, for Nanos, the ELF its manifest names) out of the
    agent's state, for the hand launch; returns the VM's meta."""
    vm = b.state / "vms" / f"{svc}-web"
    meta: dict[str, object] = json.loads((vm / "meta.json").read_text())
    if not dest.exists():
        shutil.copytree(vm / "image", dest)
        manifest = dest / "app.manifest"
        if manifest.exists():
            text = manifest.read_text()
            for host in set(re.findall(r"host:(/[^\s)]+)", text)):
                copy = dest / Path(host).name
                shutil.copyfile(host, copy)
                text = text.replace(f"host:{host}", f"host:{copy}")
            manifest.write_text(text)
    return meta


@dataclass
class Hand:
    proc: subprocess.Popen[bytes]
    port: int
    work: Path


def hand_argv(case: str, image: Path, port: int, accel: str, work: Path) -> list[str]:
    """What an operator would type: the same boot, no daemonising or agent plumbing."""
    common = ["qemu-system-x86_64", "-accel", accel, "-m", f"{MEMORY_MB}M", "-smp", "1",
              "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
              "-serial", f"file:{work / 'console.log'}",
              "-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off",
              "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{port}"]
    if case == "initramfs":
        return [*common, "-machine", "q35", "-kernel", str(KERNEL),
                "-initrd", str(image / "initrd.img"),
                "-append", "console=ttyS0 quiet panic=1 rdinit=/init",
                "-fw_cfg", f"name=opt/mcp/config,file={work / 'guest.conf'}",
                "-device", "virtio-net-pci,netdev=n0"]
    disk = str(work / "disk.raw")
    if case == "nanos-q35":   # testbed.md's layout
        return [*common, "-machine", "q35",
                "-device", "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,"
                           "multifunction=on,addr=0x3",
                "-device", "pcie-root-port,port=0x11,chassis=2,id=pci.2,bus=pcie.0,addr=0x3.0x1",
                "-device", "pcie-root-port,port=0x12,chassis=3,id=pci.3,bus=pcie.0,addr=0x3.0x2",
                "-device", "virtio-scsi-pci,bus=pci.2,addr=0x0,id=scsi0",
                "-device", "scsi-hd,bus=scsi0.0,drive=hd0",
                "-drive", f"if=none,id=hd0,format=raw,file={disk}",
                "-device", "virtio-net,bus=pci.3,addr=0x0,netdev=n0"]
    return [*common, "-machine", "microvm,rtc=on,ioapic2=off", "-kernel", str(NANOS / "kernel.img"),
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"if=none,id=hd0,format=raw,file={disk}",
            "-device", "virtio-blk-device,drive=hd0", "-device", "virtio-net-device,netdev=n0"]


def hand_launch(case: str, image: Path, accel: str, work: Path) -> Hand:
    """Prepare the per-launch input (guest config or manifest with this port), build
    the disk with mkfs for Nanos, start qemu. The caller's clock runs across it."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if case == "initramfs":
        conf = (image / "guest.conf").read_text()
        conf = re.sub(r"export PORT=\S+", f"export PORT={port}", conf)
        (work / "guest.conf").write_text(conf)
    else:
        manifest = re.sub(r"\bPORT:[^\s)]+", f"PORT:{port}", (image / "app.manifest").read_text())
        subprocess.run([str(NANOS / "mkfs"), "-b", str(NANOS / "boot.img"),
                        "-k", str(NANOS / "kernel.img"), str(work / "disk.raw")],
                       input=manifest.encode(), stdout=subprocess.DEVNULL, check=True)
    proc = subprocess.Popen(hand_argv(case, image, port, accel, work),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return Hand(proc, port, work)


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def reap_vms(b: Bed) -> None:
    """SIGKILL, by pid, any qemu still running from this bench agent's state."""
    for pidfile in (b.state / "vms").glob("*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            if str(pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)


def start_bed(b: Bed, case: str, image: str = "") -> Client:
    """The agent up with the case's [qemu] section. The one-off KVM probe happens here
    (health asks for the accel), and with ``image`` an untimed deploy extracts its ELF
    once: neither is part of a round (the hand side's ELF is not timed either)."""
    with_qemu(b, case)
    client = b.start_agent()
    subprocess.run([str(BIN / "mcp"), "node", "health"], env=b.env, capture_output=True,
                   check=False, timeout=120)
    if image:
        svc = f"warm{uuid.uuid4().hex[:6]}"
        deploy(b, vm_definition(b.dir, svc, image))
        b.mcp("undeploy", svc)
    return client


def api_body(svc: str, image: str) -> dict[str, object]:
    """The definition ``vm_definition`` writes, as the HTTP API takes it."""
    return {"name": svc, "components": [{
        "name": "web", "image": image, "runtime": "unikernel", "memory_mb": MEMORY_MB,
        "env": ["MESSAGE=bench"], "restart": "no", "routes": [{"port": 8080}]}]}


def run_case(case: str, image: str, rounds: int) -> dict[str, object]:
    """Per round, in a rotating order: `mcp deploy` (a CLI process), the same deploy as
    one HTTP call from this process (the agent's share without the CLI's start-up), the
    least a Python CLI built like ours could cost (common.MINIMAL_CLI), and the hand
    launch."""
    times: dict[str, list[float]] = {"cli": [], "returned": [], "api": [], "minimal": [],
                                     "hand": [], "up_mcp": [], "up_min": []}
    accel = "tcg"
    sides = ("cli", "api", "minimal", "hand")
    with bed(monitor_interval=1.0) as b:
        client = start_bed(b, case, image)
        kept = b.dir / "image"
        hands: list[Hand] = []
        try:
            for i in range(rounds):
                for side in sides[i % 4:] + sides[:i % 4]:
                    svc = f"vb{uuid.uuid4().hex[:6]}"
                    t0 = time.perf_counter()
                    if side == "cli":
                        port = deploy(b, vm_definition(b.dir, svc, image))
                        times["returned"].append(time.perf_counter() - t0)
                    elif side == "minimal":
                        port = port_of(subprocess.run(
                            [str(BIN / "python"), "-c", MINIMAL_CLI, str(b.port),
                             str(b.state / "token"), str(vm_definition(b.dir, svc, image))],
                            check=True, capture_output=True, text=True).stdout)
                    elif side == "api":
                        port = port_of(json.dumps(client.post("/v1/services",
                                                              api_body(svc, image))))
                    else:   # the image kept from the untimed warm-up deploy
                        h = hand_launch(case, kept, accel, b.dir / f"hand{i}")
                        hands.append(h)
                        port = h.port
                    wait_http(port)
                    times[side].append(time.perf_counter() - t0)
                    if side == "hand":
                        kill(h.proc)
                    else:
                        accel = str(keep_image(b, svc, kept)["accel"])
                        b.mcp("undeploy", svc)
                m_up, x_up = start_up(b, vm_definition(b.dir, "vbup", image), 3)
                times["up_mcp"] += m_up
                times["up_min"] += x_up
        finally:
            for h in hands:
                if h.proc.poll() is None:
                    kill(h.proc)
            reap_vms(b)
    return {"case": case, "accel": accel, **times}


def report(r: dict[str, object], rounds: int) -> None:
    case = str(r["case"])
    cli, api, hand, returned, minimal = (list(r[k]) for k in (  # type: ignore[call-overload]
        "cli", "api", "hand", "returned", "minimal"))
    c, a, h, m = median(cli), median(api), median(hand), median(minimal)
    print(f"vm_boot {case} ({r['accel']}, {rounds} rounds, medians)")
    print(f"  mcp deploy -> first HTTP answer   : {c:6.3f} s  {[round(x, 3) for x in cli]}")
    print(f"    of which mcp deploy returned    : {median(returned):6.3f} s")
    print(f"  HTTP API deploy -> first answer   : {a:6.3f} s  {[round(x, 3) for x in api]}")
    print(f"  minimal Python CLI -> first answer: {m:6.3f} s  {[round(x, 3) for x in minimal]}")
    print(f"  by hand -> first HTTP answer      : {h:6.3f} s  {[round(x, 3) for x in hand]}")
    print(f"  ratio mcp deploy / by hand        : {c / h:6.3f}  (target <= {TARGETS[case]})")
    print(f"  ratio HTTP API deploy / by hand   : {a / h:6.3f}")
    print(f"  ratio minimal Python CLI / by hand: {m / h:6.3f}  (the floor for a click CLI)")
    print(f"  ratio mcp deploy / minimal CLI    : {c / m:6.3f}  (target <= 1.1)")
    up_mcp, up_min = (median(list(r[k])) for k in ("up_mcp", "up_min"))  # type: ignore[call-overload]
    print(f"  start-up, exec to the request's first byte: mcp --json deploy "
          f"{up_mcp * 1000:.1f} ms, minimal {up_min * 1000:.1f} ms = {up_mcp / up_min:.2f}x")


def main() -> None:
    run_cases(CASES, run_case, report)


if __name__ == "__main__":
    main()
