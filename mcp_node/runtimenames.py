"""The runtimes' names, alone in a leaf module: the definition parser, and so every
``mcp deploy``, needs the names, not the runtime interface behind them."""

from __future__ import annotations

# name -> "module:Class", imported on first use (a node without qemu never imports it).
# Runtime names are spelled only here; a new runtime is one module and one entry.
RUNTIMES: dict[str, str] = {
    "container": "mcp_node.podman:PodmanRuntime",
    "unikernel": "mcp_node.qemu:QemuRuntime",
}
RUNTIME_NAMES: tuple[str, ...] = tuple(RUNTIMES)
DEFAULT_RUNTIME = RUNTIME_NAMES[0]
