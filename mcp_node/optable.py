"""Every route of the API, declared once: its HTTP method and path, its least role, the
``operations.Operations`` method it calls, how each argument travels on the wire and
how the answer is shaped. The HTTP routes (``httpapi.resolve``), the agent's generic
endpoint (``endpoints``) and the CLI's remote and local backends (``clictx``) are built
from this table; ``tests/test_optable.py`` checks the OpenAPI document against it.

A leaf: plain data, no import of the server, the agent or the CLI, so ``mcp`` reads
it at no cost. Adding an operation is one entry here and one method of
``Operations``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arg:
    """One argument of a call: its ``Operations`` parameter name, where it travels
    (``path`` segment, ``query`` key, ``body`` key of a JSON object, or ``json``: the
    whole body) and how it is checked (``kind``, see ``endpoints.decode``)."""

    name: str
    where: str
    kind: str


@dataclass(frozen=True)
class Op:
    op_id: str                    # OpenAPI operationId
    verb: str                     # HTTP method
    path: str                     # path template; {x} segments are path arguments
    role: str | None              # least role (None: no token)
    call: str = ""                # the Operations method ("": the server answers itself)
    args: tuple[Arg, ...] = ()    # the call's arguments, in the order of its parameters
    query: tuple[str, ...] = ()   # query keys the route accepts (beyond its arguments)
    answer: str = ""              # how the result becomes the answer (see ``answer``)
    handler: str = "h_call"       # the endpoint; h_call decodes ``args`` and calls
    cli: str = ""                 # the name mcp's backends call it by ("": ``call``)
    redact: bool = False          # env values hidden from a reader token (``redact``)
    side: bool = False            # asked while another call runs: mcp uses a second connection

    @property
    def cli_name(self) -> str:
        return self.cli or self.call


NAME = Arg("name", "path", "name")
COMPONENT = Arg("component", "body", "name")
TIMEOUT = Arg("timeout", "body", "seconds")
PULL = Arg("pull", "query", "flag")   # pull every image, as pull = "always" would
SECRET = Arg("name", "path", "secret_name")

OPS: tuple[Op, ...] = (
    Op("HealthCheck", "GET", "/v1/health", "reader", "health", handler="h_health"),
    Op("OpenAPI", "GET", "/v1/openapi.json", None, handler="h_openapi"),
    Op("ListComponents", "GET", "/v1/services", "reader", "ps"),
    Op("Deploy", "POST", "/v1/services", "operator", "deploy",
       (Arg("defn", "json", "definition"), PULL)),
    Op("Plan", "POST", "/v1/plan", "operator", "plan", (Arg("defn", "json", "definition"), PULL),
       redact=True),
    Op("Validate", "POST", "/v1/validate", "operator", "validate",
       (Arg("defn", "json", "definition"),)),
    Op("ServiceStatus", "GET", "/v1/services/{name}", "reader", "status", (NAME,),
       redact=True),
    Op("Undeploy", "DELETE", "/v1/services/{name}", "operator", "undeploy", (NAME,),
       answer="undeployed"),
    Op("Stop", "POST", "/v1/services/{name}/stop", "operator", "stop",
       (NAME, COMPONENT, TIMEOUT)),
    Op("Start", "POST", "/v1/services/{name}/start", "operator", "start", (NAME, COMPONENT)),
    Op("Restart", "POST", "/v1/services/{name}/restart", "operator", "restart",
       (NAME, COMPONENT, TIMEOUT)),
    Op("Logs", "GET", "/v1/services/{name}/logs", "reader", "logs",
       query=("component", "tail", "follow", "since", "timestamps"), handler="h_logs"),
    Op("History", "GET", "/v1/services/{name}/history", "reader", "history", (NAME,),
       redact=True),
    Op("Rollback", "POST", "/v1/services/{name}/rollback", "operator", "rollback",
       (NAME, Arg("version", "body", "version"))),
    Op("Progress", "GET", "/v1/services/{name}/progress", "reader", "progress_of", (NAME,),
       cli="progress", side=True),
    Op("Events", "GET", "/v1/events", "reader", "events",
       (Arg("service", "query", "name"), Arg("tail", "query", "events")),
       query=("follow", "after"), handler="h_events"),
    Op("Livez", "GET", "/v1/livez", None, handler="h_livez"),
    Op("Metrics", "GET", "/metrics", "reader", handler="h_metrics"),
    Op("ListEdgeRoutes", "GET", "/v1/edge-routes", "reader", "edge_list"),
    Op("SetupEdgeRoute", "POST", "/v1/edge-routes", "master", "edge_setup",
       (Arg("route", "json", "edge_route"),)),
    Op("RemoveEdgeRoute", "DELETE", "/v1/edge-routes/{hostname}", "master", "edge_remove",
       (Arg("hostname", "path", "hostname"),), answer="removed"),
    Op("ListNodes", "GET", "/v1/nodes", "reader", "nodes"),
    Op("ListSecrets", "GET", "/v1/secrets", "reader", "secret_list"),
    Op("SetSecret", "PUT", "/v1/secrets/{name}", "operator", "secret_set",
       (SECRET, Arg("value", "json", "secret_value"))),
    Op("RemoveSecret", "DELETE", "/v1/secrets/{name}", "operator", "secret_remove", (SECRET,),
       answer="secret_removed"),
    Op("DrainNode", "POST", "/v1/nodes/{node}/drain", "master", "drain",
       (Arg("node", "path", "name"),)),
    Op("UncordonNode", "POST", "/v1/nodes/{node}/uncordon", "master", "uncordon",
       (Arg("node", "path", "name"),)),
)

BY_CLI: dict[str, Op] = {op.cli_name: op for op in OPS if op.call}


def answer(op: Op, kwargs: dict[str, Any], result: Any) -> Any:
    """What the API (and ``mcp --local``) answers for ``result``: calls that return
    nothing say what they did."""
    if op.answer == "undeployed":
        return {"service": kwargs["name"], "undeployed": True}
    if op.answer == "removed":
        return {"hostname": kwargs["hostname"], "removed": True}
    if op.answer == "secret_removed":
        return {"name": kwargs["name"], "removed": True}
    return result


def bind(op: Op, args: tuple[Any, ...]) -> dict[str, Any]:
    """A CLI call's positional arguments by name; trailing ones the operation does not
    take must be None (``start`` is called like ``stop``, without a timeout)."""
    extra = args[len(op.args):]
    if any(a is not None for a in extra):
        raise TypeError(f"{op.cli_name} takes {len(op.args)} arguments, got {len(args)}")
    return {a.name: v for a, v in zip(op.args, args, strict=False)}
