"""What a deploy would change: a pure comparison of two service definitions.

The agent replaces a component whose definition differs in any field and
leaves an identical, running one alone; ``plan`` says the same thing ahead
of time, field by field, so an operator sees that a changed env recreates a
container before it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from .servicedef import ComponentDef, ServiceDef


@dataclass(frozen=True)
class Change:
    action: str            # create | replace | remove | start | stop | set
    component: str         # "" for set: the service's own tables, no workload
    fields: tuple[tuple[str, Any, Any], ...] = ()   # (field, deployed, new)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "component": self.component, "reason": self.reason,
                "fields": [{"field": f, "from": plain(a), "to": plain(b)}
                           for f, a, b in self.fields]}


@dataclass
class Plan:
    service: str
    changes: list[Change] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    return value


# How an image is resolved is no part of what runs: the digest it resolved to is.
NOT_RUN = ("pull",)


def differences(old: ComponentDef, new: ComponentDef) -> tuple[tuple[str, Any, Any], ...]:
    return tuple((f.name, getattr(old, f.name), getattr(new, f.name)) for f in fields(old)
                 if f.name not in NOT_RUN and getattr(old, f.name) != getattr(new, f.name))


def carried(deployed: ServiceDef | None, new: ServiceDef) -> ServiceDef:
    """``new`` with the deployed digest of each component whose reference is unchanged:
    a plan that cannot resolve images (a fleet's) shows no digest change, never a
    spurious one."""
    if deployed is None:
        return new
    had = {c.name: c for c in deployed.components}
    return replace(new, components=tuple(
        replace(c, image_digest=had[c.name].image_digest)
        if not c.image_digest and c.name in had and had[c.name].image == c.image else c
        for c in new.components))


def plan(deployed: ServiceDef | None, new: ServiceDef,
         states: dict[str, str] | None = None) -> Plan:
    """Changes from ``deployed`` (None: not deployed) to ``new``; ``states`` are the
    components' observed states, so a component that is down shows as started."""
    out = Plan(new.name)
    states = states or {}
    old = {c.name: c for c in deployed.components} if deployed else {}
    for c in new.components:
        prev = old.get(c.name)
        if prev is None:
            out.changes.append(Change("create" if new.active else "stop", c.name,
                                      reason="new component"))
            continue
        diff = differences(prev, c)
        if diff:
            out.changes.append(Change("replace", c.name, diff,
                                      "definition differs"))
        elif new.active and states.get(c.name, "running") != "running":
            out.changes.append(Change("start", c.name,
                                      reason=f"is {states.get(c.name)}"))
        elif not new.active and deployed is not None and deployed.active:
            out.changes.append(Change("stop", c.name, reason="service made inactive"))
    names = {c.name for c in new.components}
    out.changes.extend(Change("remove", n, reason="not in the new definition")
                       for n in old if n not in names)
    if deployed is not None:
        diff = tuple((f"{table}.{f.name}", getattr(a, f.name), getattr(b, f.name))
                     for table, a, b in (("update", deployed.update, new.update),
                                         ("network", deployed.network, new.network))
                     for f in fields(a) if getattr(a, f.name) != getattr(b, f.name))
        if diff:
            out.changes.append(Change("set", "", diff, "service settings differ; no "
                                                        "workload is replaced for them"))
    return out


def plan_dict(p: Plan) -> dict[str, Any]:
    """The plan as the API answers it (and ``mcp --json plan`` prints it)."""
    return {"service": p.service, "changed": p.changed,
            "changes": [c.to_dict() for c in p.changes]}


def plan_text(p: dict[str, Any]) -> str:
    """``plan_dict``'s form as ``mcp plan`` prints it."""
    if not p["changes"]:
        return f"{p['service']}: no changes"
    lines = [f"{p['service']}: {len(p['changes'])} change(s)"]
    for ch in p["changes"]:
        lines.append(f"  {ch['action']} {ch['component'] or '(service)'}"
                     + (f" ({ch['reason']})" if ch["reason"] else ""))
        lines.extend(f"      {f['field']}: {f['from']!r} -> {f['to']!r}" for f in ch["fields"])
    return "\n".join(lines)
