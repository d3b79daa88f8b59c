"""``DummyRuntime``: the runtime interface in memory, for fast agent-logic tests.

A ``FakeWorld`` holds what the fake runtimes "run" and the log of every call,
and makes one ``DummyRuntime`` subclass per runtime name bound to it, so an
``Agent(config, runtimes=world.runtimes())`` builds them from its table like
real ones. Failures are injected per step (``world.fail("run", "web")``), and
capacity per runtime (``world.capacity_mb``), the way a real engine refuses.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mcp_node.config import AgentConfig
from mcp_node.errors import ImageError, MCPError, NotFoundError, ResourceError, WorkloadError
from mcp_node.runtime import (
    NEXT,
    OLD,
    RUNTIME_NAMES,
    TRAITS,
    Runtime,
    Workload,
    WorkloadSpec,
    side_key,
)
from mcp_node.states import RUNNING, STOPPED

Key = tuple[str, str]


@dataclass
class Running:
    spec: WorkloadSpec
    runtime: str
    state: str = RUNNING
    id: str = ""
    started_at: float = 0.0
    exit_code: int | None = None
    log: list[bytes] = field(default_factory=list)


class FakeWorld:
    def __init__(self) -> None:
        self.workloads: dict[Key, Running] = {}
        self.calls: list[tuple[str, str, str]] = []      # (runtime, op, component)
        self.failures: dict[tuple[str, str], MCPError] = {}
        self.unavailable: dict[str, str] = {}            # runtime -> why
        self.capacity_mb: dict[str, int] = {}            # runtime -> memory it may hold
        self.closed: list[str] = []
        self.stop_timeouts: list[float] = []
        # component -> what its tcp check answers ("" accepted), or a function giving it;
        # absent: a real connect
        self.tcp: dict[str, str | Callable[[], str]] = {}
        self.tcp_probes: list[str] = []                  # components probed, in order
        self._ids = itertools.count(1)
        self.clock = 1000.0

    def runtimes(self) -> dict[str, type[Runtime]]:
        return {name: type(f"Dummy_{name}", (DummyRuntime,),
                           {"name": name, "traits": TRAITS[name], "world": self})
                for name in RUNTIME_NAMES}

    def fail(self, op: str, component: str, error: MCPError | None = None) -> None:
        """The next ``op`` on ``component`` raises ``error`` (once)."""
        self.failures[(op, component)] = error or WorkloadError(f"injected {op} failure")

    def crash(self, service: str, component: str, code: int = 1) -> None:
        """The workload exits by itself with ``code``."""
        w = self.workloads[(service, component)]
        w.state, w.exit_code = STOPPED, code

    def ops(self, *kinds: str) -> list[tuple[str, str]]:
        """(op, component) of the calls so far, optionally only of the given kinds."""
        return [(op, comp) for _rt, op, comp in self.calls if not kinds or op in kinds]

    def reset_calls(self) -> None:
        self.calls.clear()


class DummyRuntime(Runtime):
    name: ClassVar[str] = "dummy"
    world: ClassVar[FakeWorld]

    def __init__(self, config: AgentConfig, state_dir: Path, owner: str) -> None:
        self.config, self.state_dir, self.owner = config, state_dir, owner

    def _step(self, op: str, component: str) -> None:
        self.world.calls.append((self.name, op, component))
        err = self.world.failures.pop((op, component), None)
        if err is not None:
            raise err

    def available(self) -> tuple[bool, str]:
        why = self.world.unavailable.get(self.name)
        return (False, why) if why else (True, "")

    def pull(self, spec: WorkloadSpec) -> None:
        self._step("pull", spec.component)
        if spec.image.endswith(":missing"):
            raise ImageError(f"image {spec.image} not found")

    def run(self, spec: WorkloadSpec) -> Workload:
        self._step("run", spec.key)
        self.world.clock += 1
        self.world.workloads[(spec.service, spec.key)] = Running(
            spec, self.name, RUNNING, f"id{next(self.world._ids)}", self.world.clock)
        w = self.inspect(spec.service, spec.key)
        assert w is not None
        return w

    def promote(self, service: str, component: str) -> None:
        self._step("promote", component)
        nxt, old = side_key(component, NEXT), side_key(component, OLD)
        ws = self.world.workloads
        if (service, nxt) not in ws:
            raise WorkloadError(f"no {nxt} to promote")
        ws.pop((service, old), None)
        if (service, component) in ws:
            ws[(service, old)] = ws.pop((service, component))
        ws[(service, component)] = ws.pop((service, nxt))

    def start(self, service: str, component: str) -> bool:
        self._step("start", component)
        w = self._mine().get((service, component))
        if w is None:
            return False
        self.world.clock += 1
        w.state, w.exit_code, w.started_at = RUNNING, None, self.world.clock
        return True

    def stop(self, service: str, component: str, timeout: float = 10.0) -> None:
        self._step("stop", component)
        self.world.stop_timeouts.append(timeout)
        w = self.world.workloads.get((service, component))
        if w is not None:
            w.state = STOPPED

    def remove(self, service: str, component: str) -> None:
        self._step("remove", component)
        self.world.workloads.pop((service, component), None)

    def _mine(self) -> dict[Key, Running]:
        return {k: w for k, w in self.world.workloads.items() if w.runtime == self.name}

    def inspect(self, service: str, component: str) -> Workload | None:
        w = self.world.workloads.get((service, component))
        if w is None or w.runtime != self.name:
            return None
        return Workload(service, component, self.name, w.state, id=w.id, image=w.spec.image,
                        started_at=w.started_at, extra={"fake_id": w.id},
                        spec_digest=w.spec.digest, exit_code=w.exit_code)

    def list(self, service: str | None = None) -> list[Workload]:
        self.world.calls.append((self.name, "list", ""))
        out = [self.inspect(s, c) for s, c in self._mine() if service in (None, s)]
        return [w for w in out if w is not None]

    def logs(self, service: str, component: str, tail: int | None = None,
             follow: bool = False, max_bytes: int | None = None,
             timestamps: bool = False) -> Iterator[bytes]:
        """As podman's and qemu's (test_runtime_contract.py): a missing workload is
        NotFoundError before anything streams; ``tail`` counts lines, 0 is none.
        ``timestamps``: line i stamped i nanoseconds after 2000-01-01 (a fixed order)."""
        w = self._mine().get((service, component))
        if w is None:
            raise NotFoundError(f"no workload {service}/{component}")
        lines = b"".join(w.log).splitlines(keepends=True)
        if timestamps:
            lines = [b"2000-01-01T00:00:00.%09dZ " % i + line for i, line in enumerate(lines)]
        data = b"".join(lines if tail is None else lines[-tail:] if tail > 0 else [])
        if max_bytes is not None:
            data = data[-max_bytes:] if max_bytes > 0 else b""
        return iter([data] if data else [])

    def check_capacity(self, spec: WorkloadSpec, replacing: bool) -> None:
        self._step("capacity", spec.component)
        limit = self.world.capacity_mb.get(self.name)
        if limit is None:
            return
        used = sum(w.spec.memory_mb or 0 for k, w in self._mine().items()
                   if w.state == RUNNING and not (replacing and k == (spec.service,
                                                                       spec.component)))
        if used + (spec.memory_mb or 0) > limit:
            raise ResourceError(f"{spec.name}: {spec.memory_mb} MiB + {used} MiB > {limit} MiB")

    def info(self) -> dict[str, Any]:
        return {"workloads": len(self._mine())}

    def tcp_by_connect(self, service: str, component: str) -> bool:
        return component not in self.world.tcp

    def tcp_check(self, service: str, component: str, port: int, timeout: float) -> str:
        if component not in self.world.tcp:
            return super().tcp_check(service, component, port, timeout)
        self.world.tcp_probes.append(component)
        answer = self.world.tcp[component]
        return answer() if callable(answer) else answer

    def status_extra(self, spec: WorkloadSpec, observed: Workload | None) -> dict[str, Any]:
        return {"fake_id": observed.extra["fake_id"] if observed else None,
                "memory_mb": spec.memory_mb}

    def close(self) -> None:
        self.world.closed.append(self.name)
