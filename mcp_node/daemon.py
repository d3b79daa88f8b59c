"""What makes ``mcp-agent`` a daemon that keeps a node converged, apart from the agent.

- ``StateLock``: one agent per state dir. An flock on ``<state>/agent.pid``
  (which then holds the pid), taken before anything else; a second agent
  stops there, naming the holder, having touched nothing.
- ``check_new_registry``: a registry that is new (missing, or no services)
  on a node where workloads carrying this agent's owner label run means the
  registry was lost or replaced. Starting on it would make reconcile remove
  every one of them as an orphan, so it is refused unless the operator says
  ``--adopt``.
- ``reload_plan``: SIGHUP re-reads the config; keys in ``LIVE`` are applied
  to the running agent, every other changed key is named as needing a restart.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import AgentConfig
from .errors import MCPError, RegistryError
from .files import lock_held

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("mcp_node.daemon")

LOCK_NAME = "agent.pid"

# Keys the running agent reads at use time: a reload applies them without a restart.
LIVE_SECTIONS = ("monitor", "history", "images")
# Read on every request or admission, so a reload takes effect at once (max_connections
# also sized the fd limit at start: a restart; reserved_for_operators is checked against it).
LIVE_KEYS = ("server.max_body", "server.max_tail", "server.max_log_bytes",
             "server.header_timeout_s", "server.body_timeout_s", "server.idle_timeout_s",
             "server.max_unauthenticated", "server.max_unauthenticated_per_peer",
             "server.max_connections_per_token", "server.max_streams_per_token")


class StateLock:
    """An exclusive flock on ``<state>/agent.pid``, held for the process's lifetime.

    The descriptor is close-on-exec, so helper processes the agent starts (the podman
    service) never inherit the lock and keep it after the agent has gone.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take it or raise MCPError naming the pid that holds it; writes our pid."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MCPError(
                f"another mcp-agent (pid {holder}) is running on state dir "
                f"{self.path.parent} (it holds {self.path}); stop it first, or give this "
                "one its own --state-dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Unlock (the file stays: a stale pid in it is harmless, the flock is the truth)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def held(state_dir: Path) -> bool:
    """Whether a running agent holds ``state_dir`` (its ``StateLock``)."""
    return lock_held(state_dir / LOCK_NAME)


def owned_workloads(agent: Agent) -> list[str]:
    """``runtime:name`` of every workload with this agent's owner label, per runtime.

    A runtime that is not available on this node is skipped (logged): it runs nothing.
    """
    out: list[str] = []
    for name in agent.runtime_names:
        try:
            rt = agent.available_runtime(name)
        except MCPError as exc:
            log.info("adoption check: runtime %s skipped: %s", name, exc)
            continue
        out.extend(f"{name}:{w.service}-{w.component}" for w in rt.list())
    return sorted(out)


def check_new_registry(agent: Agent, services: int | None, adopt: bool) -> list[str]:
    """Refuse (RegistryError) a new or empty registry beside this owner's workloads,
    unless ``adopt``; returns the workloads adopted as orphans (to be removed)."""
    if services:
        if adopt:
            log.info("--adopt has no effect: the registry has %d services", services)
        return []
    owned = owned_workloads(agent)
    if not owned:
        return []
    state = "missing" if services is None else "empty"
    if not adopt:
        shown = ", ".join(owned[:5]) + (f" and {len(owned) - 5} more" if len(owned) > 5 else "")
        raise RegistryError(
            f"registry {agent.registry.path} is {state}, but {len(owned)} workloads with "
            f"this node's owner label (mcp.owner={agent.owner}) exist: {shown}; refusing to "
            "start (reconcile would remove them all): restore the registry from a backup, "
            "or start mcp-agent --adopt to take them over as orphans, which are then removed")
    for w in owned:
        log.warning("adopt workload=%s registry=%s: orphan, reconcile removes it", w, state)
    return owned


def changed_keys(old: AgentConfig, new: AgentConfig) -> list[tuple[str, Any, Any]]:
    """(``section.key``, old, new) for every key whose value differs."""
    out = []
    for sec in fields(old):
        a, b = getattr(old, sec.name), getattr(new, sec.name)
        for f in fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                out.append((f"{sec.name}.{f.name}", va, vb))
    return out


def is_live(key: str) -> bool:
    return key.partition(".")[0] in LIVE_SECTIONS or key in LIVE_KEYS


def reload_plan(old: AgentConfig, new: AgentConfig) -> tuple[AgentConfig, list[str], list[str]]:
    """(config to run with, keys applied live, keys that need a restart).

    The config to run with is ``old`` with only the live keys taken from ``new``: what
    needs a restart keeps its running value, so the agent never half-applies it.
    """
    applied, restart = [], []
    run = old
    for key, _, value in changed_keys(old, new):
        section, _, name = key.partition(".")
        if is_live(key):
            run = replace(run, **{section: replace(getattr(run, section), **{name: value})})
            applied.append(key)
        else:
            restart.append(key)
    return run, applied, restart
