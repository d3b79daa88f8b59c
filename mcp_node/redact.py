"""Env values are operator data (issue 20): what a reader token is shown of the answers
that carry a definition (``status``, ``history``, ``plan``, a deploy's status). The one
place it is decided: ``endpoints`` applies it to every operation ``optable`` marks
``redact`` when the caller's role is below operator; ``mcp --local`` (root on the node)
and operator and master tokens see the values."""

from __future__ import annotations

from typing import Any

REDACTED = "<redacted>"


def _env(items: Any) -> Any:
    if not isinstance(items, list):
        return items
    return [f"{str(i).partition('=')[0]}={REDACTED}" if isinstance(i, str) else i
            for i in items]


def redact_env(value: Any) -> Any:
    """``value`` with every ``env`` list's values (and a plan's env field) replaced by
    ``<redacted>``, keys kept; a new object, the input untouched."""
    if isinstance(value, list):
        return [redact_env(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _env(v) if k == "env" else redact_env(v) for k, v in value.items()}
    if out.get("field") == "env" and {"from", "to"} <= set(out):   # a plan's field change
        out["from"], out["to"] = _env(value["from"]), _env(value["to"])
    return out


def for_role(role: str | None, result: Any) -> Any:
    """What a caller of ``role`` sees (None: no token check, in-process)."""
    return redact_env(result) if role == "reader" else result
