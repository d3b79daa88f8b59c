#!/usr/bin/env bash
# Set up everything and run all tests (lint, types, unit and integration).
# Integration tests must not skip here: a missing component fails them.
#   scripts/test.sh --unit   the unit tests alone (no root, no podman): fakes and pure logic
#   scripts/test.sh ARGS     extra pytest arguments (e.g. -k deploy)
set -euo pipefail
. "$(dirname "$0")/env.sh"
if [ "${1:-}" = "--unit" ]; then
  shift
  cd "$top"
  [ -x "$top/.venv/bin/python" ] || { python3 -m venv "$top/.venv"; \
    "$top/.venv/bin/pip" install -q --disable-pip-version-check -e "$top[test]"; }
  exec python -m pytest -q -p no:cacheprovider -m "not integration" "$@"
fi
bash "$top/scripts/setup.sh"
bash "$top/scripts/build_test_image.sh" v1 >/dev/null
bash "$top/scripts/build_test_image.sh" v2 >/dev/null
cd "$top"
ruff check mcp_node tests bench
mypy
export MCP_REQUIRE_INTEGRATION=1
python -m pytest -q -p no:cacheprovider "$@"
