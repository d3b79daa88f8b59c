# Sourced by the other scripts: where things are, and podman's settings.
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MCP_TOP=$top
export MCP_BUILD_DIR=${MCP_BUILD_DIR:-$top/.build}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$top/scripts/containers.conf}
export MCP_KERNEL=${MCP_KERNEL:-$MCP_BUILD_DIR/kernel/vmlinuz}
export MCP_KERNEL_MODULES=${MCP_KERNEL_MODULES:-$MCP_BUILD_DIR/kernel/modules}
export PATH=$top/.venv/bin:$PATH
