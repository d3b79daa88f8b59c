"""The qemu command line of one VM, per device layout: pure functions, unit-tested.

Layouts: the initramfs builder's Linux guest (``-kernel``/``-initrd``, fw_cfg, 9p
volumes), and Nanos on q35 (disk on virtio-scsi behind pcie-root-ports, 9p volumes
on PCI) or on microvm (``-kernel kernel.img``, virtio-mmio disk and NIC), as
testbed.md measured them. Names reach argv only after validation, and every path
inside a ``key=value,...`` option has its commas doubled (QEMU's escape), so neither
a comma nor a leading ``-`` can inject an option.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .vmimage import BootPlan, volume_tag

if TYPE_CHECKING:
    from .netplan import NetAttach

SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,130}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
TAP_NAME = re.compile(r"mcpt[0-9]{1,5}x[0-9]{1,3}")
MACHINES = ("q35", "microvm")


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
    paused: bool = False      # -S: CPUs stay stopped until QMP ``cont``
    tap: str = ""             # bridge mode: the TAP device instead of user-mode


def esc(value: str) -> str:
    """A value inside a QEMU ``a=b,c=d`` option: commas doubled."""
    return value.replace(",", ",,")


def mac_for(service: str, component: str, net: NetAttach | None = None) -> str:
    """Deterministic, locally administered (QEMU's 52:54:00 prefix) per service/component;
    on a service network the address's (``NetAttach.mac``)."""
    if net is not None:
        return net.mac
    h = hashlib.sha256(f"{service}/{component}".encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def machine_opt(machine: str, nanos: bool) -> str:
    if machine == "q35":
        return "q35"
    if machine == "microvm":
        # Nanos never boots on microvm without ioapic2=off (testbed.md).
        return "microvm,rtc=on,ioapic2=off" if nanos else "microvm,rtc=on"
    raise ValueError(f"machine {machine!r}")


def _volumes(p: VMParams, device: str) -> list[str]:
    """One fsdev + 9p device per volume. Linux mounts by tag ``mcpvol<i>``; Nanos names a
    9p device ``virtfs<tag>`` from a numeric tag, so its tag is the index itself."""
    args: list[str] = []
    for i, v in enumerate(p.plan.volumes):
        ro = ",readonly=on" if v.readonly else ""
        tag = str(i) if p.plan.nanos else volume_tag(i)
        args += ["-fsdev", f"local,id=fs{i},path={esc(v.host)},security_model=none{ro}",
                 "-device", f"{device},fsdev=fs{i},mount_tag={tag}"]
    return args


# Nanos' virtio-net-pci driver loses the device's RX notifications with EVENT_IDX: once a
# burst empties the RX ring (TCG guests refill slowly), it refills the ring without the
# kick the device asked for, QEMU holds the queued frames for ever and the guest answers
# no packet again until restarted (measured: after 200-1,600 back-to-back connections
# through user-mode, x-query-virtio-queue-status showing a full ring never used). Its
# virtio-mmio driver (microvm) took the same bursts with EVENT_IDX on.
NANOS_NET = "event_idx=off"


def _devices(p: VMParams) -> list[str]:
    plan = p.plan
    micro = p.machine == "microvm"
    net = f"netdev=n0,mac={p.mac}"
    if plan.nanos and not micro:
        return [
            "-device", "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,"
                       "multifunction=on,addr=0x3",
            "-device", "pcie-root-port,port=0x11,chassis=2,id=pci.2,bus=pcie.0,addr=0x3.0x1",
            "-device", "pcie-root-port,port=0x12,chassis=3,id=pci.3,bus=pcie.0,addr=0x3.0x2",
            "-device", "virtio-scsi-pci,bus=pci.2,addr=0x0,id=scsi0",
            "-device", "scsi-hd,bus=scsi0.0,drive=hd0",
            "-drive", f"if=none,id=hd0,format=raw,file={esc(plan.disk)}",
            "-device", f"virtio-net,bus=pci.3,addr=0x0,{NANOS_NET},{net}",
            *_volumes(p, "virtio-9p-pci"),
        ]
    if plan.nanos:
        if plan.volumes:
            raise ValueError("Nanos on microvm has no 9p: volumes need q35")
        return [
            "-kernel", plan.kernel,
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"if=none,id=hd0,format=raw,file={esc(plan.disk)}",
            "-device", "virtio-blk-device,drive=hd0",
            "-device", f"virtio-net-device,{net}",
        ]
    args = ["-kernel", plan.kernel, "-initrd", plan.initrd, "-append", plan.append]
    for name, path in plan.fw_cfg:
        args += ["-fw_cfg", f"name={esc(name)},file={esc(path)}"]
    args += ["-device", f"{'virtio-net-device' if micro else 'virtio-net-pci'},{net}"]
    return args + _volumes(p, "virtio-9p-device" if micro else "virtio-9p-pci")


def _netdev(p: VMParams, fwd: str) -> str:
    """User-mode with host ports forwarded, or (bridge mode) the VM's TAP, opened by
    name: the agent made it and attached it to the service's bridge; no scripts run."""
    if not p.tap:
        return f"user,id=n0{fwd}"
    if not TAP_NAME.fullmatch(p.tap):
        raise ValueError(f"bad TAP name {p.tap!r}")
    return f"tap,id=n0,ifname={p.tap},script=no,downscript=no"


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
        "-netdev", _netdev(p, fwd),
        *_devices(p),
        *(["-S"] if p.paused else []),
    ]
    for a in argv[1:]:
        if a.startswith("-") and a not in _OPTIONS:
            raise ValueError(f"unexpected option-like argument {a!r}")
    return argv


_OPTIONS = {"-name", "-machine", "-accel", "-m", "-smp", "-nodefaults", "-no-user-config",
            "-display", "-no-reboot", "-daemonize", "-pidfile", "-qmp", "-chardev", "-serial",
            "-netdev", "-device", "-drive", "-kernel", "-initrd", "-append", "-fw_cfg",
            "-fsdev", "-global", "-S"}
