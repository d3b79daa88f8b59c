"""The grammars of the definition's small strings, each parsed in one place.

``KEY=VALUE`` env items and ``/host:/guest[:opt,opt]`` volumes are checked by
servicedef (errors name the field) and taken apart again by the runtimes and
VM builders with the same functions, so no two readers disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import ValidationError

ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VOLUME_OPTIONS = ("ro", "rw", "z", "Z")


@dataclass(frozen=True)
class Volume:
    host: str
    guest: str
    options: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def parse_env_item(item: str, field: str = "env") -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not ENV_KEY_RE.fullmatch(key):
        raise ValidationError(f"{item[:80]!r} is not KEY=VALUE", field)
    return key, value


def parse_env(items: Iterable[str], field: str = "env") -> list[tuple[str, str]]:
    """``KEY=VALUE`` items as pairs, in order; an error names ``field[i]``."""
    return [parse_env_item(item, f"{field}[{i}]") for i, item in enumerate(items)]


def parse_volume(text: str, field: str = "volumes") -> Volume:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2]):
        raise ValidationError(f"{text[:80]!r} is not /host/path:/guest/path[:opts]", field)
    if any(".." in PurePosixPath(p).parts or "," in p for p in parts[:2]):
        raise ValidationError(f"{text[:80]!r} has '..' or ','", field)
    opts = tuple(parts[2].split(",")) if len(parts) == 3 else ()
    bad = [o for o in opts if o not in VOLUME_OPTIONS]
    if bad:
        raise ValidationError(
            f"unsupported volume option(s) {', '.join(repr(o) for o in bad)} in {text[:80]!r}; "
            f"allowed: {', '.join(VOLUME_OPTIONS)}", field)
    if "ro" in opts and "rw" in opts:
        raise ValidationError(f"{text[:80]!r} is both ro and rw", field)
    return Volume(host=parts[0], guest=parts[1], options=opts)


def parse_volumes(items: Iterable[str], field: str = "volumes") -> tuple[Volume, ...]:
    return tuple(parse_volume(v, f"{field}[{i}]") for i, v in enumerate(items))
