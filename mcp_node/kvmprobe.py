"""Whether KVM really runs guests on this host, and so which accel VMs get.

``/dev/kvm`` opening is not enough (on the test machines it opens, yet guests print
nothing under KVM), so the probe boots something: stage 1 a tiny multiboot stub that
writes a mark to COM1; stage 2, when a Linux kernel and busybox-static are at hand, that
kernel with a busybox initramfs, because on some hosts the stub runs under KVM while
Linux never prints a line. The verdict is cached on disk for a day per qemu binary,
kernel and host kernel release (a failing probe costs up to ~20 s).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from .cpio import Cpio
from .files import atomic_write

log = logging.getLogger(__name__)

PROBE_MARK = b"MCP-KVM-PROBE-OK"
CACHE_TTL_S = 86400.0


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



# -- the cached verdict --------------------------------------------------------------------------

def _stamp(p: str | Path | None) -> str:
    try:
        st = os.stat(p) if p else None
    except OSError:
        st = None
    return f"{p}:{st.st_mtime_ns}:{st.st_size}" if st else f"{p}:-"


def probe_kvm_cached(cache: Path, binary: str, kernel: Path | None,
                     busybox: Path | None) -> tuple[bool, str]:
    """``probe_kvm``, its verdict kept in ``cache`` (JSON) for a day per qemu binary,
    kernel and host kernel release."""
    key = "|".join((_stamp(binary), _stamp(kernel), os.uname().release))
    cached: object = None
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
    if (isinstance(cached, dict) and cached.get("key") == key
            and time.time() - float(cached.get("at", 0)) < CACHE_TTL_S):
        return bool(cached.get("ok")), str(cached.get("why", ""))
    ok, why = probe_kvm(binary, kernel=kernel, busybox=busybox)
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps({"key": key, "ok": ok, "why": why, "at": time.time()},
                                       sort_keys=True).encode())
    return ok, why


def choose_accel(configured: str, cache: Path, binary: str, kernel: Path | None,
                 busybox: Path | None) -> str:
    """``kvm`` or ``tcg`` as configured; for ``auto``, kvm only if the probe boots."""
    if configured != "auto":
        return configured
    ok, why = probe_kvm_cached(cache, binary, kernel, busybox)
    if not ok:
        log.warning("qemu: KVM is not usable (%s); VMs run under TCG, slowly", why)
    return "kvm" if ok else "tcg"
