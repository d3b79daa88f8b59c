"""The runtime interface both podman and qemu implement (names from the seed).

The agent turns a validated component plus its allocated ports into a
``WorkloadSpec``; a runtime turns that into a running workload and reports
what it sees as ``Workload`` records. ``list`` must cost one call to the
underlying engine however many workloads there are: the monitor relies on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

# Label keys / values that mark a workload as the agent's own.
LABEL_MANAGED = "mcp.managed"
LABEL_SERVICE = "mcp.service"
LABEL_COMPONENT = "mcp.component"
LABEL_OWNER = "mcp.owner"   # the node id of the agent whose workload it is

# Observed states a runtime reports.
RUNNING = "running"
STOPPED = "stopped"   # exists, not running (exited, created, powered off)
MISSING = "missing"   # the runtime has no such workload


def workload_name(service: str, component: str) -> str:
    """Container / VM name. Both parts are validated names, so this is safe."""
    return f"mcp-{service}-{component}"


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything a runtime needs to run one component."""

    service: str
    component: str
    image: str
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()          # includes PORT / PORT_<NAME>
    volumes: tuple[str, ...] = ()      # host:guest[:opts]
    ports: tuple[int, ...] = ()        # host ports; published 127.0.0.1:p -> p
    restart: str = ""
    memory_mb: int | None = None
    vcpus: int = 1
    binary: str = ""
    image_sha256: str = ""
    stop_timeout_s: float = 10.0

    @property
    def name(self) -> str:
        return workload_name(self.service, self.component)


@dataclass
class Workload:
    """One observed workload, as a runtime's ``list``/``inspect`` sees it."""

    service: str
    component: str
    runtime: str                     # "container" | "unikernel"
    state: str                       # RUNNING | STOPPED
    id: str = ""
    image: str = ""
    started_at: float | None = None  # unix time
    restart_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # VM: pid, accel, image_sha256, ...


class Runtime(Protocol):
    name: str  # "container" | "unikernel"

    def available(self) -> tuple[bool, str]:
        """(True, "") when usable on this node, else (False, what is missing)."""

    def pull(self, spec: WorkloadSpec) -> None:
        """Make the image available locally; raise ImageError if it cannot be."""

    def run(self, spec: WorkloadSpec) -> Workload:
        """Create and start the workload, replacing any existing one of that name."""

    def stop(self, service: str, component: str, timeout: float = 10.0) -> None:
        """Stop it; a missing or stopped workload is not an error."""

    def remove(self, service: str, component: str) -> None:
        """Stop if needed and delete it; missing is not an error."""

    def inspect(self, service: str, component: str) -> Workload | None: ...

    def list(self) -> list[Workload]:
        """Every workload the agent owns, in one engine call."""

    def logs(
        self, service: str, component: str, tail: int | None = None, follow: bool = False
    ) -> Iterator[bytes]: ...
