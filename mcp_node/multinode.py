"""Several nodes from one CLI: ask every node at once, answer from those that
answer, and find the node that holds a service.

Exit statuses the fleet reads use (documented in the README): 0 every node
answered, 4 some did not (their errors on stderr, the others' data on
stdout), 1 none did.
"""

from __future__ import annotations

from collections.abc import Callable
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

    from concurrent.futures import ThreadPoolExecutor  # only a fleet needs it: lazy

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
    """A row with NODE as configured in mcp.toml (the agent only knows its host name);
    fleet rows (``fleet`` or a deploy's ``placement`` set) already name the node that
    runs them."""
    fleet = "fleet" in row or "placement" in row
    return {**row, "node": b.node} if b.named and not fleet else row


def locate(backends: list[Backend], service: str) -> Backend:
    """The one node that has ``service``; refuse naming the nodes otherwise."""
    if len(backends) == 1:
        return backends[0]
    has, unreachable = _holders(backends, service)
    return _one_holder(backends, service, has, unreachable)


def plan_target(backends: list[Backend], service: str) -> tuple[Backend, bool]:
    """Where ``mcp plan`` asks, and whether the service is new everywhere: the node that
    has it, else (every node answered that none has it) the first, as a create plans
    the same on any node; an unreachable node might have it, so that still refuses."""
    if len(backends) == 1:
        return backends[0], False
    has, unreachable = _holders(backends, service)
    if not has and not unreachable:
        return backends[0], True
    return _one_holder(backends, service, has, unreachable), False


def _holders(backends: list[Backend],
             service: str) -> tuple[list[Backend], list[tuple[Backend, MCPError]]]:
    has, unreachable = [], []
    for b, err in _status_everywhere(backends, service):
        if err is None:
            has.append(b)
        elif err.status != NotFoundError.status:   # a remote 404 is a RemoteError
            unreachable.append((b, err))
    return has, unreachable


def _one_holder(backends: list[Backend], service: str, has: list[Backend],
                unreachable: list[tuple[Backend, MCPError]]) -> Backend:
    """The hint to pick a node with -n holds whether or not every node answered (issue
    22 row 9); the nodes that did not answer are named, each with its error, since the
    service may be on one of them."""
    if len(has) == 1:
        return has[0]
    if has:
        raise MCPError(f"service {service!r} is on nodes {', '.join(b.node for b in has)}; "
                       "pick one with -n NODE")
    down = [b.node for b, _ in unreachable]
    answered = [b.node for b in backends if b.node not in down]
    where = f"node{'s' if len(answered) > 1 else ''} {', '.join(answered)}"
    if not answered:
        raise MCPError(f"cannot tell where service {service!r} is: no node answered"
                       + "".join(f"\n  node {b.node}: {err}" for b, err in unreachable))
    if not unreachable:
        raise NotFoundError(f"unknown service {service!r} on {where}; deploy it with -n NODE")
    them = ", ".join(down)
    raise NotFoundError(
        f"unknown service {service!r} on {where}; not reachable: {them}; deploy it with "
        f"-n NODE ({them} may have it: check once {'they answer' if down[1:] else 'it answers'})"
        + "".join(f"\n  node {b.node}: {err}" for b, err in unreachable))


def _status_everywhere(backends: list[Backend],
                       service: str) -> list[tuple[Backend, MCPError | None]]:
    def one(b: Backend) -> tuple[Backend, MCPError | None]:
        try:
            b.call("status", service)
            return b, None
        except MCPError as exc:
            return b, exc

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(backends))) as pool:
        return list(pool.map(one, backends))


# -- fleet mode (issue 12): one fleet in etcd, any agent answers -----------------


def placed_text(st: dict[str, Any]) -> str:
    """Where a fleet deploy went, and by which rule; nothing for a single node."""
    if "placement" not in st:
        return ""
    how = {"pinned": "pinned", "spread": "most free memory"}.get(
        st["placement"], st["placement"])
    pending = f" (not answered yet: {st['message']})" if st.get("pending") else ""
    return f" on node {st['node']} ({how}){pending}"


def nodes_table(rows: list[dict[str, Any]]) -> str:
    from .cliformat import table

    def mem(r: dict[str, Any]) -> str:
        m = r.get("memory_mb")
        return f"{m['free']}/{m['total']}" if m else "-"

    return table(["NODE", "STATE", "ROLES", "POOL", "SERVICES", "FREE MB", "CORDONED", "LEADER"],
                 [[r["node"], r["state"], ",".join(r.get("roles", [])) or "-",
                   r.get("pool") or "-", str(r.get("services", 0)), mem(r),
                   "yes" if r.get("cordoned") else "", "yes" if r.get("leader") else ""]
                  for r in rows])


def drained_text(d: dict[str, Any]) -> str:
    lines = [f"drained {d['node']} (cordoned: new work goes elsewhere until "
             f"`mcp uncordon {d['node']}`)"]
    lines += [f"  moved {m['service']} -> {m['to']}" for m in d.get("moved", [])]
    lines += [f"  stayed {s['service']}: {s['reason']}" for s in d.get("stayed", [])]
    return "\n".join(lines)
