"""The runtime interface every runtime implements, and the table of runtimes.

The agent turns a validated component plus its allocated ports into a
``WorkloadSpec``; a runtime turns that into a running workload and reports
what it sees as ``Workload`` records. ``list`` must cost one call to the
underlying engine however many workloads there are: the monitor relies on it.

Capabilities the agent needs beyond the seed's seven calls are declared here
with a default (``check_capacity``, ``info``, ``status_extra``,
``tcp_check``, ``graceful_stop``, ``close``), so callers never probe for them. Runtime names
are spelled only in ``runtimenames.RUNTIMES`` (re-exported here); a new runtime
is one module and one entry.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .netplan import NetAttach, ServiceNet
from .readiness import connect
from .runtimenames import DEFAULT_RUNTIME, RUNTIME_NAMES, RUNTIMES, TRAITS, Traits
from .slots import NEXT, OLD, side_key, slot_of, split_key
from .states import MISSING, RUNNING, STOPPED, State

if TYPE_CHECKING:
    from .config import AgentConfig

__all__ = [
    "DEFAULT_RUNTIME", "LABEL_COMPONENT", "LABEL_MANAGED", "LABEL_OWNER", "LABEL_SERVICE",
    "MISSING", "RUNNING", "RUNTIMES", "RUNTIME_NAMES", "STOPPED", "Runtime", "State",
    "TRAITS", "Traits", "Workload", "WorkloadSpec", "load_runtime", "workload_name",
    "NEXT", "OLD", "key_from_name", "side_key", "slot_of", "split_key",
]

# Label keys / values that mark a workload as the agent's own.
LABEL_MANAGED = "mcp.managed"
LABEL_SERVICE = "mcp.service"
LABEL_COMPONENT = "mcp.component"
LABEL_OWNER = "mcp.owner"   # the node id of the agent whose workload it is


def workload_name(service: str, component: str) -> str:
    """Container / VM name. Both parts are validated names (``component`` may carry a
    slot, ``side_key``), so this is safe."""
    return f"mcp-{service}-{component}"


def key_from_name(name: str, service: str, component: str) -> str:
    """The key a container named ``name`` has: its component's, with the slot the name
    adds to the component's own workload name."""
    name = name.lstrip("/")
    slot = slot_of(name)
    if slot and name == workload_name(service, side_key(component, slot)):
        return side_key(component, slot)
    return component


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
    image_digest: str = ""             # "sha256:<image id>" it resolved to ("" : by name)
    secrets: tuple[str, ...] = ()      # given as /run/secrets/<name> (issue 20)
    secret_versions: tuple[tuple[str, int], ...] = ()   # of every secret it uses
    slot: str = ""                     # "" or NEXT: a start-first replace's new workload
    net: NetAttach | None = None       # bridge mode: its service network (issue 23)

    @property
    def run_image(self) -> str:
        """What the runtime runs: the resolved image itself, so a later retag of
        ``image`` cannot change what a restart runs."""
        return self.image_digest or self.image

    @property
    def key(self) -> str:
        """The component as the runtime's calls name this workload (``side_key``)."""
        return side_key(self.component, self.slot)

    @property
    def name(self) -> str:
        return workload_name(self.service, self.key)

    @property
    def digest(self) -> str:
        """What the workload is made from; a runtime keeps it with the workload
        (label, metadata) so a workload that differs from its record shows as spec
        drift. The restart policy and stop timeout are the agent's, not the workload's;
        the slot is where it runs, not what it is (a promoted one matches its record)."""
        made_of = [self.service, self.component, self.image, self.cmd, self.env,
                   self.volumes, self.ports, self.memory_mb, self.vcpus, self.binary,
                   self.image_sha256]
        if self.image_digest:   # only when set: a workload from before keeps its digest
            made_of.append(self.image_digest)
        if self.secrets or self.secret_versions:   # versions, never values (issue 20)
            made_of.append(json.dumps([self.secrets, self.secret_versions]))
        if self.net is not None:   # only when set: user-mode workloads keep their digest
            made_of.append(f"{self.net.bridge} {self.net.address}")
        return hashlib.sha256(json.dumps(made_of).encode()).hexdigest()[:16]


@dataclass
class Workload:
    """One observed workload, as a runtime's ``list``/``inspect`` sees it."""

    service: str
    component: str
    runtime: str                     # a RUNTIMES key
    state: State                     # RUNNING | STOPPED
    id: str = ""
    image: str = ""
    started_at: float | None = None  # unix time
    restart_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # runtime-specific observations
    spec_digest: str = ""            # WorkloadSpec.digest it was made from ("" unknown)
    exit_code: int | None = None     # of the last exit, where the runtime knows it
    # STOPPED though its process lives: the guest does not run (a VM's QMP status, e.g.
    # "prelaunch" when the agent died between launch and ``cont``); "" otherwise
    paused: str = ""


class Runtime(ABC):
    """One way of running a component. Subclasses set ``traits`` to what they declare in
    ``runtimenames`` and ``name`` to its name (their RUNTIMES key).

    Every implementation takes the same constructor arguments, so the agent
    builds any of them from the table.
    """

    traits: ClassVar[Traits]
    name: ClassVar[str]
    # (name, version) -> the secret's value, given by the agent (issue 20); None: no store.
    secret_source: Callable[[str, int], bytes] | None = None

    @abstractmethod
    def __init__(self, config: AgentConfig, state_dir: Path, owner: str) -> None:
        """``owner`` is this agent's node id: workloads carry it, others are not ours."""

    # -- the seed's seven calls ----------------------------------------------------------

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, "") when usable on this node, else (False, what is missing)."""

    @abstractmethod
    def pull(self, spec: WorkloadSpec) -> None:
        """Make the image available locally; raise ImageError if it cannot be."""

    def resolve(self, spec: WorkloadSpec, always: bool = False) -> str:
        """The image ID ("sha256:<hex>") ``spec.image`` means on this node, pulled when
        it is missing (``always``: pulled anyway, so a moved tag is seen); "" when the
        runtime cannot tell (then it runs by name). With ``spec.image_digest`` set, that
        image must be here: ImageError naming the image and digest otherwise."""
        self.pull(spec)
        return ""

    def remove_image(self, digest: str, names: frozenset[str]) -> str:
        """Remove the image ``digest`` if no container uses it and every name it has is
        in ``names`` (references the agent recorded for it). Returns "" when removed,
        else why not (a few words). Must not raise."""
        return "not supported by this runtime"

    @abstractmethod
    def run(self, spec: WorkloadSpec) -> Workload:
        """Create and start the workload, replacing any existing one of that name."""

    @abstractmethod
    def promote(self, service: str, component: str) -> None:
        """Make the component's ``NEXT`` workload its own, and the one it replaces (if
        any) its ``OLD`` (an earlier ``OLD`` removed); both keep running. Workload keys
        (``component`` in every call) may carry a slot, ``side_key``."""

    def start(self, service: str, component: str) -> bool:
        """Start an existing, stopped workload as it is (its log kept).

        False when there is nothing to start; the agent then runs it anew.
        """
        return False

    @abstractmethod
    def stop(self, service: str, component: str, timeout: float = 10.0) -> None:
        """Stop it; a missing or stopped workload is not an error."""

    @abstractmethod
    def remove(self, service: str, component: str) -> None:
        """Stop if needed and delete it; missing is not an error."""

    @abstractmethod
    def inspect(self, service: str, component: str) -> Workload | None:
        """The workload if it exists (running or not), else None."""

    @abstractmethod
    def list(self, service: str | None = None) -> list[Workload]:
        """Every workload the agent owns (of ``service`` alone: after an operation on
        it, so its cost does not grow with the node's other services), in one engine
        call."""

    @abstractmethod
    def logs(
        self, service: str, component: str, tail: int | None = None, follow: bool = False,
        max_bytes: int | None = None, timestamps: bool = False,
    ) -> Iterator[bytes]:
        """Its output; with ``follow``, until the workload ends or the caller closes.

        At most ``tail`` lines and ``max_bytes`` bytes of what is there already, the
        newest (``logtail``), read in bounded steps: never the whole log in memory.
        ``timestamps``: each line starts with its time as a ``logtime`` key and a space
        (what ``mcp logs SERVICE`` orders the lines of several components by).
        """

    # -- capabilities, with the defaults of a runtime that has nothing to say -------------

    def check_capacity(self, spec: WorkloadSpec, replacing: bool) -> None:
        """Raise ResourceError if running ``spec`` would overcommit the node.

        ``replacing``: a workload of the same name exists and is given up for it.
        """
        return None

    def info(self) -> dict[str, Any]:
        """Facts for the node's health (accel, socket, usage); must not raise."""
        return {}

    def health_reasons(self) -> builtins.list[str]:
        """Why this runtime makes the node degraded (e.g. a fallback in use); must not raise."""
        return []

    @classmethod
    def config_problems(cls, config: AgentConfig) -> builtins.list[str]:
        """What the configuration asks of this runtime that cannot work here (a path
        that is not there): ``check-config`` warns of it before a start, health names
        it after (the runtime may still run with a fallback); must not raise."""
        return []

    def status_extra(self, spec: WorkloadSpec, observed: Workload | None) -> dict[str, Any]:
        """Extra keys this runtime adds to a component's status (flat, JSON-safe)."""
        return {}

    def tcp_check(self, service: str, component: str, port: int, timeout: float) -> str:
        """A ``tcp`` check on the workload's host ``port``: "" when the workload itself
        accepted a connection, else why not (a few words). Default: a plain connect,
        which proves it where the host port reaches the workload's own socket."""
        return connect(port, timeout)

    def tcp_by_connect(self, service: str, component: str) -> bool:
        """Whether a plain connect to the workload's host ports is its ``tcp`` check now
        (the default's): the checker then connects to many side by side from its own
        thread (``readiness.connect_all``) instead of calling ``tcp_check`` for each."""
        return True

    def ensure_network(self, net: ServiceNet, clear: Callable[[], None]) -> None:
        """Bridge mode: make this runtime's own network on ``net``'s bridge, if it needs
        one (``traits.joins_by == "network"``), before ``run`` of a workload on it;
        ``clear`` is called before a create (``podman_networks.ensure``)."""
        return None

    def remove_network(self, service: str) -> None:
        """Bridge mode: remove what ``ensure_network`` made (no error when absent)."""
        return None

    def network_names(self) -> set[str]:
        """Bridge mode: the names of the service networks that exist now (one listing,
        each round: one removed by hand is made again)."""
        return set()

    @property
    def graceful_stop(self) -> bool:
        """Whether ``stop`` lets the workload end itself before it is killed."""
        return True

    def close(self) -> None:
        """Release connections and helper processes; workloads keep running."""
        return None


def load_runtime(name: str) -> type[Runtime]:
    """The implementation registered as ``name``; KeyError for an unknown name."""
    module, _, cls = RUNTIMES[name].partition(":")
    impl: type[Runtime] = getattr(importlib.import_module(module), cls)
    return impl
