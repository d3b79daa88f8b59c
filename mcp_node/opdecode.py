"""An operation's arguments from a request, as ``optable`` declares them: each is
checked by its kind, and anything else is a 400 naming the field. The API's generic
endpoint decodes with it; ``mcp --local`` checks its arguments the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ValidationError
from .grammar import check_secret_name
from .httpapi import Params, edge_setup_args, parse_bool, parse_count, parse_json
from .optable import Op
from .secretstore import decode_value
from .servicedef import check_hostname, check_int, check_name, from_dict

MAX_EVENTS = 10000


def _seconds(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        raise ValidationError("must be a number of seconds, 0-3600", field)
    return float(value)


def _version(value: Any, field: str) -> int:
    version = check_int(value, field)
    if not 1 <= version <= 1 << 31:
        raise ValidationError(f"must be an integer 1-{1 << 31}", field)
    return version


def _edge_route(data: Any, field: str) -> dict[str, Any]:
    hostname, backend, port, tls = edge_setup_args(data)
    return {"hostname": hostname, "backend_hostname": backend, "backend_port": port,
            "backend_tls": tls}


# How an argument of each kind is checked: its value (or, for ``json`` arguments that
# stand for several parameters, a mapping of them) or a 400 naming the field.
KINDS: dict[str, Callable[[Any, str], Any]] = {
    "name": check_name,
    "hostname": check_hostname,
    "seconds": _seconds,
    "version": _version,
    "events": lambda raw, field: parse_count(str(raw), field, MAX_EVENTS, " events"),
    "definition": lambda data, field: from_dict(data),
    "flag": lambda raw, field: raw if isinstance(raw, bool) else parse_bool(str(raw), field),
    "edge_route": _edge_route,
    "secret_name": check_secret_name,
    "secret_value": decode_value,
}
SPREAD = ("edge_route",)   # kinds that stand for several parameters


def decode(op: Op, params: Params, query: dict[str, str], body: bytes) -> dict[str, Any]:
    """The call's keyword arguments from the request, as the table declares them; a
    400 naming the field for anything else. An absent optional argument is left out,
    so the method's default holds."""
    out: dict[str, Any] = {}
    in_body = [a for a in op.args if a.where == "body"]
    data: Any = None
    if in_body:
        data = parse_json(body) if body.strip() else {}
        allowed = sorted(a.name for a in in_body)
        if not isinstance(data, dict) or set(data) - set(allowed):
            raise ValidationError(f"expected {{}} or an object with {', '.join(allowed)}",
                                  "body")
    elif any(a.where == "json" for a in op.args):
        data = parse_json(body)
    for a in op.args:
        check = KINDS[a.kind]
        if a.where == "path":
            out[a.name] = check(params[a.name], a.name)
        elif a.where == "query":
            if query.get(a.name):           # empty is absent
                out[a.name] = check(query[a.name], a.name)
        elif a.where == "body":
            if a.name in data:              # null is a value, refused like any other
                out[a.name] = check(data[a.name], a.name)
        elif a.kind in SPREAD:
            out.update(check(data, a.name))
        else:
            out[a.name] = check(data, a.name)
    return out
