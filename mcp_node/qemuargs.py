"""Pure pieces of the unikernel runtime: the qemu command line per device layout,
the KVM probe, host resources, console rotation.

Names reach argv only after validation, and every path inside a
``key=value,...`` option has its commas doubled (QEMU's escape), so neither a
comma nor a leading ``-`` can inject an option.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .initramfs import Cpio, volume_tag
from .vmimage import BootPlan

log = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,130}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
PROBE_MARK = b"MCP-KVM-PROBE-OK"


@dataclass(frozen=True)
class VMParams:
    binary: str
    name: str                 # mcp-<service>-<component>
    machine: str              # q35 | microvm
    accel: str                # kvm | tcg
    memory_mb: int
    vcpus: int
    pidfile: str
    qmp: str                  # socket path, relative to qemu's cwd (the VM dir)
    console: str
    ports: tuple[int, ...]
    mac: str
    plan: BootPlan


def esc(value: str) -> str:
    """A value inside a QEMU ``a=b,c=d`` option: commas doubled."""
    return value.replace(",", ",,")


def mac_for(service: str, component: str) -> str:
    """Deterministic, locally administered (QEMU's 52:54:00 prefix) per service/component."""
    h = hashlib.sha256(f"{service}/{component}".encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def machine_opt(machine: str, nanos: bool) -> str:
    if machine == "q35":
        return "q35"
    if machine == "microvm":
        # Nanos never boots on microvm without ioapic2=off (testbed.md).
        return "microvm,rtc=on,ioapic2=off" if nanos else "microvm,rtc=on"
    raise ValueError(f"machine {machine!r}")


def _devices(p: VMParams) -> list[str]:
    plan = p.plan
    micro = p.machine == "microvm"
    net = f"netdev=n0,mac={p.mac}"
    args: list[str] = []
    if plan.nanos and not micro:
        args += [
            "-device", "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,"
                       "multifunction=on,addr=0x3",
            "-device", "pcie-root-port,port=0x11,chassis=2,id=pci.2,bus=pcie.0,addr=0x3.0x1",
            "-device", "pcie-root-port,port=0x12,chassis=3,id=pci.3,bus=pcie.0,addr=0x3.0x2",
            "-device", "virtio-scsi-pci,bus=pci.2,addr=0x0,id=scsi0",
            "-device", "scsi-hd,bus=scsi0.0,drive=hd0",
            "-drive", f"if=none,id=hd0,format=raw,file={esc(plan.disk)}",
            "-device", f"virtio-net,bus=pci.3,addr=0x0,{net}",
        ]
    elif plan.nanos:
        args += [
            "-kernel", plan.kernel,
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"if=none,id=hd0,format=raw,file={esc(plan.disk)}",
            "-device", "virtio-blk-device,drive=hd0",
            "-device", f"virtio-net-device,{net}",
        ]
    else:
        args += ["-kernel", plan.kernel, "-initrd", plan.initrd, "-append", plan.append]
        for name, path in plan.fw_cfg:
            args += ["-fw_cfg", f"name={esc(name)},file={esc(path)}"]
        args += ["-device", f"{'virtio-net-device' if micro else 'virtio-net-pci'},{net}"]
        for i, v in enumerate(plan.volumes):
            ro = ",readonly=on" if v.readonly else ""
            args += ["-fsdev", f"local,id=fs{i},path={esc(v.host)},security_model=none{ro}",
                     "-device", f"{'virtio-9p-device' if micro else 'virtio-9p-pci'},"
                                f"fsdev=fs{i},mount_tag={volume_tag(i)}"]
    return args


def qemu_argv(p: VMParams) -> list[str]:
    """The whole qemu command line for one VM (daemonised, pidfile, QMP, console)."""
    if not SAFE_NAME.fullmatch(p.name):
        raise ValueError(f"unsafe VM name {p.name!r}")
    if not MAC_RE.fullmatch(p.mac):
        raise ValueError(f"bad MAC {p.mac!r}")
    if p.accel not in ("kvm", "tcg"):
        raise ValueError(f"accel {p.accel!r}")
    if any(not isinstance(x, int) or not 1 <= x <= 65535 for x in p.ports):
        raise ValueError(f"bad ports {p.ports!r}")
    if p.memory_mb <= 0 or p.vcpus <= 0:
        raise ValueError("memory and vCPUs must be positive")
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{port}-:{port}" for port in p.ports)
    argv = [
        p.binary,
        "-name", f"guest={p.name}",
        "-machine", machine_opt(p.machine, p.plan.nanos),
        "-accel", p.accel,
        "-m", f"{p.memory_mb}M",
        "-smp", str(p.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-daemonize", "-pidfile", p.pidfile,
        "-qmp", f"unix:{esc(p.qmp)},server=on,wait=off",
        "-chardev", f"file,id=con0,path={esc(p.console)},append=on",
        "-serial", "chardev:con0",
        "-netdev", f"user,id=n0{fwd}",
        *_devices(p),
    ]
    for a in argv[1:]:
        if a.startswith("-") and a not in _OPTIONS:
            raise ValueError(f"unexpected option-like argument {a!r}")
    return argv


_OPTIONS = {"-name", "-machine", "-accel", "-m", "-smp", "-nodefaults", "-no-user-config",
            "-display", "-no-reboot", "-daemonize", "-pidfile", "-qmp", "-chardev", "-serial",
            "-netdev", "-device", "-drive", "-kernel", "-initrd", "-append", "-fw_cfg",
            "-fsdev", "-global"}


# -- KVM probe -----------------------------------------------------------------------------------

def probe_image() -> bytes:
    """A multiboot (a.out kludge) stub that writes PROBE_MARK to COM1 and halts."""
    load = 0x100000
    code = b"\x66\xba\xf8\x03"                       # mov dx, 0x3f8
    for ch in PROBE_MARK + b"\n":
        code += b"\xb0" + bytes([ch]) + b"\xee"      # mov al, ch; out dx, al
    code += b"\xfa\xf4\xeb\xfc"                      # cli; hlt; jmp back to cli
    size = 32 + len(code)
    magic, flags = 0x1BADB002, 0x00010000
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
                         load, load, load + size, load + size, load + 32)
    return header + code


def probe_argv(binary: str, accel: str, image: str) -> list[str]:
    return [binary, "-machine", "q35", "-accel", accel, "-m", "32", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", image]


def probe_initramfs(busybox: bytes) -> bytes:
    """An initramfs whose /init prints PROBE_MARK on the console and powers off."""
    a = Cpio()
    for d in ("bin", "dev", "proc"):
        a.dir(d)
    a.chardev("dev/console", 5, 1)
    a.file("bin/busybox", busybox, 0o755)
    a.file("init", b"#!/bin/busybox sh\n/bin/busybox echo " + PROBE_MARK +
           b" > /dev/console\n/bin/busybox poweroff -f\n", 0o755)
    return gzip.compress(a.finish(), mtime=0)


def kernel_probe_argv(binary: str, accel: str, kernel: str, initrd: str) -> list[str]:
    return [binary, "-machine", "q35", "-accel", accel, "-m", "128", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 quiet panic=-1"]


def boot_prints_mark(argv: list[str], timeout: float) -> tuple[bool, str]:
    """Run ``argv`` (serial on stdout) until PROBE_MARK shows or ``timeout``; always killed."""
    log.info("run (kvm probe): %s", " ".join(argv))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        while PROBE_MARK not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=5)
    if PROBE_MARK in out:
        return True, ""
    detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return False, f"printed nothing within {timeout:.0f}s ({detail[0]})"


def probe_kvm(binary: str, timeout: float = 3.0, kernel: Path | None = None,
              busybox: Path | None = None, kernel_timeout: float = 15.0) -> tuple[bool, str]:
    """KVM is usable only if guests really run under it. Stage 1 boots a tiny stub; stage 2
    (when a kernel is given) boots that Linux kernel to a busybox /init, because on some
    hosts the stub runs under KVM while Linux never prints a line (measured here)."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    if not shutil.which(binary) and not os.access(binary, os.X_OK):
        return False, f"{binary} not found"
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "probe.bin"
        img.write_bytes(probe_image())
        ok, why = boot_prints_mark(probe_argv(binary, "kvm", str(img)), timeout)
        if not ok:
            return False, f"probe stub under KVM {why}"
        if kernel is None or busybox is None:
            return True, ""
        initrd = Path(tmp) / "probe.cpio.gz"
        initrd.write_bytes(probe_initramfs(busybox.read_bytes()))
        ok, why = boot_prints_mark(
            kernel_probe_argv(binary, "kvm", str(kernel), str(initrd)), kernel_timeout)
        return (True, "") if ok else (False, f"kernel {kernel} under KVM {why}")


# -- host ----------------------------------------------------------------------------------------

def host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def host_cpus() -> int:
    return os.cpu_count() or 1


def console_rotate(path: Path, max_bytes: int) -> bool:
    """Copy-truncate rotation to ``<path>.1`` once the log passes ``max_bytes``.

    qemu holds the file open with O_APPEND, so truncating in place is safe:
    its next write lands at the new end. Never truncated otherwise. Serialised:
    the monitor's listing and an API inspect may rotate at once, and a second
    copy-truncate would drop what qemu wrote in between (or trip on the temp file).
    """
    with _rotate_lock:
        try:
            if path.stat().st_size <= max_bytes:
                return False
        except FileNotFoundError:
            return False
        rotated = path.with_name(path.name + ".1")
        tmp = path.with_name(path.name + ".1.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, rotated)
        with path.open("r+b") as f:
            f.truncate(0)
    log.info("console %s rotated at %d bytes", path, max_bytes)
    return True


_rotate_lock = threading.Lock()
