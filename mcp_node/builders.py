"""Which image builder a node uses: the one place that decides (design §4).

Tried in order: ops (Nanos via ops) when ``ops`` is installed, nanos (Nanos's own mkfs
from ``[qemu] nanos_dir``), initramfs (a Linux kernel plus an initramfs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import QemuConfig
from .initramfs import InitramfsBuilder
from .nanos import NanosBuilder
from .ops import OpsBuilder
from .vmimage import Builder

BUILDER_ORDER: tuple[Callable[[QemuConfig], Builder], ...] = (
    OpsBuilder, NanosBuilder, InitramfsBuilder)


@dataclass
class BuilderChoice:
    builder: Builder | None
    missing: list[str] = field(default_factory=list)   # why each earlier one was passed over


def config_problems(cfg: QemuConfig) -> list[str]:
    """A builder the config names that cannot work: the node would fall back to another
    one (or to none) without a word."""
    if not cfg.nanos_dir:
        return []
    ok, why = NanosBuilder(cfg).available()
    return [] if ok else [f"qemu.nanos_dir = {cfg.nanos_dir!r}: {why}"]


def choose_builder(cfg: QemuConfig) -> BuilderChoice:
    """The first available builder, or None with what each one lacks."""
    missing: list[str] = []
    for make in BUILDER_ORDER:
        b = make(cfg)
        ok, why = b.available()
        if ok:
            return BuilderChoice(b, missing)
        missing.append(why)
    return BuilderChoice(None, missing)
