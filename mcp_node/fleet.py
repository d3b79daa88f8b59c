"""Several nodes from one CLI: ask every node at once, answer from those that
answer, and find the node that holds a service.

Exit statuses the fleet reads use (documented in the README): 0 every node
answered, 4 some did not (their errors on stderr, the others' data on
stdout), 1 none did.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .clictx import Backend
from .errors import MCPError, NotFoundError

PARTIAL_EXIT = 4


@dataclass
class Answers:
    ok: list[tuple[Backend, Any]] = field(default_factory=list)
    failed: list[tuple[Backend, MCPError]] = field(default_factory=list)

    def failures_text(self) -> list[str]:
        return [f"node {b.node}: {err}" for b, err in self.failed]


def ask_all(backends: list[Backend], call: Callable[[Backend], Any]) -> Answers:
    """``call`` on every backend in parallel; project errors are kept per node."""
    out = Answers()
    if len(backends) == 1:
        out.ok.append((backends[0], call(backends[0])))   # one node: errors as they are
        return out

    def one(b: Backend) -> tuple[Backend, Any, MCPError | None]:
        try:
            return b, call(b), None
        except MCPError as exc:
            return b, None, exc

    with ThreadPoolExecutor(max_workers=min(16, len(backends))) as pool:
        for b, value, err in pool.map(one, backends):
            if err is None:
                out.ok.append((b, value))
            else:
                out.failed.append((b, err))
    if not out.ok:
        raise MCPError("no node answered:\n  " + "\n  ".join(out.failures_text()))
    return out


def named(b: Backend, row: dict[str, Any]) -> dict[str, Any]:
    """A row with NODE as configured in mcp.toml (the agent only knows its host name)."""
    return {**row, "node": b.node} if b.named else row


def locate(backends: list[Backend], service: str) -> Backend:
    """The one node that has ``service``; refuse naming the nodes otherwise."""
    if len(backends) == 1:
        return backends[0]
    has, unreachable = [], []
    for b, err in _status_everywhere(backends, service):
        if err is None:
            has.append(b)
        elif err.status != NotFoundError.status:   # a remote 404 is a RemoteError
            unreachable.append(f"{b.node} ({err})")
    if len(has) == 1:
        return has[0]
    if has:
        raise MCPError(f"service {service!r} is on nodes {', '.join(b.node for b in has)}; "
                       "pick one with -n NODE")
    where = ", ".join(b.node for b in backends)
    msg = f"unknown service {service!r} on nodes {where}"
    if unreachable:
        msg += "; not reachable: " + ", ".join(unreachable)
    raise NotFoundError(msg + "; deploy it with -n NODE" if not unreachable else msg)


def _status_everywhere(backends: list[Backend],
                       service: str) -> list[tuple[Backend, MCPError | None]]:
    def one(b: Backend) -> tuple[Backend, MCPError | None]:
        try:
            b.call("status", service)
            return b, None
        except MCPError as exc:
            return b, exc

    with ThreadPoolExecutor(max_workers=min(16, len(backends))) as pool:
        return list(pool.map(one, backends))
