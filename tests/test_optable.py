"""optable: every operation declared once (issue 17). The routes, the OpenAPI document,
the Operations interface, the endpoints and the CLI's two backends agree with it, and
an operation answers the same through ``mcp --local`` as through the API."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld
from live_server import fake_live

from mcp_node import openapi
from mcp_node.clictx import LocalBackend, RemoteBackend
from mcp_node.endpoints import APIHandler
from mcp_node.errors import MCPError
from mcp_node.httpapi import ROUTES
from mcp_node.operations import Operations
from mcp_node.optable import BY_CLI, OPS, Op, bind

PKG = Path(__file__).resolve().parent.parent / "mcp_node"


def test_routes_are_the_table() -> None:
    assert [(r.method, r.template, r.role, r.handler, r.op) for r in ROUTES] == \
        [(o.verb, o.path, o.role, o.handler, o) for o in OPS]
    assert len({(o.verb, o.path) for o in OPS}) == len(OPS)
    assert len({o.op_id for o in OPS}) == len(OPS)


def test_the_document_has_exactly_the_table() -> None:
    doc = openapi.document()
    documented = {(m.upper(), path): op for path, ops in doc["paths"].items()
                  for m, op in ops.items()}
    assert set(documented) == {(o.verb, o.path) for o in OPS}
    for o in OPS:
        d = documented[(o.verb, o.path)]
        assert (d["operationId"], d["x-mcp-role"]) == (o.op_id, o.role), o.op_id
        where = {p["name"]: p["in"] for p in d.get("parameters", [])}
        for a in o.args:
            if a.where in ("path", "query"):
                assert where.get(a.name) == a.where, (o.op_id, a.name)
        has_body = any(a.where in ("body", "json") for a in o.args)
        assert ("requestBody" in d) == has_body, o.op_id
        if any(a.where == "body" for a in o.args):      # an object of optional keys
            assert d["requestBody"]["required"] is False, o.op_id


def test_each_call_is_an_operation_and_each_handler_an_endpoint() -> None:
    methods = {n for n, _ in inspect.getmembers(Operations, callable) if not n.startswith("_")}
    for o in OPS:
        assert not o.call or o.call in methods, o.op_id
        assert callable(getattr(APIHandler, o.handler, None)), o.handler
        if o.call:
            params = list(inspect.signature(getattr(Operations, o.call)).parameters)[1:]
            names = [a.name for a in o.args if a.kind != "edge_route"]
            assert names == params[:len(names)], o.op_id


def test_every_cli_call_is_in_the_table() -> None:
    called = set()
    for path in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "call" and node.args and \
                    isinstance(node.args[0], ast.Constant) and path.stem.startswith("cli"):
                called.add(node.args[0].value)
    assert called and called <= set(BY_CLI)
    assert {"stop", "start", "restart"} <= set(BY_CLI)    # called by a variable name


def test_bind_refuses_an_argument_the_operation_does_not_take() -> None:
    start = BY_CLI["start"]
    assert bind(start, ("web", None, None)) == {"name": "web", "component": None}
    with pytest.raises(TypeError, match="start takes 2 arguments"):
        bind(start, ("web", None, 5.0))


CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("deploy", ({"name": "web", "components": [{"name": "main", "image": "img:v1"}]},)),
    ("ps", ()), ("status", ("web",)), ("history", ("web",)), ("progress", ("web",)),
    ("events", ("web", 5)), ("stop", ("web", "main", 1.0)), ("start", ("web", None)),
    ("restart", ("web", None, None)), ("rollback", ("web", None)), ("edge_list", ()),
    ("undeploy", ("web",)), ("nodes", ()), ("drain", ("n1",)),
    ("plan", ({"name": "web", "components": [{"name": "main", "image": "img:v2"}]}, True)),
    ("validate", ({"name": "web", "components": [{"name": "main", "image": "img:v2",
                                                  "volumes": ["/etc:/etc"]}]},)),
    ("validate", ({"name": "web", "components": [{"name": "main", "image": "img:v2"}]},)),
]


def _shape(value: Any) -> Any:
    """What must agree: keys and types, not times, ids or uptimes."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()
                if k not in ("time", "id", "uptime_s", "since", "started_at")}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__ if isinstance(value, float) else value


def _run(backend: Any, name: str, args: tuple[Any, ...]) -> Any:
    try:
        return _shape(backend.call(name, *args))
    except MCPError as exc:
        return ("error", exc.status, exc.code)


def test_local_and_remote_answer_alike(tmp_path: Path) -> None:
    """The same calls through the API and in-process, on two agents of their own."""
    answers: dict[str, list[Any]] = {}
    for side in ("remote", "local"):
        with fake_live(tmp_path / side, FakeWorld()) as live:
            b: Any = (RemoteBackend(live.url, live.token("master"))
                      if side == "remote" else LocalBackend(live.agent))
            answers[side] = [_run(b, name, args) for name, args in CALLS]
    for (name, _args), remote, local in zip(CALLS, answers["remote"], answers["local"],
                                            strict=True):
        assert remote == local, name
    # and they are answers, not a run of one error
    assert answers["remote"][0]["service"] == "web"
    assert answers["remote"][11] == {"service": "web", "undeployed": True}
    assert answers["remote"][12][:2] == ("error", 404)
    assert answers["remote"][-2] == ("error", 400, "invalid")   # /etc: outside the roots
    assert answers["remote"][-1]["valid"] is True


def test_an_entry_needs_no_other_code_to_be_routed() -> None:
    """A route is resolved from its entry alone (what 'one entry and one method' needs
    of the routing)."""
    from mcp_node.httpapi import Route

    op = Op("Thing", "GET", "/v1/things/{name}", "reader", "status")
    r = Route(op.verb, op.path, op.role, op.handler, (), op)
    assert r.match(["v1", "things", "x"]) == {"name": "x"} and r.op is op
