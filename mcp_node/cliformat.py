"""How the CLI shows data as text: tables and the status, summary and health
views. Pure functions of the JSON the agent answers, so tests pin exact output.
What the agent relays (an event's detail, a podman message) is shown with its control
characters escaped (safetext): a cell or an event stays one line, and ``mcp``'s output
as a whole passes ``safetext.for_terminal`` (cli.emit, cli.ErrorGroup)."""

from __future__ import annotations

import json
from typing import Any

from .safetext import escape_controls
from .states import RUNNING, UNKNOWN


def fmt_uptime(seconds: int | None, state: str) -> str:
    if state != RUNNING or seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned columns; a cell is one line, its control characters escaped."""
    rows = [[escape_controls(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def ps_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["SERVICE", "COMPONENT", "NODE", "RUNTIME", "STATE", "VERSION", "UPTIME", "PORTS"],
        [[r["service"], r["component"], r["node"], r["runtime"], r["state"], r["version"],
          fmt_uptime(r.get("uptime_s"), r["state"]), ports_text(r["routes"])] for r in rows],
    )


def ports_text(routes: list[dict[str, Any]]) -> str:
    return ",".join(f"{r['name'] + '=' if r['name'] else ''}127.0.0.1:{r['host_port']}"
                    for r in routes) or "-"


# Keys every component's status has; a runtime's own keys (status_extra) are the rest.
COMMON_STATUS_KEYS = frozenset({
    "service", "component", "node", "runtime", "state", "desired_state", "version",
    "uptime_s", "routes", "image", "drift", "flapping", "ready", "restarts", "exit_code",
    "next_attempt", "spec_drift", "check", "started_at", "workload_id",
})


def status_value(value: Any) -> str:
    """One value of a runtime's status keys on a single line; ``-`` when empty."""
    if value is None or value == "" or (isinstance(value, list | tuple | dict) and not value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def check_text(chk: dict[str, Any]) -> str:
    """The last check result: ``ok at <time> (accepted)``."""
    return (f"{'ok' if chk.get('ok') else 'failed'} at {chk.get('time')}"
            f"{' (' + str(chk['detail']) + ')' if chk.get('detail') else ''}")


def status_text(st: dict[str, Any]) -> str:
    lines = [f"service {st['service']} on {st['node']}: "
             f"{'active' if st['active'] else 'inactive'}"
             f"{', DRIFT' if st['drift'] else ''}{', FLAPPING' if st['flapping'] else ''}"]
    lines.append(table(
        ["COMPONENT", "RUNTIME", "STATE", "DESIRED", "VERSION", "UPTIME", "RESTARTS", "PORTS",
         "DRIFT"],
        [[c["component"], c["runtime"], c["state"], c["desired_state"], c["version"],
          fmt_uptime(c.get("uptime_s"), c["state"]), str(c.get("restarts", 0)),
          ports_text(c["routes"]),
          "spec" if c.get("spec_drift") else "yes" if c["drift"] else "no"]
         for c in st["components"]],
    ))
    if st.get("rollout"):
        lines.append(escape_controls(rollout_text(st["rollout"])))
    for c in st["components"]:
        if c.get("exit_code") is not None or c.get("next_attempt"):
            lines.append(f"  {c['component']}: last exit code {status_value(c.get('exit_code'))}"
                         f", next attempt {status_value(c.get('next_attempt'))}")
        extra = sorted(set(c) - COMMON_STATUS_KEYS)
        if extra:
            lines.append(f"  {c['component']}: "
                         + " ".join(f"{k}={status_value(c[k])}" for k in extra))
        if c.get("check"):
            lines.append(f"  {c['component']}: check {check_text(c['check'])}")
    if st["events"]:
        lines.append("events:")
        for e in st["events"][-10:]:
            when = e["time"]
            detail = f" ({e['detail']})" if e["detail"] else ""
            lines.append("  " + escape_controls(
                f"{when} {e['component'] or 'service'}: {change_text(e)}{detail}"))
    return "\n".join(lines)


def change_text(e: dict[str, Any]) -> str:
    """``from -> to``; a service's event (a deploy, a rollout's end) may have no from."""
    return f"{e['from']} -> {e['to']}" if e["from"] else str(e["to"])


def rollout_text(r: dict[str, Any]) -> str:
    state = r["state"] + (", reverting" if r.get("reverting") else "")
    return f"rollout of version {r['version']}: {state}" + (
        f" ({r['reason']})" if r.get("reason") else "")


def services_summary(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["service"], []).append(r)
    out = []
    for name, comps in by.items():
        running = sum(c["state"] == RUNNING for c in comps)
        drift = any((c["desired_state"] == RUNNING) != (c["state"] == RUNNING)
                    for c in comps if c["state"] != UNKNOWN)
        out.append([name, comps[0]["node"], f"{running}/{len(comps)}", "yes" if drift else "no"])
    return table(["SERVICE", "NODE", "RUNNING", "DRIFT"], out)


def health_text(h: dict[str, Any]) -> str:
    lines = [f"status: {h['status']}", f"node: {h.get('node', '')}",
             f"containers: {h.get('containers', 0)}"]
    for name, info in sorted(h.get("runtimes", {}).items()):
        extra = " ".join(f"{k}={status_value(v)}" for k, v in sorted(info.items())
                         if k not in ("available", "reason") and not isinstance(v, dict | list))
        state = "available" if info.get("available") else "unavailable"
        lines.append(f"runtime {name}: {state}{' ' + extra if extra else ''}")
    net = h.get("network")
    if isinstance(net, dict):   # issue 23: which networking services get, and why
        lines.append(f"network: {net.get('mode')}" + (
            f" ({net['cidr']}, {net.get('services', 0)} service network(s))"
            if net.get("cidr") else "") + (
            f" (configured: {net['configured']})" if net.get("configured") != net.get("mode")
            else ""))
    for reason in h.get("reasons", []):
        lines.append(f"reason: {reason}")
    return "\n".join(lines)
