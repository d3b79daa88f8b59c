"""A service's own tables (design §10 ``[update]``, issue 23 ``[network]``): how a deploy
replaces what runs and who may reach it. Neither is part of any component, so changing
one replaces no workload; ``servicedef`` validates the rest of a definition."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from .errors import ValidationError
from .grammar import MAX_LIST, check_name, check_seconds
from .problems import Problems

# "start-first": the new workload beside the old one, switched at the node proxy; a
# component whose routes the node proxy does not serve is replaced stop-first.
UPDATE_ORDERS = ("", "stop-first", "start-first")
UPDATE_KEYS = ("order", "min_healthy_s", "healthy_deadline_s", "auto_revert", "drain_s")
NETWORK_KEYS = ("allow_from",)


@dataclass(frozen=True)
class UpdateDef:
    """How a deploy replaces what runs (design §10 ``[update]``)."""

    order: str = ""                  # "" (stop-first), "stop-first" or "start-first"
    min_healthy_s: float = 5.0
    healthy_deadline_s: float = 60.0  # counted as at least min_healthy_s
    auto_revert: bool = True
    drain_s: float = 5.0


@dataclass(frozen=True)
class NetworkDef:
    """Bridge mode (issue 23): which other services' components may open connections to
    this service's (its own ``[network]``; the target says who may reach it, as an
    ingress policy does). Replies pass by conntrack; nothing else crosses."""

    allow_from: tuple[str, ...] = ()


def _table(data: object, keys: tuple[str, ...], where: str, p: Problems) -> dict[str, Any]:
    """``data`` as a table ({} when absent), its unknown keys noted in ``p``."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationError("must be a table", where)
    p.keys(data, keys, where + ".")
    return data


def update_of(data: object) -> UpdateDef:
    """The ``[update]`` table."""
    p = Problems()
    data = _table(data, UPDATE_KEYS, "update", p)
    d = UpdateDef()
    order = data.get("order", d.order)
    if order not in UPDATE_ORDERS:
        p.add(ValidationError(f"{str(order)[:40]!r} is not stop-first or start-first",
                              "update.order"))
    revert = data.get("auto_revert", d.auto_revert)
    if not isinstance(revert, bool):
        p.add(ValidationError("must be a boolean", "update.auto_revert"))

    def seconds(key: str, low: float, high: float) -> float:
        return p.take(lambda: check_seconds(data.get(key, getattr(d, key)), f"update.{key}",
                                            low, high), 0.0)

    out = UpdateDef(order=order, auto_revert=revert,
                    min_healthy_s=seconds("min_healthy_s", 0, 3600),
                    healthy_deadline_s=seconds("healthy_deadline_s", 1, 86400),
                    drain_s=seconds("drain_s", 0, 3600))
    p.done()
    return out


def network_of(data: object, name: str) -> NetworkDef:
    """The ``[network]`` table of service ``name``."""
    p = Problems()
    data = _table(data, NETWORK_KEYS, "network", p)
    raw = data.get("allow_from", [])
    if not isinstance(raw, list) or len(raw) > MAX_LIST:
        raise ValidationError(f"must be a list of at most {MAX_LIST} service names",
                              "network.allow_from")
    names: list[str] = []
    for i, n in enumerate(raw):
        where = f"network.allow_from[{i}]"
        n = p.take(partial(check_name, n, where), "")
        if n and n in (name, *names):
            p.add(ValidationError("names the service itself (its components always reach "
                                  "each other)" if n == name else f"{n!r} is named twice", where))
        elif n:
            names.append(n)
    p.done()
    return NetworkDef(tuple(sorted(names)))
