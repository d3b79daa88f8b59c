"""A full or read-only state dir makes health degraded, naming the directory (issue 18).

The agent runs as a daemon process on a state dir that is a small ext4 loop mount
this test makes (``errors=remount-ro``); the test fills it, empties it, then has
the kernel remount it read-only as on a filesystem error (``trigger_fs_error``:
a plain ``remount,ro`` is refused while the agent holds files open for writing).
Health must say so each time, naming the directory, and say nothing once space is
back. The mount and its image are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import lacking, need
from daemon_env import Daemon

from mcp_node.client import Client
from mcp_node.stateprobe import low_space, probe

WAIT_S = 30.0


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def loop_state(tmp_path: Path) -> Iterator[Path]:
    need("mount", "umount", "mkfs.ext4", "findmnt",
         also=("root (for a loop mount)",) if os.geteuid() != 0 else ())
    image, state = tmp_path / "state.img", tmp_path / "state"
    with open(image, "wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True,
                   capture_output=True, timeout=60)
    state.mkdir(mode=0o700)
    mount("-o", "loop,errors=remount-ro", str(image), str(state))
    try:
        state.chmod(0o700)
        yield state
    finally:
        subprocess.run(["umount", str(state)], capture_output=True, timeout=60)
        image.unlink()


def fs_error(state: Path) -> None:
    """What ext4 does on an I/O or metadata error: remount read-only, files open or not."""
    dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(state)], check=True,
                         capture_output=True, text=True, timeout=30).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(dev).name / "trigger_fs_error"
    if not trigger.exists():   # this kernel cannot be asked for an ext4 error
        lacking(str(trigger))
    trigger.write_text("1\n")


@pytest.fixture
def daemon(tmp_path: Path, loop_state: Path, podman_socket: str) -> Iterator[Daemon]:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[podman]\nsocket = "{podman_socket}"\n[monitor]\ninterval_s = 0.3\n')
    d = Daemon(loop_state, conf)
    try:
        yield d
    finally:
        d.stop()


def wait_health(client: Client, ok: Any, why: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        h: dict[str, Any] = client.get("/v1/health")
        if ok(h):
            return h
        assert time.monotonic() < deadline, f"{why}: {h}"
        time.sleep(0.2)


def ours(h: dict[str, Any], state: Path) -> list[str]:
    return [r for r in h["reasons"] if r.startswith(f"state dir {state}:")]


def test_full_then_read_only_state_dir_degrades_health(daemon: Daemon,
                                                       loop_state: Path) -> None:
    client = daemon.start()
    wait_health(client, lambda h: not ours(h, loop_state), "a fresh state dir")
    filler = loop_state / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):   # ENOSPC ends it
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    h = wait_health(client, lambda h: ours(h, loop_state), "a full state dir")
    assert h["status"] == "degraded"
    assert any("nearly full" in r or "no space left" in r for r in ours(h, loop_state)), h
    filler.unlink()
    wait_health(client, lambda h: not ours(h, loop_state), "space freed")

    fs_error(loop_state)
    h = wait_health(client, lambda h: ours(h, loop_state), "a read-only state dir")
    assert h["status"] == "degraded"
    assert any("read-only" in r for r in ours(h, loop_state)), h
    assert daemon.proc is not None and daemon.proc.poll() is None   # it never died


def test_low_space_threshold() -> None:
    gib = 1 << 30
    assert low_space(10 << 20, 100 * gib)                 # 10 MiB of 100 GiB: low
    assert not low_space(100 << 20, 100 * gib)            # 100 MiB: enough
    assert low_space(500 << 10, 16 << 20)                 # 500 KiB of 16 MiB: below 5 %
    assert not low_space(15 << 20, 16 << 20)


def test_probe_names_an_unwritable_dir(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    (reason,) = probe(missing)
    assert reason.startswith(f"state dir {missing}:")
    assert probe(tmp_path) == [] and not (tmp_path / ".write-probe").exists()
