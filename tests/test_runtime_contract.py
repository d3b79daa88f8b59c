"""One runtime contract, run against the dummy runtime (tests/fake_runtime.py), podman
and qemu (a Nanos q35 guest from $MCP_NANOS_DIR, else ../shared/nanos): the calls the
agent makes and what it relies on their answers being. The workload is the hello test
program (it prints a line when it listens and one per request); for the dummy, the
test writes those lines where the dummy keeps a workload's output.

What is checked: a missing image is an ImageError; a missing workload is None to
inspect, absent from list, NotFoundError to logs, nothing to stop or remove, False to
start; run gives a running workload carrying the spec's digest, and list shows it;
logs: tail=None all, tail=0 nothing, tail=N the last N lines; stop leaves it listed,
stopped, its log readable; start runs it again, with a later start time; run again
replaces it (one workload, the new digest); remove takes it and its log away.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from fake_runtime import FakeWorld
from podman_env import free_port
from qemu_env import VMReaper, nanos_config, qemu_runtime

from mcp_node.config import from_dict
from mcp_node.errors import ImageError, NotFoundError
from mcp_node.runtime import (
    DEFAULT_RUNTIME,
    NEXT,
    RUNNING,
    STOPPED,
    Runtime,
    Workload,
    WorkloadSpec,
)

MISSING_IMAGE = "localhost/mcp-contract-no-such-image:missing"


@dataclass
class Subject:
    rt: Runtime
    image: str
    world: FakeWorld | None = None    # the dummy's: where the program's output is written

    def started(self, spec: WorkloadSpec) -> None:
        """The program is up: it printed that it listens (the dummy's is written here)."""
        if self.world is not None:
            self._print(spec, f"hello: listening on :{spec.ports[0]}")
            return
        until(lambda: b"listening on" in b"".join(self.rt.logs(spec.service, spec.key)),
              120)

    def request(self, spec: WorkloadSpec, says: str = "contract", port: int = 0) -> None:
        """One HTTP request (to ``port``, default the spec's), which the program logs."""
        if self.world is not None:
            self._print(spec, "hello: GET / HTTP/1.1")
            return
        port = port or spec.ports[0]

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    return f"hello from {says}".encode() in r.read()
            except OSError:
                return False
        until(answers, 120)

    def _print(self, spec: WorkloadSpec, text: str) -> None:
        assert self.world is not None
        self.world.workloads[(spec.service, spec.key)].log.append(text.encode() + b"\n")


def until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.1)


@pytest.fixture(params=["dummy", pytest.param("podman", marks=pytest.mark.integration),
                        pytest.param("qemu", marks=pytest.mark.integration)])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    if request.param == "dummy":
        world = FakeWorld()
        cfg = from_dict({"state": {"dir": str(tmp_path / "state")}})
        yield Subject(world.runtimes()[DEFAULT_RUNTIME](cfg, cfg.state_dir, "test-node"),
                      "localhost/mcp-hello:v1", world)
    elif request.param == "podman":
        yield Subject(request.getfixturevalue("podman_runtime"),
                      request.getfixturevalue("hello_image"))
    else:
        request.getfixturevalue("nanos")
        image = request.getfixturevalue("hello_image")
        reaper: VMReaper = request.getfixturevalue("vm_reaper")
        rt = qemu_runtime(nanos_config(tmp_path / "state", "q35"))
        reaper.watch(rt.state_dir)
        try:
            yield Subject(rt, image)
        finally:
            rt.close()


def spec_for(subject: Subject, message: str = "contract") -> WorkloadSpec:
    return WorkloadSpec(service=f"c{uuid.uuid4().hex[:8]}", component="web",
                        image=subject.image, env=(f"MESSAGE={message}",
                                                  f"PORT={(port := free_port())}"),
                        ports=(port,), memory_mb=128, stop_timeout_s=5.0)


def ours(rt: Runtime, spec: WorkloadSpec) -> list[tuple[str, str, object, str]]:
    return [(w.service, w.component, w.state, w.spec_digest) for w in rt.list()
            if w.service == spec.service]


def compared(w: Workload) -> tuple[object, ...]:
    """What the monitor compares of a workload (``monitor.observe``)."""
    return (w.service, w.component, w.runtime, w.state, w.id, w.started_at,
            w.restart_count, w.spec_digest, w.paused)


def test_missing_image_and_missing_workload(subject: Subject) -> None:
    rt = subject.rt
    spec = spec_for(subject)
    with pytest.raises(ImageError):
        rt.pull(WorkloadSpec(spec.service, spec.component, MISSING_IMAGE, memory_mb=128))
    assert rt.inspect(spec.service, spec.component) is None
    assert ours(rt, spec) == []
    with pytest.raises(NotFoundError):
        list(rt.logs(spec.service, spec.component))
    rt.stop(spec.service, spec.component)          # missing: not an error
    rt.remove(spec.service, spec.component)
    assert rt.start(spec.service, spec.component) is False


def test_lifecycle_as_the_agent_drives_it(subject: Subject) -> None:
    rt = subject.rt
    spec = spec_for(subject)
    rt.pull(spec)
    w = rt.run(spec)
    assert (w.service, w.component, w.runtime, w.state) == (
        spec.service, spec.component, rt.name, RUNNING)
    assert w.spec_digest == spec.digest and w.id and w.started_at
    got = rt.inspect(spec.service, spec.component)
    assert got is not None and got.state == RUNNING and got.spec_digest == spec.digest
    assert ours(rt, spec) == [(spec.service, "web", RUNNING, spec.digest)]
    # after an operation the agent lists one service (issue 21), a round lists all:
    # what the monitor compares must not differ between them
    [listed] = [w for w in rt.list() if w.service == spec.service]
    assert [compared(w) for w in rt.list(spec.service)] == [compared(listed)]
    assert rt.list(spec.service + "x") == []

    # logs: all of it, nothing for tail=0, the last N lines for tail=N
    subject.started(spec)
    subject.request(spec)
    until(lambda: b"hello: GET /" in b"".join(rt.logs(spec.service, spec.component)))
    assert b"".join(rt.logs(spec.service, spec.component, tail=0)) == b""

    def tails_agree() -> bool:
        whole = b"".join(rt.logs(spec.service, spec.component)).splitlines(keepends=True)
        one = b"".join(rt.logs(spec.service, spec.component, tail=1))
        two = b"".join(rt.logs(spec.service, spec.component, tail=2))
        return one == b"".join(whole[-1:]) and two == b"".join(whole[-2:]) and one != two
    until(tails_agree)    # a guest's console may still be writing: read again until still

    # stop: still listed, stopped, its log readable; stopping again is nothing
    rt.stop(spec.service, spec.component, 5.0)
    got = rt.inspect(spec.service, spec.component)
    assert got is not None and got.state == STOPPED
    assert ours(rt, spec) == [(spec.service, "web", STOPPED, spec.digest)]
    assert b"listening on" in b"".join(rt.logs(spec.service, spec.component))
    rt.stop(spec.service, spec.component, 5.0)

    # start: running again as it was, started later
    assert rt.start(spec.service, spec.component) is True
    again = rt.inspect(spec.service, spec.component)
    assert again is not None and again.state == RUNNING and again.spec_digest == spec.digest
    assert again.started_at is not None and w.started_at is not None
    assert again.started_at > w.started_at
    subject.request(spec)

    # run again with another spec: replaced, one workload, the new digest
    changed = WorkloadSpec(**{**spec.__dict__, "env": ("MESSAGE=contract 2",
                                                       f"PORT={spec.ports[0]}")})
    assert changed.digest != spec.digest
    w2 = rt.run(changed)
    assert w2.state == RUNNING and w2.spec_digest == changed.digest
    assert ours(rt, spec) == [(spec.service, "web", RUNNING, changed.digest)]

    # remove: gone, log too; removing again is nothing
    rt.remove(spec.service, spec.component)
    assert rt.inspect(spec.service, spec.component) is None
    assert ours(rt, spec) == []
    with pytest.raises(NotFoundError):
        list(rt.logs(spec.service, spec.component))
    rt.remove(spec.service, spec.component)


def test_promote_the_next_workload_beside_the_current_one(subject: Subject) -> None:
    """A start-first replace as the agent drives it: the new workload (slot ``next``, its
    own port) runs beside the current one; promoted, it is the component's (stop and
    start work on it) and the old one, still serving, is ``web.old`` until removed."""
    rt = subject.rt
    spec = spec_for(subject, "old")
    rt.pull(spec)
    rt.run(spec)
    port = free_port()
    new = replace(spec, env=("MESSAGE=new", f"PORT={port}"), ports=(port,), slot=NEXT)
    w = rt.run(new)
    assert (w.component, w.state, w.spec_digest) == ("web.next", RUNNING, new.digest)
    assert new.digest == replace(new, slot="").digest != spec.digest
    assert sorted(ours(rt, spec)) == [(spec.service, "web", RUNNING, spec.digest),
                                      (spec.service, "web.next", RUNNING, new.digest)]
    subject.request(new, "new")
    rt.promote(spec.service, "web")
    assert sorted(ours(rt, spec)) == [(spec.service, "web", RUNNING, new.digest),
                                      (spec.service, "web.old", RUNNING, spec.digest)]
    got = rt.inspect(spec.service, "web")
    assert got is not None and got.spec_digest == new.digest and got.state == RUNNING
    subject.request(replace(new, slot=""), "new")
    subject.request(replace(spec, slot="old"), "old")   # draining: still answers
    rt.remove(spec.service, "web.old")
    assert ours(rt, spec) == [(spec.service, "web", RUNNING, new.digest)]
    rt.stop(spec.service, "web", 5.0)
    assert ours(rt, spec) == [(spec.service, "web", STOPPED, new.digest)]
    assert rt.start(spec.service, "web") is True
    subject.request(replace(new, slot=""), "new")
    rt.remove(spec.service, "web")
    assert ours(rt, spec) == []
