"""Unit tests of the VM image builders: ops config.json and argv, Nanos manifest and
mkfs argv (and a real mkfs when Nanos is at hand), the initramfs (contents, module
order, guest config quoting), ELF checks, builder selection, the module layout."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import lacking
from qemu_env import kernel_path

from mcp_node.builders import choose_builder
from mcp_node.config import QemuConfig
from mcp_node.cpio import Cpio, read_cpio
from mcp_node.errors import ImageError, ValidationError
from mcp_node.grammar import Volume
from mcp_node.initramfs import (
    INIT,
    InitramfsBuilder,
    build_initramfs,
    find_moddir,
    guest_config,
    kernel_version,
    modinfo,
    read_module,
    resolve_modules,
)
from mcp_node.nanos import NanosBuilder, nanos_manifest, nanos_mkfs_argv, nanos_quote
from mcp_node.ops import OpsBuilder, ops_build_argv, ops_config
from mcp_node.vmimage import BuildRequest, elf_info, sha256_file

NASTY = "a b (c) \"d\" 'e' $HOME `id` \\ ;x\nnewline"


def static_elf() -> bytes:
    bb = shutil.which("busybox")
    if not bb:
        lacking("busybox-static")
    assert bb is not None
    return Path(bb).read_bytes()


def req(tmp_path: Path, **kw: object) -> BuildRequest:
    elf = tmp_path / "cache.elf"
    if not elf.exists():
        elf.write_bytes(static_elf())
    base: dict[str, object] = dict(service="svc", component="web", elf=elf,
                                   guest_path="/usr/local/bin/hello", argv=("--flag", NASTY),
                                   env=("PORT=8080", f"MESSAGE={NASTY}"), memory_mb=128,
                                   vcpus=2, ports=(8080,))
    base.update(kw)
    return BuildRequest(**base)  # type: ignore[arg-type]


# -- ops -------------------------------------------------------------------------------------

def test_ops_config_carries_args_env_memory_cpus(tmp_path: Path) -> None:
    cfg = ops_config(req(tmp_path))
    assert cfg["Args"] == ["hello", "--flag", NASTY]
    assert cfg["Env"] == {"PORT": "8080", "MESSAGE": NASTY}
    assert cfg["RunConfig"] == {"Memory": "128M", "CPUs": 2, "Ports": ["8080"]}
    # JSON round-trips the awkward value exactly
    assert json.loads(json.dumps(cfg))["Env"]["MESSAGE"] == NASTY


def test_ops_builder_refuses_volumes_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:
        OpsBuilder(QemuConfig()).check((Volume("/srv/data", "/data"),))
    assert err.value.field == "volumes" and "nanos builder" in str(err.value)
    OpsBuilder(QemuConfig()).check(())


def test_ops_config_rejects_bad_env(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"env\[0\]"):
        ops_config(req(tmp_path, env=("1BAD=x",)))


def test_ops_build_argv() -> None:
    assert ops_build_argv("/usr/bin/ops", Path("/b/hello"), Path("/b/config.json"), "img") == [
        "/usr/bin/ops", "build", "/b/hello", "-c", "/b/config.json", "-i", "img"]


def test_ops_builder_available_only_with_ops(tmp_path: Path) -> None:
    ok, why = OpsBuilder(QemuConfig(ops=str(tmp_path / "no-ops"))).available()
    assert not ok and "ops" in why
    fake = tmp_path / "ops"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    assert OpsBuilder(QemuConfig(ops=str(fake))).available() == (True, "")


# -- nanos -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("plain", "plain"),
    ("/abs/path-1.2_x", "/abs/path-1.2_x"),
    ("with space", '"with space"'),
    ("(paren)", '"(paren)"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("", '""'),
    ("a:b", '"a:b"'),
])
def test_nanos_quote(value: str, expected: str) -> None:
    assert nanos_quote(value) == expected


def test_nanos_manifest_program_args_env_and_volume_mounts(tmp_path: Path) -> None:
    r = req(tmp_path, argv=("serve", "a b"), env=("PORT=8080", "MSG=hello (world)"),
            volumes=(Volume(str(tmp_path), "/usr/local/data"),
                     Volume(str(tmp_path), "/ro dir", ("ro",))))
    m = nanos_manifest(r)
    elf = str(r.elf.resolve())
    assert m.startswith("(\n") and m.endswith(")\n")
    assert "program:/usr/local/bin/hello\n" in m
    assert 'arguments:[hello serve "a b"]' in m
    assert 'environment:(USER:root PWD:/ PORT:8080 MSG:"hello (world)")' in m
    assert f"hello:(contents:(host:{elf}))" in m
    # each mount point is an empty directory in the image, beside the program
    assert ("usr:(children:(local:(children:(bin:(children:(hello:(contents:(host:"
            f"{elf})))) data:(children:()))))") in m
    assert '"ro dir":(children:())' in m
    assert 'mounts:(virtfs0:/usr/local/data virtfs1:"/ro dir")' in m
    assert m.count("(") == m.count(")")
    assert "mounts" not in nanos_manifest(req(tmp_path))


@pytest.mark.parametrize("volumes,match", [
    ((Volume("/h", "/"),), "volumes\\[0\\]: cannot mount a volume on /"),
    ((Volume("/h", "/usr"),), "volumes\\[0\\]: /usr would hide the program"),
    ((Volume("/h", "/data"), Volume("/h", "/data/sub")), "volumes\\[1\\]: .* overlaps"),
    ((Volume("/h", "/data"), Volume("/h", "/data")), "volumes\\[1\\]: .* overlaps"),
])
def test_nanos_refuses_volume_mount_points_it_cannot_honour(
        tmp_path: Path, volumes: tuple[Volume, ...], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        nanos_manifest(req(tmp_path, volumes=volumes))


def test_nanos_builder_checks_volumes_against_the_machine(tmp_path: Path) -> None:
    vols = (Volume(str(tmp_path), "/data"),)
    NanosBuilder(QemuConfig(machine="q35")).check(vols)
    with pytest.raises(ValidationError) as err:
        NanosBuilder(QemuConfig(machine="microvm")).check(vols)
    assert err.value.field == "volumes" and "microvm" in str(err.value)
    NanosBuilder(QemuConfig(machine="microvm")).check(())
    with pytest.raises(ValidationError, match=r"volumes\[0\]: .* is not a directory"):
        NanosBuilder(QemuConfig()).check((Volume(str(tmp_path / "none"), "/data"),))


def test_nanos_manifest_quotes_host_paths_with_spaces(tmp_path: Path) -> None:
    d = tmp_path / "dir with (space)"
    d.mkdir()
    elf = d / "app"
    elf.write_bytes(static_elf())
    m = nanos_manifest(req(tmp_path, elf=elf, guest_path=""))
    assert f'app:(contents:(host:"{elf}"))' in m
    assert "program:/app" in m


def test_nanos_mkfs_argv() -> None:
    assert nanos_mkfs_argv(Path("/n/mkfs"), Path("/n/boot.img"), Path("/n/kernel.img"),
                           Path("/o/disk.raw")) == [
        "/n/mkfs", "-b", "/n/boot.img", "-k", "/n/kernel.img", "/o/disk.raw"]


def test_nanos_builder_names_missing_files(tmp_path: Path) -> None:
    ok, why = NanosBuilder(QemuConfig(nanos_dir="")).available()
    assert not ok and "nanos_dir unset" in why
    (tmp_path / "kernel.img").write_bytes(b"k")
    ok, why = NanosBuilder(QemuConfig(nanos_dir=str(tmp_path))).available()
    assert not ok and "boot.img" in why and "mkfs" in why and "kernel.img" not in why


def test_builder_order_ops_then_nanos_then_initramfs(tmp_path: Path) -> None:
    ops = tmp_path / "ops"
    ops.write_text("#!/bin/sh\n")
    ops.chmod(0o755)
    nanos = tmp_path / "nanos"
    nanos.mkdir()
    for f in ("kernel.img", "boot.img", "mkfs"):
        (nanos / f).write_bytes(b"x")
    k = str(kernel_path())
    both = choose_builder(QemuConfig(ops=str(ops), nanos_dir=str(nanos), kernel=k))
    assert both.builder is not None and both.builder.name == "ops"
    no_ops = choose_builder(QemuConfig(ops=str(tmp_path / "none"), nanos_dir=str(nanos), kernel=k))
    assert no_ops.builder is not None and no_ops.builder.name == "nanos"
    none = choose_builder(QemuConfig(ops=str(tmp_path / "none"), nanos_dir="",
                                     kernel=str(tmp_path / "no-kernel")))
    assert none.builder is None
    assert any("ops" in m for m in none.missing)
    assert any("Nanos files" in m for m in none.missing)
    assert any("kernel" in m and "no-kernel" in m for m in none.missing)


# -- ELF / volumes ---------------------------------------------------------------------------

def test_elf_info_accepts_static_and_rejects_others(tmp_path: Path) -> None:
    assert elf_info(static_elf(), "busybox")["static"] is True
    with pytest.raises(ImageError, match="not an ELF"):
        elf_info(b"#!/bin/sh\necho hi\n" + b"\0" * 64, "script")
    dyn = Path("/bin/ls").read_bytes()
    assert elf_info(dyn, "ls")["static"] is False


def test_program_path_must_be_clean(tmp_path: Path) -> None:
    for bad in ("relative/x", "/usr/../etc/x", "/mcp/app", "/init", "/proc/x", "/a//b"):
        with pytest.raises(ImageError):
            _ = req(tmp_path, guest_path=bad).program


# -- initramfs -------------------------------------------------------------------------------

def test_guest_config_round_trips_through_sh(tmp_path: Path) -> None:
    """Values reach the program exactly, whatever they contain (checked with busybox sh)."""
    conf = guest_config("/usr/local/bin/hello", ("arg one", NASTY),
                        ("MESSAGE=" + NASTY, "EMPTY=", "PATH=/custom"),
                        (Volume("/h", "/data dir", ("ro",)),))
    script = tmp_path / "conf"
    script.write_text(conf)
    out = tmp_path / "out"
    driver = (
        "mcp_volume() { printf 'vol<%s><%s><%s>\\n' \"$1\" \"$2\" \"$3\" >> \"$OUT\"; }\n"
        f". {script}\n"
        "(mcp_env; for a in \"$@\"; do printf 'arg<%s>\\n' \"$a\"; done;"
        " printf 'msg<%s>\\nempty<%s>\\npath<%s>\\n' \"$MESSAGE\" \"$EMPTY\" \"$PATH\")"
        " >> \"$OUT\"\n"
    )
    subprocess.run([shutil.which("busybox") or "/bin/busybox", "sh", "-c", driver],
                   env={"OUT": str(out), "PATH": "/usr/bin:/bin"}, check=True, timeout=10)
    text = out.read_text()
    assert text == (
        "vol<mcpvol0></data dir><ro>\n"
        "arg</usr/local/bin/hello>\narg<arg one>\n"
        f"arg<{NASTY}>\n"
        f"msg<{NASTY}>\nempty<>\npath</custom>\n"
    )


def test_guest_config_rejects_bad_env_key() -> None:
    with pytest.raises(ValidationError):
        guest_config("/x", (), ("A-B=1",), ())


def test_cpio_round_trip() -> None:
    a = Cpio()
    a.dir("d")
    a.file("d/f", b"abc", 0o600)
    a.symlink("l", "d/f")
    data = a.finish()
    assert len(data) % 4 == 0
    entries = read_cpio(data)
    assert entries["d/f"] == (0o100600, b"abc")
    assert entries["l"] == (0o120777, b"d/f")
    assert entries["d"][0] == 0o040755


@pytest.fixture(scope="module")
def moddir() -> Path:
    k = kernel_path()
    if not k.is_file():
        lacking(f"a kernel at {k}")
    d = find_moddir(k, kernel_version(k))
    assert d is not None
    return d


def test_kernel_version_and_moddir(moddir: Path) -> None:
    ver = kernel_version(kernel_path())
    assert ver[0].isdigit() and "." in ver
    magic = modinfo(read_module(next(moddir.rglob("virtio_net.ko*")))).get("vermagic", "")
    assert magic.startswith(ver + " ")


def test_module_order_puts_dependencies_first(moddir: Path) -> None:
    names = [n for n, _ in resolve_modules(moddir, ("virtio_pci", "virtio_net", "9p"))]
    pos = {n: i for i, n in enumerate(names)}
    # testbed.md's load order for virtio_net, whichever are modules in this kernel
    chain = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
             "virtio_pci", "failover", "net_failover", "virtio_net"]
    present = [m for m in chain if m in pos]
    assert "virtio_net" in present
    assert [pos[m] for m in ("virtio", "virtio_net") if m in pos] == sorted(
        pos[m] for m in ("virtio", "virtio_net") if m in pos)
    for mod, data in resolve_modules(moddir, ("virtio_net",)):
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            assert pos[dep.replace("-", "_")] < pos[mod]
    assert len(names) == len(set(names))


def test_missing_module_is_an_image_error(moddir: Path) -> None:
    with pytest.raises(ImageError, match="no_such_module"):
        resolve_modules(moddir, ("no_such_module",))


def test_initramfs_contents(tmp_path: Path, moddir: Path) -> None:
    b = InitramfsBuilder(QemuConfig(kernel=str(kernel_path())))
    assert b.available() == (True, "")
    out = tmp_path / "out"
    out.mkdir()
    plan = b.build(req(tmp_path), out)
    data = gzip.decompress(Path(plan.initrd).read_bytes())
    entries = read_cpio(data)
    assert entries["init"] == (0o100755, INIT.encode())
    assert entries["usr/local/bin/hello"] == (0o100755, static_elf())
    assert entries["mcp/app"][1] == b"/usr/local/bin/hello"
    assert entries["mcp/bin/busybox"][0] == 0o100755
    assert entries["mcp/bin/sh"][1] == b"busybox"
    assert entries["dev/console"][0] == 0o020600
    order = entries["mcp/modules.order"][1].decode().split()
    assert {"virtio_net", "virtio_pci", "button", "evdev", "qemu_fw_cfg", "9p"} <= set(order)
    assert all(f"mcp/modules/{m}.ko" in entries for m in order)
    assert entries["etc/acpi/PWRF/00000080"][0] == 0o100755
    # per-deploy settings are not in the image but in the fw_cfg file
    assert b"8080" not in entries["init"][1]
    assert Path(dict(plan.fw_cfg)["opt/mcp/config"]).read_text() == guest_config(
        "/usr/local/bin/hello", ("--flag", NASTY), ("PORT=8080", f"MESSAGE={NASTY}"), ())
    assert plan.builder == "initramfs" and plan.kernel == str(kernel_path().resolve())
    assert "console=ttyS0" in plan.append


def test_initramfs_is_reproducible_and_independent_of_env(tmp_path: Path, moddir: Path) -> None:
    b = InitramfsBuilder(QemuConfig(kernel=str(kernel_path())))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = b.build(req(tmp_path, env=("PORT=1",)), tmp_path / "a")
    two = b.build(req(tmp_path, env=("PORT=2",), argv=("x",)), tmp_path / "b")
    assert one.sha256 == two.sha256 == ""   # the runtime hashes; the bytes are the same
    assert sha256_file(Path(one.image)) == sha256_file(Path(two.image))
    three = build_initramfs("/other/path", static_elf(), static_elf(), [])
    assert gzip.decompress(three) != gzip.decompress(Path(one.initrd).read_bytes())


def test_initramfs_refuses_a_dynamic_elf(tmp_path: Path, moddir: Path) -> None:
    elf = tmp_path / "ls"
    elf.write_bytes(Path("/bin/ls").read_bytes())
    with pytest.raises(ImageError, match="dynamically linked"):
        InitramfsBuilder(QemuConfig(kernel=str(kernel_path()))).build(
            req(tmp_path, elf=elf), tmp_path)


def test_initramfs_unavailable_names_the_kernel(tmp_path: Path) -> None:
    ok, why = InitramfsBuilder(QemuConfig(kernel=str(tmp_path / "vmlinuz-x"))).available()
    assert not ok and "vmlinuz-x" in why


def test_initramfs_refuses_microvm(tmp_path: Path) -> None:
    b = InitramfsBuilder(QemuConfig(kernel=str(kernel_path()), machine="microvm"))
    with pytest.raises(ValidationError) as err:
        b.check(())
    assert err.value.field == "qemu.machine" and "microvm" in str(err.value)
    with pytest.raises(ValidationError, match="microvm"):
        b.build(req(tmp_path), tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "cache.elf"]


def test_initrd_cache_key_tracks_every_input(tmp_path: Path) -> None:
    from mcp_node.initramfs import initrd_key

    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "modules.order").write_text("a.ko\n")
    base = initrd_key("/usr/local/bin/x", b"elf", b"bb", mod)
    assert base == initrd_key("/usr/local/bin/x", b"elf", b"bb", mod)
    assert base != initrd_key("/usr/local/bin/y", b"elf", b"bb", mod)
    assert base != initrd_key("/usr/local/bin/x", b"elf2", b"bb", mod)
    assert base != initrd_key("/usr/local/bin/x", b"elf", b"bb2", mod)
    (mod / "modules.order").write_text("a.ko\nb.ko\n")
    assert base != initrd_key("/usr/local/bin/x", b"elf", b"bb", mod)
    empty = tmp_path / "none"
    empty.mkdir()
    assert initrd_key("/x", b"e", b"b", empty) != initrd_key("/x", b"e", b"b", empty)


# -- module layout ---------------------------------------------------------------------------

VM_MODULES = ("vmimage", "cpio", "ops", "nanos", "initramfs", "builders", "kvmprobe",
              "qemuargs", "qmp", "vmstate", "vmpull", "qemu")


def project_imports(module: str) -> set[str]:
    import ast

    tree = ast.parse((Path(__file__).parent.parent / "mcp_node" / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add((node.module or "").split(".")[0])
            if not node.module:
                out.update(a.name for a in node.names)
    return out


def test_vm_modules_form_no_cycle_and_builders_stand_alone() -> None:
    graph = {m: project_imports(m) & set(VM_MODULES) for m in VM_MODULES}
    assert graph["vmimage"] == set() and graph["cpio"] == set()     # the leaves
    for builder in ("ops", "nanos", "initramfs"):                    # one module each
        assert graph[builder] <= {"vmimage", "cpio"}, (builder, graph[builder])
    assert graph["builders"] == {"ops", "nanos", "initramfs", "vmimage"}  # choice: one place
    assert "kvmprobe" not in graph["qemuargs"]                      # probe out of the argv

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, " -> ".join((*path, m))
        for n in graph[m]:
            visit(n, (*path, m))

    for m in VM_MODULES:
        visit(m, ())
    sizes = {m: len((Path(__file__).parent.parent / "mcp_node" / f"{m}.py").read_text()
                    .splitlines()) for m in VM_MODULES}
    assert max(sizes.values()) <= 610, sizes


def test_pin_uuids_replaces_each_printed_uuid_found_once(tmp_path: Path) -> None:
    import uuid

    from mcp_node.nanos import pin_uuids

    a, b = uuid.uuid4(), uuid.uuid4()
    printed = f"UUID: {a}\nmetadata\nUUID: {b}\n".encode()
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:          # sparse, like mkfs's output
        f.write(b"head" + a.bytes)
        f.seek(1 << 20)
        f.write(b"tail" + b.bytes)
    assert pin_uuids(disk, printed, "(manifest)") is True
    data = disk.read_bytes()
    assert a.bytes not in data and b.bytes not in data
    again = tmp_path / "again.raw"
    again.write_bytes(data.replace(data[4:20], a.bytes).replace(data[(1 << 20) + 4:(1 << 20) + 20],
                                                               b.bytes))
    assert pin_uuids(again, printed, "(manifest)") is True
    assert again.read_bytes() == data                  # derived from the manifest alone
    twice = tmp_path / "twice.raw"
    twice.write_bytes(a.bytes + a.bytes + b.bytes)
    assert pin_uuids(twice, printed, "(manifest)") is False
    assert twice.read_bytes() == a.bytes + a.bytes + b.bytes   # left as drawn
    assert pin_uuids(twice, b"no uuid printed", "(manifest)") is False
