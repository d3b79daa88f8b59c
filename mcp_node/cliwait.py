"""How ``mcp`` waits on the agent: a long operation's progress on a terminal while
its call runs, and ``deploy --wait``'s poll until every component is ready."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click

from .clictx import Backend, Ctx
from .errors import MCPError
from .safetext import escape_controls

PROGRESS_POLL_S = 0.25
CLEAR_LINE = "\r\x1b[K"


def with_progress(ctx: Ctx, verb: str, what: str, call: Callable[[], Any],
                  backend: Backend | None = None) -> Any:
    """Run ``call``; on a terminal (not --json) say what runs and for how long, and each
    component's step as the agent reports it (``backend``'s progress of the service
    ``what`` names); on Ctrl-C say what the agent is still doing, since it goes on
    without us."""
    if ctx.json or not sys.stderr.isatty():
        return call()
    import threading

    box: dict[str, Any] = {}
    service = what.split("/")[0]   # "SERVICE" or "SERVICE/COMPONENT"
    shown: dict[str, str] = {}
    counted = 0

    def steps() -> None:
        if backend is None:
            return
        try:
            now = backend.call("progress", service).get("components", {})
        except MCPError:   # an older agent, or a blip: the elapsed time still shows
            return
        changed = [(c, step) for c, step in sorted(now.items()) if shown.get(c) != step]
        if not changed:
            return
        lines = [f"  {c}: {escape_controls(str(step))}" for c, step in changed]
        if not shown and not counted:
            lines.insert(0, f"{verb} {what} ...")
        shown.update(changed)
        click.echo(CLEAR_LINE + "\n".join(lines), err=True)
        if counted:   # the elapsed time stays the last line
            click.echo(f"{verb} {what} ... {counted}s", err=True, nl=False)

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised below, in the main thread
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    start = time.monotonic()
    t.start()
    try:
        while t.is_alive():
            t.join(PROGRESS_POLL_S)
            if t.is_alive():
                steps()
                if (seconds := int(time.monotonic() - start)) > counted:
                    counted = seconds
                    click.echo(f"{CLEAR_LINE}{verb} {what} ... {seconds}s", err=True, nl=False)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the agent goes on {verb} {what}; `mcp status "
                   f"{service}` shows where it is", err=True)
        sys.exit(130)
    if counted or shown:
        click.echo(f"{CLEAR_LINE}{verb} {what} ... done in {time.monotonic() - start:.1f}s",
                   err=True)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def not_ready(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in st["components"] if c["desired_state"] == "running" and not c["ready"]]


def rollout_end(st: dict[str, Any], version: int | None) -> str | None:
    """"" once the rollout of ``version`` succeeded, why once it failed or was reverted,
    None while it goes on (or, ``version`` None: no rollout to wait for, ready or not)."""
    r = st.get("rollout")
    if version is None or not r or r.get("version") != version:
        return None if not_ready(st) else ""
    if r["state"] == "succeeded":
        return ""
    if r["state"] in ("failed", "reverted") and not r.get("reverting"):
        back = f"; version {r['previous']} runs again" if r["state"] == "reverted" else ""
        return f"{st['service']}: the rollout of version {version} {r['state']}: " \
               f"{r['reason']}{back}"
    return None


def wait_ready(backend: Backend, service: str, timeout: float,
               rollout: int | None = None) -> dict[str, Any]:
    """Poll the service's status until every component that should run is ready, or,
    ``rollout`` (the version a deploy began one for), until that rollout ended: an
    error naming why unless it succeeded."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        st: dict[str, Any] = backend.call("status", service)
        end = rollout_end(st, rollout)
        if end == "":
            return st
        if end is not None:
            raise MCPError(end)
        waiting = not_ready(st)
        if time.monotonic() >= deadline:
            break
        time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 1.5, 1.0)
    if rollout is not None and not waiting:
        raise MCPError(f"{service}: the rollout of version {rollout} did not end within "
                       f"{timeout:g} s ({(st.get('rollout') or {}).get('state')})")
    lines = [f"{service}: not ready after {timeout:g} s:"]
    for c in waiting:
        lines.append(f"  {c['component']}: {c['state']}"
                     + (f", exit code {c['exit_code']}" if c.get("exit_code") is not None
                        else ""))
        try:
            tail = b"".join(backend.logs(service, c["component"], 10, False))
        except MCPError as exc:
            tail = f"(logs unavailable: {exc})".encode()
        lines.extend("    | " + ln for ln in tail.decode(errors="replace").splitlines()[-10:])
    raise MCPError("\n".join(lines))
