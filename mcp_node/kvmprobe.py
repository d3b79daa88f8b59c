"""Whether KVM really runs guests on this host, and so which accel VMs get.

``/dev/kvm`` opening is not enough (on the test machines it opens, yet guests print
nothing under KVM), so the probe boots something: stage 1 a tiny multiboot stub that
writes a mark to COM1; stage 2 a real guest of the node's builder (a Linux kernel with a
busybox initramfs, or a Nanos image whose program prints the mark), because on some
hosts the stub runs under KVM while real guests never print a line. The verdict is
cached on disk for a day per qemu binary, probe guest and host kernel release (a failing
probe costs up to ~20 s).
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
from collections.abc import Callable
from dataclasses import dataclass
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
    """Run ``argv`` (serial on stdout) until PROBE_MARK shows, qemu reports a KVM internal
    error or exits, or ``timeout``; always killed."""
    log.info("run (kvm probe): %s", " ".join(argv))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = err = b""
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None and proc.stderr is not None
        open_fds = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
        while (PROBE_MARK not in out and b"internal error" not in err and open_fds
               and time.monotonic() < deadline):
            ready, _, _ = select.select(list(open_fds), [], [], 0.1)
            for fd in ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    del open_fds[fd]
                elif open_fds[fd] == "out":
                    out += chunk
                else:
                    err += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    if PROBE_MARK in out:
        return True, ""
    lines = err.decode(errors="replace").strip().splitlines()
    detail = next((x for x in lines if "internal error" in x), lines[-1] if lines else "")
    return False, f"did not print the mark within {timeout:.0f}s ({detail or 'no output'})"


@dataclass(frozen=True)
class GuestProbe:
    """Stage 2: a real guest of the node's builder that prints PROBE_MARK on its serial
    console. ``argv(tmp, binary, accel)`` writes what it needs into ``tmp``."""

    key: str                                        # identifies it in the verdict cache
    argv: Callable[[Path, str, str], list[str]]
    timeout: float = 15.0


def linux_guest(kernel: Path, busybox: Path) -> GuestProbe:
    """The initramfs builder's guest: that Linux kernel to a busybox /init."""
    def argv(tmp: Path, binary: str, accel: str) -> list[str]:
        initrd = tmp / "probe.cpio.gz"
        initrd.write_bytes(probe_initramfs(busybox.read_bytes()))
        return kernel_probe_argv(binary, accel, str(kernel), str(initrd))

    return GuestProbe(f"linux:{_stamp(kernel)}", argv)


def probe_elf() -> bytes:
    """A static x86-64 Linux ELF that writes PROBE_MARK to stdout and exits."""
    msg = PROBE_MARK + b"\n"
    base, head = 0x400000, 64 + 56
    code = (b"\xb8\x01\x00\x00\x00"                      # mov eax, 1 (write)
            b"\xbf\x01\x00\x00\x00"                      # mov edi, 1
            b"\x48\x8d\x35" + struct.pack("<i", 16)         # lea rsi, [rip+16] (msg)
            + b"\xba" + struct.pack("<I", len(msg))        # mov edx, len
            + b"\x0f\x05"                                  # syscall
            b"\xb8\xe7\x00\x00\x00"                      # mov eax, 231 (exit_group)
            b"\x31\xff\x0f\x05")                          # xor edi, edi; syscall
    size = head + len(code) + len(msg)
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, base + head, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD r-x
    return ehdr + phdr + code + msg


def nanos_probe_argv(binary: str, accel: str, nanos_dir: Path, machine: str,
                     disk: Path) -> list[str]:
    common = [binary, "-accel", accel, "-m", "64", "-nodefaults", "-no-user-config",
              "-display", "none", "-no-reboot", "-serial", "stdio",
              "-drive", f"if=none,id=hd0,format=raw,file={str(disk).replace(',', ',,')}"]
    if machine == "microvm":
        return [*common, "-machine", "microvm,rtc=on,ioapic2=off",
                "-kernel", str(nanos_dir / "kernel.img"),
                "-global", "virtio-mmio.force-legacy=false",
                "-device", "virtio-blk-device,drive=hd0"]
    return [*common, "-machine", "q35", "-device", "virtio-scsi-pci,id=scsi0",
            "-device", "scsi-hd,bus=scsi0.0,drive=hd0"]


def nanos_guest(nanos_dir: Path, machine: str) -> GuestProbe:
    """The nanos builder's guest: a Nanos image (its mkfs) whose program prints the mark,
    booted as VMs are on ``machine`` (measured here: the stub runs under KVM, Nanos
    stops with a KVM internal error)."""
    def argv(tmp: Path, binary: str, accel: str) -> list[str]:
        elf = tmp / "probe"
        elf.write_bytes(probe_elf())
        elf.chmod(0o755)
        manifest = (f"(children:(probe:(contents:(host:{elf}))) program:/probe "
                    "arguments:[probe] environment:(USER:root PWD:/))\n")
        disk = tmp / "probe.raw"
        subprocess.run([str(nanos_dir / "mkfs"), "-b", str(nanos_dir / "boot.img"),
                        "-k", str(nanos_dir / "kernel.img"), str(disk)],
                       input=manifest.encode(), capture_output=True, timeout=60, check=True)
        return nanos_probe_argv(binary, accel, nanos_dir, machine, disk)

    return GuestProbe(f"nanos:{_stamp(nanos_dir / 'kernel.img')}:{machine}", argv)


def probe_kvm(binary: str, timeout: float = 3.0,
              guest: GuestProbe | None = None) -> tuple[bool, str]:
    """KVM is usable only if guests really run under it. Stage 1 boots a tiny stub; stage 2
    (``guest``) boots a real guest of the node's builder, because on some hosts the stub
    runs under KVM while Linux never prints a line and Nanos stops (measured here)."""
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
        if guest is None:
            return True, ""
        try:
            argv = guest.argv(Path(tmp), binary, "kvm")
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"cannot prepare the {guest.key.split(':')[0]} probe guest: {exc}"
        ok, why = boot_prints_mark(argv, guest.timeout)
        return (True, "") if ok else (False, f"{guest.key.split(':')[0]} guest under KVM {why}")


# -- the cached verdict --------------------------------------------------------------------------

def _stamp(p: str | Path | None) -> str:
    try:
        st = os.stat(p) if p else None
    except OSError:
        st = None
    return f"{p}:{st.st_mtime_ns}:{st.st_size}" if st else f"{p}:-"


def probe_kvm_cached(cache: Path, binary: str, guest: GuestProbe | None) -> tuple[bool, str]:
    """``probe_kvm``, its verdict kept in ``cache`` (JSON) for a day per qemu binary,
    probe guest and host kernel release."""
    key = "|".join((_stamp(binary), guest.key if guest else "-", os.uname().release))
    cached: object = None
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
    if (isinstance(cached, dict) and cached.get("key") == key
            and time.time() - float(cached.get("at", 0)) < CACHE_TTL_S):
        return bool(cached.get("ok")), str(cached.get("why", ""))
    ok, why = probe_kvm(binary, guest=guest)
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps({"key": key, "ok": ok, "why": why, "at": time.time()},
                                       sort_keys=True).encode())
    return ok, why


def choose_accel(configured: str, cache: Path, binary: str, guest: GuestProbe | None) -> str:
    """``kvm`` or ``tcg`` as configured; for ``auto``, kvm only if the probe boots."""
    if configured != "auto":
        return configured
    ok, why = probe_kvm_cached(cache, binary, guest)
    if not ok:
        log.warning("qemu: KVM is not usable (%s); VMs run under TCG, slowly", why)
    return "kvm" if ok else "tcg"
