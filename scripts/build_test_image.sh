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
# An image of an older hello.c is made again: a stamp beside the binary records which
# binary each tag was made from (not an image label: containers inherit labels).
stamp=$out/mcp-hello-$tag.stamp
if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  podman untag "$ref" "$ref" >/dev/null 2>&1 || true   # this name only; users keep the image
fi
if ! podman image exists "$ref" 2>/dev/null; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/usr/local/bin" "$root/tmp"
  cp "$bin" "$root/usr/local/bin/hello"
  tar -C "$root" -c . | podman import \
    --change 'ENTRYPOINT ["/usr/local/bin/hello"]' - "$ref" >/dev/null
fi
echo "$sum" > "$stamp"
echo "$ref"
