"""mcp_node: per-node agent and operator CLI for podman containers and QEMU VMs."""

__version__ = "0.1.0"
