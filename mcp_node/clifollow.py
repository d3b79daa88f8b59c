"""``mcp events -f`` and ``mcp logs -f`` across an agent restart and a replace.

A follow is one long HTTP response. When it breaks off (the agent restarted,
the connection reset) the CLI connects again with backoff, for at most
``RECONNECT_S`` in all, then ends saying why. Events resume after the last id
seen (the ``after`` query key), so none is lost or shown twice. Logs are opened
again with a tail of 0 (lines written while the agent was away are not shown),
and a component whose output ended because it was replaced or restarted is
followed into its new run; one that stopped for good ends the follow, saying so.
What happens is said on stderr, so stdout stays the stream itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import quote, urlencode

import click

from .client import Client
from .errors import AgentUnreachable, MCPError, RemoteError

RECONNECT_S = float(os.environ.get("MCP_FOLLOW_RECONNECT_S", "60"))
POLL_S = 0.2
SAME_RUN_S = 12.0   # over two monitor rounds (5 s): a replace shows by then


def note(text: str) -> None:
    click.echo(f"mcp: {text}", err=True)


def _retry(open_: Callable[[], Iterator[bytes]], why: str, base: str) -> Iterator[bytes]:
    """``open_()`` again until it answers, with backoff, for ``RECONNECT_S`` at most
    (``why`` "": quietly, the stream ended as it should)."""
    if why:
        note(f"the stream from {base} broke off ({why}); reconnecting for up to "
             f"{RECONNECT_S:g} s")
    deadline = time.monotonic() + RECONNECT_S
    delay = POLL_S
    while True:
        try:
            return open_()
        except AgentUnreachable as exc:
            last = str(exc)
        except RemoteError as exc:
            if exc.status < 500:
                raise
            last = exc.message
        if time.monotonic() + delay > deadline:
            raise AgentUnreachable(f"gave up following: the agent at {base} did not answer "
                                   f"again within {RECONNECT_S:g} s ({last})")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _cause(exc: MCPError) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("the stream from ") else text


def events(client: Client, service: str | None, tail: int) -> Iterator[bytes]:
    """NDJSON event lines, the same stream resumed after the last id across breaks."""
    def open_(after: int | None) -> Iterator[bytes]:
        query = {"follow": "1", "tail": 0 if after is not None else tail,
                 **({"after": after} if after else {}), **({"service": service}
                                                          if service else {})}
        return client.stream(f"/v1/events?{urlencode(query)}")

    last: int | None = None
    stream = open_(None)
    while True:
        buf = b""
        try:
            for chunk in stream:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        last = _event_id(line, last)
                        yield line + b"\n"
            why = "the agent ended it"
        except AgentUnreachable as exc:
            why = _cause(exc)
        note_last = f"resuming after event {last}" if last else "new events only"
        stream = _retry(partial(open_, last or 0), f"{why}; {note_last}", client.base_url)
        note("reconnected")


def _event_id(line: bytes, last: int | None) -> int | None:
    try:
        value = json.loads(line).get("id")
    except (ValueError, AttributeError):
        return last
    return int(value) if isinstance(value, int) else last


def logs_path(service: str, component: str | None, tail: int | None, follow: bool,
              since: str | None = None, timestamps: bool = False) -> str:
    """The logs route with its query (empty keys left out)."""
    params = {"component": component or "", "tail": "" if tail is None else tail,
              "follow": "1" if follow else "", "since": since or "",
              "timestamps": "1" if timestamps else ""}
    return (f"/v1/services/{quote(service, safe='')}/logs?"
            + urlencode({k: v for k, v in params.items() if v != ""}))


Run = str | float   # a run: the status's "started_at workload_id", else its start by uptime


def _other_run(a: Run, b: Run) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a != b
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) > 1.5
    return True


def logs(client: Client, service: str, component: str | None, tail: int | None,
         since: str | None = None, timestamps: bool = False) -> Iterator[bytes]:
    """A component's output, followed across agent restarts and into a new run; or,
    no component named of several, all of them (the agent follows each into its next
    run, ``servicelogs``)."""
    base = f"/v1/services/{quote(service, safe='')}"

    def open_(n: int | None, from_: str | None = since) -> Iterator[bytes]:
        return client.stream(logs_path(service, component, n, True, from_, timestamps))

    def rows() -> list[dict[str, Any]]:
        st: dict[str, Any] = client.get(base)
        return [c for c in st["components"] if component in (None, c["component"])]

    def run_of() -> tuple[str, str, Run]:
        """(state, desired state, start) of the followed component ("" if it is down)."""
        found = rows()
        if len(found) != 1:
            raise MCPError(f"{service}: no component {component!r} any more")
        row = found[0]
        up = row["state"] in ("running", "starting", "unhealthy")
        start: Run = "" if not up else f"{row['started_at']} {row.get('workload_id') or ''}" \
            if row.get("started_at") else time.time() - float(row.get("uptime_s") or 0)
        return str(row["state"]), str(row["desired_state"]), start

    if component is None and len(rows()) > 1:
        yield from _all_of(client, service, open_, rows, tail)
        return
    stream = open_(tail)
    run = run_of()[2]
    while True:
        try:
            yield from stream
            why = ""
        except AgentUnreachable as exc:
            why = _cause(exc)
        if why:
            stream = _retry(lambda: open_(0), f"{why}; lines written meanwhile are not shown",
                            client.base_url)
            note("reconnected; following from the next line")
            continue
        # Its output ended: stopped for good, or replaced/restarted (a new run follows;
        # the status may show the old run for a monitor round yet), or the agent stopped,
        # or the agent ended the stream while the same run goes on (then, after
        # SAME_RUN_S, it is opened again).
        ended = time.monotonic()
        deadline = ended + RECONNECT_S
        away = False
        while True:
            try:
                state, desired, start = run_of()
            except AgentUnreachable:
                away, state, desired, start = True, "unknown", "running", ""
            if desired != "running" and state in ("running", "starting", "unhealthy") \
                    and time.monotonic() < deadline:
                time.sleep(POLL_S)    # being stopped: its state once it is, not before
                continue
            if desired != "running":
                note(f"{service}/{component or ''} is {state} (desired {desired}): "
                     "its output ended".replace("/ ", " "))
                return
            if start and (away or _other_run(start, run)):
                break
            if start and time.monotonic() - ended > SAME_RUN_S:
                break
            if time.monotonic() > deadline:
                note(f"its output ended and no new run began within {RECONNECT_S:g} s "
                     f"(it is {state})")
                return
            time.sleep(POLL_S)
        if away:
            stream = _retry(lambda: open_(0), "", client.base_url)
            note("reconnected; following from the next line")
        elif _other_run(start, run):
            stream = _retry(partial(_new_run, open_, run, start, since), "",
                            client.base_url)
            note("the component was replaced or restarted; following its new run")
        else:
            stream = _retry(lambda: open_(0), "", client.base_url)
            note("the stream ended while the same run goes on; following from the next line")
        run = start


def _new_run(open_: Callable[..., Iterator[bytes]], run: Run, start: Run,
             since: str | None) -> Iterator[bytes]:
    """A new run's output from its start where that can be told apart: all of a new
    workload's log (a replace; not from its StartedAt, which its first line may
    precede), a restarted one's from the restart on; else from the next line."""
    if not isinstance(start, str):
        return open_(0)
    when, _, wid = start.partition(" ")
    same = isinstance(run, str) and run.partition(" ")[2] == wid
    return open_(None, when if same else since)


def _all_of(client: Client, service: str, open_: Callable[..., Iterator[bytes]],
            rows: Callable[[], list[dict[str, Any]]], tail: int | None) -> Iterator[bytes]:
    """Every component at once: reconnected when the agent went away; ended when the
    agent ended the stream with none of them meant to run (its notes say why each)."""
    stream = open_(tail)
    while True:
        try:
            yield from stream
            why = ""
        except AgentUnreachable as exc:
            why = _cause(exc)
        if not why:
            try:
                wanted = [r["component"] for r in rows() if r["desired_state"] == "running"]
            except AgentUnreachable as exc:
                why, wanted = _cause(exc), []
            if not why and not wanted:
                note(f"{service}: no component is meant to run: the output of all ended")
                return
        stream = _retry(lambda: open_(0), f"{why}; lines written meanwhile are not shown"
                        if why else "", client.base_url)
        note("reconnected; following from the next line")
