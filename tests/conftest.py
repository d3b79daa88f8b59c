"""Shared fixtures. Every test gets its own state directory and config home.

Integration tests call ``need(...)``: where a real component is missing they
are skipped with the reason, except under ``MCP_REQUIRE_INTEGRATION=1``
(set by .ci/run), where a missing component fails the test instead.

A test that uses any fixture of the ``*_env`` modules (real podman, qemu,
Caddy, Pebble, dnsmasq, a live agent) is marked ``integration`` at
collection, so ``scripts/test.sh --unit`` (``-m "not integration"``) runs
the rest alone; ``need()`` outside such a test is an error, which keeps the
marker honest.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TOP = Path(__file__).resolve().parent.parent


INTEGRATION_MODULES = ("podman_env", "qemu_env", "edge_env", "server_env", "daemon_env",
                       "etcd_env", "route_env", "registry_env")
_current: list[pytest.Item] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.func.__module__ in INTEGRATION_MODULES for chain in defs for d in chain):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _current[:] = [item]


def need(*tools: str, also: tuple[str, ...] = ()) -> None:
    """Skip (fail under MCP_REQUIRE_INTEGRATION=1) unless every tool is on PATH.

    ``also`` names other missing prerequisites the caller found itself.
    """
    if _current and _current[0].get_closest_marker("integration") is None:
        pytest.fail(f"{_current[0].nodeid} needs real components but uses no fixture of "
                    f"{', '.join(INTEGRATION_MODULES)}; it would run under --unit")
    lacking(*[t for t in tools if shutil.which(t) is None], *also)


def lacking(*missing: str) -> None:
    """Skip for what is missing, naming it; under MCP_REQUIRE_INTEGRATION=1 fail instead.
    Every skip of the suite comes through here (test_skips.py checks): integration tests
    call ``need``, a unit test calls this for a host file it reads (busybox, a kernel)."""
    if not missing:
        return
    reason = f"needs {', '.join(missing)} (run scripts/setup.sh)"
    if os.environ.get("MCP_REQUIRE_INTEGRATION") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def until(what: Callable[[], Any], timeout: float, msg: str, every: float = 0.05) -> Any:
    """``what()``'s first truthy answer, asked every ``every`` s; fails with ``msg`` after
    ``timeout`` s (a bounded wait, never a timed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, msg
        time.sleep(every)


def need_module(name: str) -> Any:
    """``name`` imported, or a skip through ``lacking`` (a test extra not installed)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        lacking(f"the Python module {name} (pip install -e .[test])")
        return None


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for var in ("MCP_AGENT", "MCP_TOKEN_FILE", "MCP_AGENT_CONFIG", "MCP_CLI_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CONTAINERS_CONF", os.environ.get(
        "CONTAINERS_CONF", str(TOP / "scripts" / "containers.conf")))
    yield state / "mcp"


# Area fixtures live in their own modules; importing them here registers them.
import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from edge_env import *  # noqa: E402,F401,F403
from etcd_env import *  # noqa: E402,F401,F403
from podman_env import *  # noqa: E402,F401,F403
from qemu_env import *  # noqa: E402,F401,F403
from registry_env import *  # noqa: E402,F401,F403
from route_env import *  # noqa: E402,F401,F403
from server_env import *  # noqa: E402,F401,F403
