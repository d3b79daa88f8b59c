"""``mcp`` commands of fleet mode (one fleet in etcd, any agent answers): nodes, drain,
uncordon."""

from __future__ import annotations

import click

from .cli import emit, json_option, pass_ctx
from .clictx import Ctx
from .multinode import drained_text, nodes_table


@click.command()
@json_option
@pass_ctx
def nodes(ctx: Ctx) -> None:
    """Every node of the fleet (fleet mode), from etcd, as any agent sees it."""
    emit(ctx, ctx.backend().call("nodes"), nodes_table)


@click.command()
@click.argument("node")
@json_option
@pass_ctx
def drain(ctx: Ctx, node: str) -> None:
    """Cordon NODE and move its unpinned services to other nodes (fleet mode)."""
    emit(ctx, ctx.backend().call("drain", node), drained_text)


@click.command()
@click.argument("node")
@json_option
@pass_ctx
def uncordon(ctx: Ctx, node: str) -> None:
    """Let placements use NODE again after a drain (fleet mode)."""
    emit(ctx, ctx.backend().call("uncordon", node), lambda d: f"uncordoned {d['node']}")
