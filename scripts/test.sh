#!/usr/bin/env bash
# Set up everything and run all tests (lint, types, unit and integration).
# Integration tests must not skip here: a missing component fails them.
set -euo pipefail
. "$(dirname "$0")/env.sh"
bash "$top/scripts/setup.sh"
bash "$top/scripts/build_test_image.sh" v1 >/dev/null
bash "$top/scripts/build_test_image.sh" v2 >/dev/null
cd "$top"
ruff check mcp_node tests bench
mypy
export MCP_REQUIRE_INTEGRATION=1
python -m pytest -q -p no:cacheprovider "$@"
