#!/usr/bin/env bash
# Build the test workload image localhost/mcp-hello:<tag> from tests/images/hello.c.
# No registry is reachable here, so the image is imported from a local rootfs.
# Usage: scripts/build_test_image.sh [TAG]   (prints the image reference)
set -euo pipefail
tag=${1:-v1}
top=$(cd "$(dirname "$0")/.." && pwd)
out=${MCP_BUILD_DIR:-$top/.build}
mkdir -p "$out"
bin=$out/hello
if [ ! -x "$bin" ] || [ "$top/tests/images/hello.c" -nt "$bin" ]; then
  gcc -static -O2 -Wall -o "$bin" "$top/tests/images/hello.c"
fi
ref=localhost/mcp-hello:$tag
sum=$(sha256sum "$bin" | cut -c1-16)
# An image of an older hello.c is made again (its label is the binary's digest).
have=$(podman image inspect --format '{{index .Labels "mcp.hello"}}' "$ref" 2>/dev/null || true)
if [ -n "$have" ] && [ "$have" != "$sum" ] || \
   { podman image exists "$ref" 2>/dev/null && [ -z "$have" ]; }; then
  podman rmi -f "$ref" >/dev/null 2>&1 || true
fi
if ! podman image exists "$ref" 2>/dev/null; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/usr/local/bin" "$root/tmp"
  cp "$bin" "$root/usr/local/bin/hello"
  tar -C "$root" -c . | podman import \
    --change 'ENTRYPOINT ["/usr/local/bin/hello"]' --change "LABEL mcp.hello=$sum" \
    - "$ref" >/dev/null
fi
echo "$ref"
