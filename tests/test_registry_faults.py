"""The registry on failing storage, for real: a small tmpfs the test mounts as the state
dir and fills to the last block, and a registry file bind-mounted read-only.

What must hold (README, "When the registry's storage fails"): every failed write is a
503 ``registry`` error naming the file and the cause, with nothing changed; what the
agent reports is what the runtimes show, never a state it did not observe; freeing
the space is enough to go on. The undeploy whose delete fails after its workloads
went is checked with a fake runtime (logic only).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld
from podman_env import podman_cli
from test_daemon import AgentProc, hello, owned, wait_until

from mcp_node.agent import Agent
from mcp_node.config import from_dict
from mcp_node.errors import RegistryError, RemoteError
from mcp_node.registry import Registry
from mcp_node.servicedef import from_dict as service_from_dict
from mcp_node.states import RUNNING


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True, capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of this test's own, unmounted at teardown."""
    from conftest import need
    need("mount", "umount")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        _umount(mnt)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC; returns it (delete it to free)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * 65536
        while True:
            try:
                f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        for size in (4096, 512, 1):   # the last partial blocks too
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def checkpoint_truncate(db: Path) -> None:
    """Fold the WAL into the database and cut it to 0 bytes, so the next write needs new
    blocks (a WAL with room left would let small writes through a full disk)."""
    con = sqlite3.connect(db, timeout=10)
    try:
        for _ in range(100):
            busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy == 0 and os.path.getsize(str(db) + "-wal") == 0:
                return
        pytest.fail("could not truncate the WAL")
    finally:
        con.close()


def state_of(client: Any, service: str) -> list[str]:
    return [r["state"] for r in client.get("/v1/services") if r["service"] == service]


@pytest.fixture
def agent_on(tmp_path: Path, podman_socket: str) -> Iterator[Callable[[Path], AgentProc]]:
    made: list[AgentProc] = []

    def make(state: Path) -> AgentProc:
        conf = tmp_path / "agent.toml"
        conf.write_text(f'[podman]\nsocket = "{podman_socket}"\n[monitor]\ninterval_s = 0.3\n')
        a = AgentProc(state, conf)
        a.logfile = tmp_path / "agent.log"   # outside the filled filesystem
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.stop()
            if (a.state / "node_id").exists():
                owner = (a.state / "node_id").read_text().strip()
                ids = podman_cli("ps", "-aq", "--filter", f"label=mcp.owner={owner}"
                                 ).stdout.split()
                if ids:
                    podman_cli("rm", "-f", "-t", "0", *ids)


def test_full_disk_answers_503_changes_nothing_and_reports_what_runs(
        tmpfs: Path, agent_on: Callable[[Path], AgentProc], hello_image: str) -> None:
    state = tmpfs / "state"
    state.mkdir(mode=0o700)
    a = agent_on(state)
    client = a.start()
    keep, held = f"k{uuid.uuid4().hex[:8]}", f"h{uuid.uuid4().hex[:8]}"
    client.post("/v1/services", hello(keep, hello_image))
    client.post("/v1/services", hello(held, hello_image, restart="no"))
    wait_until(lambda: state_of(client, keep) == [RUNNING] and
               state_of(client, held) == [RUNNING], "both running")
    checkpoint_truncate(state / "registry.db")
    filler = fill(tmpfs)

    # a deploy: refused with 503 naming the file and the cause; nothing created
    new = f"n{uuid.uuid4().hex[:8]}"
    with pytest.raises(RemoteError) as exc:
        client.post("/v1/services", hello(new, hello_image))
    assert (exc.value.status, exc.value.code) == (503, "registry"), exc.value
    assert str(state / "registry.db") in exc.value.message and "full" in exc.value.message
    assert not any(n.startswith(f"mcp-{new}-") for n in owned(state))
    assert state_of(client, new) == []

    # an undeploy and a stop: refused before anything is touched; the service runs on
    for call in (lambda: client.delete(f"/v1/services/{keep}"),
                 lambda: client.post(f"/v1/services/{keep}/stop")):
        with pytest.raises(RemoteError) as exc:
            call()
        assert (exc.value.status, exc.value.code) == (503, "registry")
        assert f"mcp-{keep}-web running" in owned(state)
        assert state_of(client, keep) == [RUNNING]

    # a workload that stops while nothing can be recorded: reported as it is, not running
    podman_cli("stop", "-t", "0", f"mcp-{held}-web", check=True)
    wait_until(lambda: state_of(client, held) not in ([RUNNING], []), "the stop observed")
    assert state_of(client, held) == ["stopped"]
    wait_until(lambda: any("registry" in r and "full" in r
                           for r in client.get("/v1/health")["reasons"]), "health says why")
    assert client.get("/v1/health")["status"] == "degraded"

    # space again: the same calls go through
    filler.unlink()
    client.delete(f"/v1/services/{keep}")
    assert state_of(client, keep) == []
    assert not any(n.startswith(f"mcp-{keep}-") for n in owned(state))
    client.post("/v1/services", hello(new, hello_image))
    wait_until(lambda: state_of(client, new) == [RUNNING], "the new service running")
    assert a.stop() == 0


def test_read_only_registry_is_refused_at_start(tmp_path: Path,
                                                agent_on: Callable[[Path], AgentProc],
                                                hello_image: str) -> None:
    """The registry file bind-mounted read-only (root ignores file modes): the agent
    exits 1 with one line naming the file, and the file is unchanged."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = state / "registry.db"
    reg = Registry(db)
    reg.put_service(service_from_dict(hello("ro", hello_image)))
    reg.close()
    before = db.read_bytes()
    _mount("--bind", str(db), str(db))
    try:
        _mount("-o", "remount,ro,bind", str(db))
        done = agent_on(state).run()
    finally:
        _umount(db)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(db) in lines[0] and "Read-only file system" in lines[0]
    assert db.read_bytes() == before


# -- logic: the undeploy whose delete fails after its workloads went ---------------------


class FailingDelete(Registry):
    def delete_service(self, name: str) -> None:
        raise RegistryError(f"registry {self.path}: write failed: database or disk is full")


def test_undeploy_that_cannot_delete_the_record_reports_no_running_workload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mcp_node.agent as agent_mod

    monkeypatch.setattr(agent_mod, "Registry", FailingDelete)
    cfg = from_dict({"state": {"dir": str(tmp_path / "s")}})
    world = FakeWorld()
    agent = Agent(cfg, runtimes=world.runtimes(), reconcile=True)
    try:
        agent.deploy(service_from_dict({"name": "u", "components": [
            {"name": "web", "image": "img"}]}))
        assert [r["state"] for r in agent.ps()] == [RUNNING]
        with pytest.raises(RegistryError, match="full"):
            agent.undeploy("u")
        agent.monitor.refresh_safely()   # a round: reconcile must not run it again
        agent.monitor.refresh_safely()
        rows = agent.ps()
        assert [(r["desired_state"], r["state"]) for r in rows] == [("stopped", "missing")]
        assert world.workloads == {}
    finally:
        agent.close()
