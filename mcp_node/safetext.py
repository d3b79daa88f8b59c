"""Untrusted text in and out: strict JSON/TOML reading, control characters escaped.

A definition or request body is read the same way wherever it enters (the API, ``mcp``
reading a file or stdin): a key given twice is refused (the last one silently winning
would hide what the author meant), and nesting is capped at ``MAX_DEPTH``, so a deep
document is a one-line error naming where it came from instead of a RecursionError
traceback. On the way out, text that came from a client or a workload (a volume path,
a podman message) reaches a log line or a terminal with its control characters as
``\\xNN``, so it cannot move the cursor, retitle the window or forge a log line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import ValidationError

MAX_DEPTH = 32  # a definition needs 5 (components[].routes[].port); the API bodies fewer

# C0, DEL, C1; U+2028/2029 (line breaks to some readers); the bidi embeddings, overrides
# and isolates (they reorder what a terminal shows); lone surrogates (no UTF-8 exists).
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_LOG_RE = re.compile(f"[{_CONTROLS}]")
_TERMINAL_RE = re.compile(f"(?![\n\t])[{_CONTROLS}]")


def escape_char(c: str) -> str:
    """``\\xNN`` below U+0100, else ``\\uNNNN``: the access log's spelling too."""
    o = ord(c)
    return f"\\x{o:02x}" if o < 256 else f"\\u{o:04x}"


def _sub(m: re.Match[str]) -> str:
    return escape_char(m.group())


def escape_controls(text: str) -> str:
    """Every control character escaped, line breaks too: one log record, one line."""
    return _LOG_RE.sub(_sub, text) if _LOG_RE.search(text) else text


def for_terminal(text: str) -> str:
    """As ``escape_controls`` but newline and tab kept: a table or a status stays laid out."""
    return _TERMINAL_RE.sub(_sub, text) if _TERMINAL_RE.search(text) else text


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def _depth_error(where: str | None) -> ValidationError:
    return ValidationError(f"nested deeper than {MAX_DEPTH} levels (the limit)", where)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice in one JSON object."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k[:40]!r} in a JSON object")
            seen.add(k)
    return out


def loads_json(text: str, where: str | None) -> Any:
    """JSON with unique keys, at most ``MAX_DEPTH`` deep; ValidationError naming ``where``."""
    try:
        data = json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError as exc:
        raise _depth_error(where) from exc
    except ValueError as exc:
        msg = str(exc)
        raise ValidationError(msg if msg.startswith("duplicate key ")
                              else f"not valid JSON: {msg}", where) from exc
    if _too_deep(data):
        raise _depth_error(where)
    return data


def loads_toml(text: str, where: str | None) -> dict[str, Any]:
    """TOML at most ``MAX_DEPTH`` deep; a syntax error is ``not valid TOML: ...``, a deep
    document names ``where`` and the limit."""
    import tomllib  # only where TOML is read: every mcp start pays for its imports

    try:
        data = tomllib.loads(text)
    except RecursionError as exc:
        raise _depth_error(where) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"not valid TOML: {exc}") from exc
    if _too_deep(data):
        raise _depth_error(where)
    return data
