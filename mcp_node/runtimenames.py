"""Each runtime's name and traits, alone in a leaf module: the definition parser
(and so every ``mcp deploy``), placement and the API document need what a runtime
asks of a component, not the runtime interface behind it.

A runtime declares here what it is (``Traits``: its name, where its implementation
lives, what a component must or may say for it, what of it counts toward a node's
capacity), and its implementation points back at its own (``Runtime.traits``).
Runtime names are spelled only here; a new runtime is one module and one ``Traits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_VM_MEMORY_MB = 64     # below this no guest boots


@dataclass(frozen=True)
class Traits:
    name: str
    impl: str                             # "module:Class", imported on first use
    kind: str                             # what a component of it is, in messages
    memory_required: bool = False         # memory_mb > 0 (and >= min_memory_mb) is required
    min_memory_mb: int = 0
    own_keys: tuple[str, ...] = ()        # keys only runtimes declaring them act on
    counts_vcpus: bool = False            # its vcpus count toward a node's capacity
    # bridge mode (issue 23): "tap" = a TAP device the agent makes and attaches to the
    # service's bridge; "network" = the runtime's own network on that bridge
    joins_by: str = "network"

    def openapi(self) -> dict[str, Any]:
        """The JSON Schema a component of this runtime adds (empty: nothing)."""
        if not self.memory_required:
            return {}
        return {"required": ["memory_mb"],
                "properties": {"memory_mb": {"minimum": self.min_memory_mb}}}


CONTAINER = Traits("container", "mcp_node.podman:PodmanRuntime", "container")
UNIKERNEL = Traits("unikernel", "mcp_node.qemu:QemuRuntime", "VM", memory_required=True,
                   min_memory_mb=MIN_VM_MEMORY_MB,
                   own_keys=("vcpus", "binary", "image_sha256"), counts_vcpus=True,
                   joins_by="tap")

TRAITS: dict[str, Traits] = {t.name: t for t in (CONTAINER, UNIKERNEL)}
RUNTIMES: dict[str, str] = {name: t.impl for name, t in TRAITS.items()}
RUNTIME_NAMES: tuple[str, ...] = tuple(TRAITS)
DEFAULT_RUNTIME = RUNTIME_NAMES[0]
OWN_KEYS: dict[str, tuple[str, ...]] = {   # key -> the runtimes that act on it
    key: tuple(t.name for t in TRAITS.values() if key in t.own_keys)
    for t in TRAITS.values() for key in t.own_keys}
