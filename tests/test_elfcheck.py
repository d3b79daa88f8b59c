"""A dynamically linked program is refused at deploy (issue 22 row 12): elfcheck reads
PT_INTERP from real binaries and from cut or foreign bytes; a live agent refuses a
unikernel whose binary is /bin/ls, naming the field and the interpreter, creating nothing."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import lacking
from daemon_env import Daemon
from hypothesis import given
from hypothesis import strategies as st
from podman_env import containers_conf, podman_cli
from qemu_env import _import_image, nanos_dir, qemu_pids_in

from mcp_node.cli import cli
from mcp_node.elfcheck import check_static, interpreter
from mcp_node.errors import ValidationError

LD = "/lib64/ld-linux-x86-64.so.2"
HOW = "link it statically (C: -static; Go: CGO_ENABLED=0; Rust: a musl target)"


def elf64(interp: bytes | None, cut: int = 0) -> bytes:
    """A minimal little-endian ELF64: one PT_LOAD, and a PT_INTERP naming ``interp``."""
    phs = [(1, 0, 0)] + ([(3, 64 + 2 * 56, len(interp))] if interp is not None else [])
    head = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, len(phs), 64, 0, 0)
    body = b"".join(struct.pack("<IIQQQQQQ", t, 0, off, 0, 0, size, size, 0)
                    for t, off, size in phs)
    data = head + body + (interp or b"")
    return data[:len(data) - cut] if cut else data


def need_file(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        lacking(path)   # setup.sh installs busybox-static; coreutils is everywhere
    return p.read_bytes()


def test_busybox_static_is_static_and_ls_names_its_interpreter() -> None:
    assert interpreter(need_file("/bin/busybox"), "/bin/busybox") is None
    ls = need_file("/bin/ls")
    assert interpreter(ls, "/bin/ls") == LD
    check_static(need_file("/bin/busybox"), "/bin/busybox", "binary", "a Nanos unikernel")
    with pytest.raises(ValidationError) as exc:
        check_static(ls, "/app/hello", "components[0].binary", "a Nanos unikernel")
    assert str(exc.value) == (f"components[0].binary: /app/hello is dynamically linked "
                              f"(interpreter {LD}); a Nanos unikernel needs a static ELF: {HOW}")
    assert exc.value.field == "components[0].binary"


def test_a_built_header_reads_the_same() -> None:
    assert interpreter(elf64(None), "x") is None
    assert interpreter(elf64(LD.encode() + b"\0"), "x") == LD
    assert interpreter(elf64(b"\0"), "x") == "''"       # empty: still dynamic, shown quoted
    assert interpreter(elf64(b"/l\nd\0"), "x") == "'/l\\nd'"


@pytest.mark.parametrize(("data", "why"), [
    (b"", "is not an ELF executable"),
    (b"#!/bin/sh\necho hi\n", "is not an ELF executable"),
    (b"\x7fELF" + bytes([3, 1]) + b"\0" * 58, "is not a valid ELF (class 3, data encoding 1)"),
    (b"\x7fELF" + bytes([2, 1]) + b"\0" * 20, "is a truncated ELF (its header is cut short)"),
    (elf64(LD.encode(), cut=len(LD) + 60),
     "is a truncated ELF (its program headers are cut short)"),
    (elf64(LD.encode(), cut=3), "is a truncated ELF (its interpreter path is cut short)"),
])
def test_cut_or_foreign_bytes_are_a_clear_error(data: bytes, why: str) -> None:
    with pytest.raises(ValidationError) as exc:
        interpreter(data, "/app/hello", "binary")
    assert str(exc.value) == f"binary: /app/hello {why}"


def test_a_cut_busybox_or_ls_is_a_clear_error() -> None:
    for path in ("/bin/busybox", "/bin/ls"):
        data = need_file(path)
        for n in (0, 3, 17, 40, 63, 64, 100, 300, 1000):
            try:
                interpreter(data[:n], path)
            except ValidationError as exc:
                assert str(exc).startswith(f"{path} is ")


@given(st.binary(max_size=600))
def test_random_bytes_raise_only_validation_error(data: bytes) -> None:
    with pytest.raises(ValidationError):
        interpreter(data, "x")


@given(st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.binary(max_size=800))
def test_random_elf_bodies_raise_only_validation_error(cls: int, order: int,
                                                       rest: bytes) -> None:
    """Past the magic, any header and program headers: an answer or a ValidationError."""
    try:
        got = interpreter(b"\x7fELF" + bytes([cls, order]) + rest, "x")
    except ValidationError:
        return
    assert got is None or isinstance(got, str)


def test_deploy_of_a_dynamic_unikernel_is_refused_and_creates_nothing(
        tmp_path: Path, podman_socket: str, nanos: Path) -> None:
    ref = f"localhost/mcp-dyn-{uuid.uuid4().hex[:8]}:v1"
    _import_image(ref, {"bin/ls": (need_file("/bin/ls"), 0o755)}, "/bin/ls")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[podman]\nsocket = "{podman_socket}"\ncontainers_conf = '
                    f'"{containers_conf()}"\n[qemu]\nnanos_dir = "{nanos_dir()}"\n'
                    'accel = "tcg"\nmachine = "q35"\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    svc = f"d{uuid.uuid4().hex[:6]}"
    defn = tmp_path / "svc.toml"
    defn.write_text(f'name = "{svc}"\n[[components]]\nname = "app"\nimage = "{ref}"\n'
                    'runtime = "unikernel"\nmemory_mb = 128\nbinary = "/bin/ls"\n')
    d = Daemon(state, conf)
    try:
        d.start()
        base = ["--agent", d.url, "--token-file", str(state / "token")]
        refused = (1, "", (
            f"Error: components[0].binary: /bin/ls is dynamically linked (interpreter {LD}); "
            f"a Nanos unikernel needs a static ELF: {HOW}\n"))
        for verb in ("plan", "deploy"):
            r = CliRunner().invoke(cli, [*base, verb, str(defn)])
            assert (r.exit_code, r.stdout, r.stderr) == refused, verb
        r = CliRunner().invoke(cli, [*base, "status", svc])
        assert (r.exit_code, r.stderr) == (
            1, f"Error: unknown service '{svc}' (no services deployed)\n")
        assert not list((state / "vms").glob(f"{svc}-*")) and not qemu_pids_in(state)
    finally:
        d.stop()
        d.remove_containers()
        podman_cli("rmi", "-f", ref)
