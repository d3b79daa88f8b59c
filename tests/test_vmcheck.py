"""A VM's ``tcp`` check (vmcheck): the parsing of ``info usernet`` as QEMU 7.2 prints
it, finding QEMU's end of our connection, then against real QEMU: a guest that is not
running (CPUs held) or not listening never passes while a plain connect to its host port
does, and a Nanos guest that listens passes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_env import free_port
from podman_env import wait_http
from qemu_env import VMReaper, nanos_config, qemu_runtime, wait_gone

from mcp_node import vmcheck
from mcp_node.readiness import connect
from mcp_node.runtime import WorkloadSpec

# ``info usernet`` of a qemu with one forwarded connection the guest has not answered
USERNET = """Hub -1 (n0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[SYN_SENT]      12       127.0.0.1 45123       10.0.2.15  8080     0     0
  TCP[ESTABLISHED]   14       127.0.0.1 45123       10.0.2.15  8080     0     0
  TCP[HOST_FORWARD]  11       127.0.0.1 45123       10.0.2.15  8080     0     0
  UDP[236 sec]       -1        10.0.2.15   68       10.0.2.2    67     0     0
"""


def test_usernet_rows_are_parsed_and_headers_skipped() -> None:
    rows = vmcheck.parse_usernet(USERNET)
    assert [(r.state, r.fd, r.src_port, r.dst_port) for r in rows] == [
        ("SYN_SENT", 12, 45123, 8080), ("ESTABLISHED", 14, 45123, 8080),
        ("HOST_FORWARD", 11, 45123, 8080)]


def test_our_connection_is_found_by_its_peer_port_and_the_fd_holding_it() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as cli:
            ours = cli.getsockname()[1]
            table = Path("/proc/net/tcp").read_text()
            assert vmcheck.server_inode(table, port, ours) == 0     # not accepted yet
            conn, _ = srv.accept()
            with conn:
                inode = vmcheck.server_inode(Path("/proc/net/tcp").read_text(), port, ours)
                assert inode == os.fstat(conn.fileno()).st_ino
                assert vmcheck.fd_holding(os.getpid(), inode) == conn.fileno()
                assert vmcheck.server_inode(table, port, ours + 1) == 0


@pytest.fixture
def held_qemu(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A qemu whose guest never runs (-S) with a host port forwarded: (QMP, pid, port)."""
    from conftest import need

    need("qemu-system-x86_64")
    port = free_port()
    subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "32",
                    "-nodefaults", "-no-user-config", "-display", "none", "-S",
                    "-daemonize", "-pidfile", "qemu.pid", "-qmp",
                    "unix:qmp.sock,server=on,wait=off", "-netdev",
                    f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080",
                    "-device", "virtio-net-pci,netdev=n0"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    pid = int((tmp_path / "qemu.pid").read_text())
    try:
        yield tmp_path / "qmp.sock", pid, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)


@pytest.mark.integration
def test_a_guest_that_does_not_run_never_passes_though_the_port_accepts(
        held_qemu: tuple[Path, int, int]) -> None:
    qmp_sock, pid, port = held_qemu
    assert connect(port, 1.0) == ""                   # QEMU's forwarder accepts
    why = vmcheck.guest_accepts(qmp_sock, pid, port, 0.5)
    assert why == "guest did not accept in 0.5 s (SYN_SENT)"


@pytest.mark.integration
def test_a_nanos_guest_passes_only_on_the_port_it_listens_on(
        tmp_path: Path, nanos: Path, hello_image: str) -> None:
    """One VM, two forwarded ports: hello listens on the first; the second is forwarded
    to a guest port nobody listens on (the guest resets, slirp closes)."""
    rt = qemu_runtime(nanos_config(tmp_path / "state", "microvm"))
    port, idle = free_port(), free_port()
    spec = WorkloadSpec(service=f"c{uuid.uuid4().hex[:8]}", component="web",
                        image=hello_image, env=(f"PORT={port}",), ports=(port, idle),
                        memory_mb=128)
    reaper = VMReaper()
    reaper.add(rt, spec.service, spec.component)
    try:
        rt.run(spec)
        assert wait_http(port, timeout=60) == "hello from mcp\n"
        assert rt.tcp_check(spec.service, spec.component, port, 2.0) == ""
        assert connect(idle, 1.0) == ""
        assert rt.tcp_check(spec.service, spec.component, idle, 2.0) == (
            "closed before the guest accepted")
        rt.stop(spec.service, spec.component)
        assert rt.tcp_check(spec.service, spec.component, port, 1.0) == "no qemu process"
    finally:
        reaper.run()
