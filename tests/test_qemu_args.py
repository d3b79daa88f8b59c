"""Unit tests of the qemu command lines (initramfs and Nanos, q35 and microvm layouts,
9p volumes), the KVM probe stub, MACs, console rotation, the VM's metadata record."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from mcp_node.grammar import Volume
from mcp_node.kvmprobe import PROBE_MARK, probe_argv, probe_image
from mcp_node.qemuargs import VMParams, mac_for, qemu_argv
from mcp_node.vmimage import BootPlan
from mcp_node.vmstate import VMDir, VMMeta, console_rotate, read_meta, write_meta

INITRAMFS = BootPlan(
    builder="initramfs", sha256="0" * 64, image="/s/vms/a-b/image/initrd.img",
    kernel="/k/vmlinuz", initrd="/s/vms/a-b/image/initrd.img", append="console=ttyS0 quiet",
    fw_cfg=(("opt/mcp/config", "/s/vms/a-b/image/guest.conf"),),
    volumes=(Volume("/srv/da,ta", "/data"), Volume("/srv/ro", "/ro", ("ro",))))
NANOS = BootPlan(builder="nanos", sha256="1" * 64, image="/s/vms/a-b/image/disk.raw",
                 disk="/s/vms/a-b/image/disk.raw", nanos=True)
NANOS_VOLS = replace(NANOS, volumes=(Volume("/srv/da,ta", "/data"),
                                     Volume("/srv/ro", "/ro", ("ro",))))


def params(plan: BootPlan = INITRAMFS, **kw: object) -> VMParams:
    base: dict[str, object] = dict(
        binary="qemu-system-x86_64", name="mcp-a-b", machine="q35", accel="tcg",
        memory_mb=256, vcpus=2, pidfile="/s/vms/a-b/qemu.pid", qmp="qmp.sock",
        console="/s/vms/a-b/console.log", ports=(18080, 18081), mac=mac_for("a", "b"),
        plan=plan)
    base.update(kw)
    return VMParams(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_paused_adds_dash_s_only_when_asked() -> None:
    assert "-S" not in qemu_argv(params())
    assert qemu_argv(params(paused=True))[-1] == "-S"


def test_common_part() -> None:
    argv = qemu_argv(params())
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-name") == ["guest=mcp-a-b"]
    assert opt(argv, "-accel") == ["tcg"]
    assert opt(argv, "-m") == ["256M"] and opt(argv, "-smp") == ["2"]
    assert "-daemonize" in argv and "-no-reboot" in argv and "-nodefaults" in argv
    assert opt(argv, "-pidfile") == ["/s/vms/a-b/qemu.pid"]
    assert opt(argv, "-qmp") == ["unix:qmp.sock,server=on,wait=off"]
    assert opt(argv, "-chardev") == ["file,id=con0,path=/s/vms/a-b/console.log,append=on"]
    assert opt(argv, "-serial") == ["chardev:con0"]
    assert opt(argv, "-netdev") == [
        "user,id=n0,hostfwd=tcp:127.0.0.1:18080-:18080,hostfwd=tcp:127.0.0.1:18081-:18081"]


def test_initramfs_q35_layout() -> None:
    argv = qemu_argv(params())
    assert opt(argv, "-machine") == ["q35"]
    assert opt(argv, "-kernel") == ["/k/vmlinuz"]
    assert opt(argv, "-initrd") == ["/s/vms/a-b/image/initrd.img"]
    assert opt(argv, "-append") == ["console=ttyS0 quiet"]
    assert opt(argv, "-fw_cfg") == ["name=opt/mcp/config,file=/s/vms/a-b/image/guest.conf"]
    mac = mac_for("a", "b")
    assert opt(argv, "-device") == [
        f"virtio-net-pci,netdev=n0,mac={mac}",
        "virtio-9p-pci,fsdev=fs0,mount_tag=mcpvol0",
        "virtio-9p-pci,fsdev=fs1,mount_tag=mcpvol1",
    ]
    # a comma in a host path is doubled, so it cannot start a new option
    assert opt(argv, "-fsdev") == [
        "local,id=fs0,path=/srv/da,,ta,security_model=none",
        "local,id=fs1,path=/srv/ro,security_model=none,readonly=on",
    ]


def test_initramfs_microvm_layout() -> None:
    argv = qemu_argv(params(machine="microvm"))
    assert opt(argv, "-machine") == ["microvm,rtc=on"]
    assert opt(argv, "-device")[0].startswith("virtio-net-device,netdev=n0")
    assert opt(argv, "-device")[1] == "virtio-9p-device,fsdev=fs0,mount_tag=mcpvol0"


def test_nanos_q35_layout_matches_testbed() -> None:
    argv = qemu_argv(params(NANOS, ports=(8080,)))
    assert opt(argv, "-machine") == ["q35"]
    assert "-kernel" not in argv and "-initrd" not in argv
    assert opt(argv, "-device") == [
        "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,multifunction=on,addr=0x3",
        "pcie-root-port,port=0x11,chassis=2,id=pci.2,bus=pcie.0,addr=0x3.0x1",
        "pcie-root-port,port=0x12,chassis=3,id=pci.3,bus=pcie.0,addr=0x3.0x2",
        "virtio-scsi-pci,bus=pci.2,addr=0x0,id=scsi0",
        "scsi-hd,bus=scsi0.0,drive=hd0",
        f"virtio-net,bus=pci.3,addr=0x0,event_idx=off,netdev=n0,mac={mac_for('a', 'b')}",
    ]
    assert opt(argv, "-drive") == ["if=none,id=hd0,format=raw,file=/s/vms/a-b/image/disk.raw"]


def test_nanos_q35_volumes_are_9p_pci_devices_tagged_by_index() -> None:
    """Nanos names a 9p device virtfs<tag> from a numeric mount tag (its manifest's
    ``mounts`` refer to that name), and drives 9p over PCI."""
    argv = qemu_argv(params(NANOS_VOLS, ports=(8080,)))
    assert opt(argv, "-device")[-2:] == ["virtio-9p-pci,fsdev=fs0,mount_tag=0",
                                         "virtio-9p-pci,fsdev=fs1,mount_tag=1"]
    assert opt(argv, "-fsdev") == [
        "local,id=fs0,path=/srv/da,,ta,security_model=none",
        "local,id=fs1,path=/srv/ro,security_model=none,readonly=on",
    ]


def test_nanos_microvm_refuses_volumes() -> None:
    plan = replace(NANOS_VOLS, kernel="/n/kernel.img")
    with pytest.raises(ValueError, match="q35"):
        qemu_argv(params(plan, machine="microvm"))


def test_nanos_microvm_layout_matches_testbed() -> None:
    plan = replace(NANOS, kernel="/n/kernel.img")
    argv = qemu_argv(params(plan, machine="microvm"))
    assert opt(argv, "-machine") == ["microvm,rtc=on,ioapic2=off"]
    assert opt(argv, "-kernel") == ["/n/kernel.img"]
    assert opt(argv, "-global") == ["virtio-mmio.force-legacy=false"]
    assert opt(argv, "-device") == ["virtio-blk-device,drive=hd0",
                                    f"virtio-net-device,netdev=n0,mac={mac_for('a', 'b')}"]


@pytest.mark.parametrize("bad", [
    {"name": "mcp-a,b"}, {"name": "-mcp"}, {"name": "MCP"}, {"name": "mcp a"},
    {"mac": "52:54:00:00:00"}, {"mac": "52:54:00:00:00:00,x=y"},
    {"accel": "kvm,x=y"}, {"ports": (0,)}, {"ports": (70000,)}, {"memory_mb": 0},
    {"vcpus": 0},
])
def test_argv_refuses_injection_and_nonsense(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        qemu_argv(params(INITRAMFS, **bad))


def test_mac_is_deterministic_local_and_distinct() -> None:
    assert mac_for("svc", "web") == mac_for("svc", "web")
    assert mac_for("svc", "web").startswith("52:54:00:")
    # the two pairs that share a directory name still get different MACs
    assert mac_for("a-b", "c") != mac_for("a", "b-c")


def test_probe_image_is_a_multiboot_stub() -> None:
    img = probe_image()
    magic, flags, checksum = struct.unpack_from("<3I", img, 0)
    assert magic == 0x1BADB002 and flags & 0x10000
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    _hdr, load, load_end, _bss, entry = struct.unpack_from("<5I", img, 12)
    assert load_end - load == len(img) and entry == load + 32
    # after "mov dx, 0x3f8": one "mov al, c; out dx, al" per byte of the mark
    assert img[32:36] == b"\x66\xba\xf8\x03"
    assert bytes(img[i + 1] for i in range(36, len(img) - 4, 3)) == PROBE_MARK + b"\n"
    assert probe_argv("q", "kvm", "/p.bin")[-2:] == ["-kernel", "/p.bin"]
    assert "stdio" in probe_argv("q", "kvm", "/p.bin")


def test_console_rotate(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console_rotate(log, 10) is False           # no file yet
    log.write_bytes(b"0123456789")
    assert console_rotate(log, 10) is False           # at the cap: kept
    with log.open("ab", buffering=0) as f:              # O_APPEND, like qemu
        f.write(b"abc")
        assert console_rotate(log, 10) is True
        f.write(b"new")
    assert (tmp_path / "console.log.1").read_bytes() == b"0123456789abc"
    assert log.read_bytes() == b"new"                   # O_APPEND writer lands at the start
    log.write_bytes(b"x" * 20)
    assert console_rotate(log, 10) is True
    assert (tmp_path / "console.log.1").read_bytes() == b"x" * 20   # one rotation only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "console.log.1"]


def meta_for(plan: BootPlan = INITRAMFS, **kw: object) -> VMMeta:
    base: dict[str, object] = dict(
        service="a", component="b", image="localhost/x:v1", binary="/usr/local/bin/x",
        builder=plan.builder, image_sha256=plan.sha256, memory_mb=64, vcpus=1,
        machine="q35", accel="tcg", ports=(8080,), mac=mac_for("a", "b"),
        stop_timeout_s=10.0, boot=plan, started_at=1.5, owner="node-1")
    base.update(kw)
    return VMMeta(**base)  # type: ignore[arg-type]


def test_relative_state_dir_gives_absolute_qemu_paths(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu runs with its cwd in the VM directory: a relative pidfile or console path
    (from ``--state-dir ./st``) would point below that directory and qemu would fail."""
    from mcp_node.config import from_dict
    from mcp_node.qemu import QemuRuntime

    monkeypatch.chdir(tmp_path)
    cfg = from_dict({"state": {"dir": "st"}, "qemu": {"accel": "tcg"}})
    rt = QemuRuntime(cfg, Path("st"), "node-1")
    d = rt._dir("a", "b")
    p = rt.params(d, meta_for())
    assert d.path == tmp_path / "st" / "vms" / "a-b"
    assert Path(p.pidfile).is_absolute() and Path(p.console).is_absolute()
    assert p.qmp == "qmp.sock"
    assert rt.cache_dir.is_absolute()


def test_meta_record_round_trips_and_keeps_unknown_keys(tmp_path: Path) -> None:
    d = VMDir(tmp_path / "a-b")
    meta = meta_for(NANOS_VOLS)
    write_meta(d, meta)
    assert read_meta(d) == meta
    raw = json.loads(d.meta.read_text())
    assert raw["boot"]["volumes"][1] == {"host": "/srv/ro", "guest": "/ro", "options": ["ro"]}
    raw["future_key"] = [1, 2]
    d.meta.write_text(json.dumps(raw))
    again = read_meta(d)
    assert again is not None and again.extra == {"future_key": [1, 2]}
    assert json.loads(again.to_json())["future_key"] == [1, 2]
    # an older record (no owner) still reads; a broken one is None, not an exception
    del raw["owner"]
    d.meta.write_text(json.dumps(raw))
    assert read_meta(d) is not None and read_meta(d).owner == ""  # type: ignore[union-attr]
    for broken in ("{", "[]", json.dumps({**raw, "memory_mb": "many"}),
                   json.dumps({k: v for k, v in raw.items() if k != "boot"})):
        d.meta.write_text(broken)
        assert read_meta(d) is None
    assert read_meta(VMDir(tmp_path / "none")) is None


def test_console_rotate_concurrent_callers_rotate_once(tmp_path: Path) -> None:
    """The monitor's list() and an API inspect() may rotate at the same moment: exactly one
    rotation, no error, nothing lost (a second copy-truncate would drop newer output)."""
    import threading

    for trial in range(20):
        d = tmp_path / str(trial)
        d.mkdir()
        log = d / "console.log"
        data = bytes(range(256)) * 800
        log.write_bytes(data)
        barrier = threading.Barrier(6)
        results: list[bool] = []
        errors: list[BaseException] = []

        def rotate(log: Path = log, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                results.append(console_rotate(log, 1000))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        threads = [threading.Thread(target=rotate) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert errors == [] and sorted(results) == [False] * 5 + [True]
        assert (d / "console.log.1").read_bytes() == data and log.read_bytes() == b""
        assert sorted(p.name for p in d.iterdir()) == ["console.log", "console.log.1"]
