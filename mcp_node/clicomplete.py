"""Shell completion of what the agent holds (issue 22 row 15): service and component
names from ``ps`` of the node(s) the command line names, and for ``deploy``/``plan``
the definitions of the services dir beside files.

Completion runs on every TAB, so it never starts an in-process agent (``--local``
would start podman), waits at most ``TIMEOUT_S`` for an agent, and says nothing when
none answers: the shell then offers files or nothing, never an error.
"""

from __future__ import annotations

import contextlib

import click
from click.shell_completion import CompletionItem

from .clictx import Ctx, RemoteBackend, services_dir

TIMEOUT_S = 2.0


def _ctx(ctx: click.Context) -> Ctx:
    """The root group's options as parsed so far (its callback has not run)."""
    p = ctx.find_root().params
    return Ctx(p.get("agent"), p.get("token_file"), False, p.get("node"), False,
               p.get("state_dir"))


def _rows(ctx: click.Context) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    with contextlib.suppress(Exception):   # no agent, no token, no config: no names
        for b in _ctx(ctx).backends():
            if isinstance(b, RemoteBackend):
                b.client.timeout = TIMEOUT_S
            with contextlib.suppress(Exception):
                out.extend(b.call("ps"))
    return out


def services(ctx: click.Context, param: click.Parameter,
             incomplete: str) -> list[CompletionItem]:
    names = sorted({str(r.get("service", "")) for r in _rows(ctx)})
    return [CompletionItem(n) for n in names if n and n.startswith(incomplete)]


def components(ctx: click.Context, param: click.Parameter,
               incomplete: str) -> list[CompletionItem]:
    service = ctx.params.get("service")
    names = sorted({str(r.get("component", "")) for r in _rows(ctx)
                    if r.get("service") == service})
    return [CompletionItem(n) for n in names if n and n.startswith(incomplete)]


def definitions(ctx: click.Context, param: click.Parameter,
                incomplete: str) -> list[CompletionItem]:
    """The services dir's definitions by name, then files (the shell's own listing)."""
    names: list[str] = []
    with contextlib.suppress(Exception):
        names = sorted(p.stem for p in services_dir(_ctx(ctx).cfg).glob("*.toml"))
    return [CompletionItem(n) for n in names if n.startswith(incomplete)] + files(
        ctx, param, incomplete)


def files(ctx: click.Context, param: click.Parameter,
          incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(incomplete, type="file")]
