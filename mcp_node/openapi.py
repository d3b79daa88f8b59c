"""The OpenAPI 3 document of the agent's HTTP API (design §6): its paths, parameters
and responses here, the component schemas in ``openapi_schemas``.

Written out by hand rather than derived from the server's router, so a test
comparing the two catches an endpoint added to one and not the other. Each
operation carries ``x-mcp-role``, the least role it needs.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from . import __version__, grammar
from .logtime import SINCE_PATTERN
from .openapi_schemas import HOSTNAME_PATTERN, NAME_PATTERN, schemas

# httpapi.parse_count with the default server.max_tail (10000); empty means all lines.
TAIL_PATTERN = "^(?:|(?=[0-9]{1,19}$)0*(?:[0-9]{1,4}|10000))$"
BOOL_PATTERN = "^(?:|[01]|[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[Yy][Ee][Ss]|[Nn][Oo])$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR_RESPONSES: dict[str, str] = {
    "400": "Invalid request: bad JSON or duplicate keys, wrong types, bad names, unknown keys "
           "or query parameters, a malformed request line or header",
    "401": "Missing or invalid bearer token",
    "403": "The token's role is too low for this operation",
    "404": "No such service, component or route",
    "405": "Another method than this path allows (the Allow header lists them)",
    "408": "Request head or body not complete in time (server.header_timeout_s, "
           "server.body_timeout_s)",
    "409": "Conflict: the node lacks resources, a workload name clashes, a container "
           "of the same name is not ours, or the service is busy",
    "411": "A chunked request body (send Content-Length)",
    "413": "Request body larger than server.max_body (on any route, bodiless ones too)",
    "414": "Request line too long",
    "431": "Request headers too large or too many",
    "500": "Internal error (details only in the agent's log)",
    "502": "A runtime, image pull, proxy or certificate issuer failed",
    "503": "Too many connections, the registry's storage failed, or the runtime this "
           "operation needs is not available on this node",
    "505": "HTTP version other than 1.0 or 1.1",
}
# What the protocol layer can answer on any route, before the route's own handler runs.
PROTOCOL = ("400", "405", "408", "411", "413", "414", "431", "500", "503", "505")

NAME_PARAM = {
    "name": "name", "in": "path", "required": True, "description": "Service name",
    "schema": {"type": "string", "pattern": NAME_PATTERN},
}
NODE_PARAM = {
    "name": "node", "in": "path", "required": True, "description": "Fleet node name",
    "schema": {"type": "string", "pattern": NAME_PATTERN},
}
SECRET_PARAM = {
    "name": "name", "in": "path", "required": True, "description": "Secret name",
    "schema": {"type": "string", "pattern": grammar.SECRET_NAME_PATTERN},
}
HOSTNAME_PARAM = {
    "name": "hostname", "in": "path", "required": True, "description": "Public DNS name",
    "schema": {"type": "string", "pattern": HOSTNAME_PATTERN, "maxLength": 254},
}
LOG_PARAMS = [
    {"name": "component", "in": "query", "required": False,
     "description": "Only this component (empty or absent: all)",
     "schema": {"type": "string", "pattern": f"^$|{NAME_PATTERN}"}},
    {"name": "tail", "in": "query", "required": False,
     "description": "Only the last N lines of each component (ASCII digits, at most "
                    "server.max_tail, default 10000; empty: all)",
     "schema": {"type": "string", "pattern": TAIL_PATTERN}},
    {"name": "follow", "in": "query", "required": False,
     "description": "Keep streaming new output (chunked transfer encoding); "
                    "true/false/yes/no/1/0, any case",
     "schema": {"type": "string", "pattern": BOOL_PATTERN}},
    {"name": "since", "in": "query", "required": False,
     "description": "Only lines from this time on: a duration back from now (10m, 1h30m, "
                    "45s, 2d) or an RFC 3339 time (2026-01-02T15:04:05Z); empty: all",
     "schema": {"type": "string", "maxLength": 64, "pattern": SINCE_PATTERN}},
    {"name": "timestamps", "in": "query", "required": False,
     "description": "Start each line with its time (UTC, RFC 3339 with nanoseconds); "
                    "true/false/yes/no/1/0, any case",
     "schema": {"type": "string", "pattern": BOOL_PATTERN}},
]
EVENT_PARAMS = [
    {"name": "service", "in": "query", "required": False,
     "description": "Only this service (empty or absent: all)",
     "schema": {"type": "string", "pattern": f"^$|{NAME_PATTERN}"}},
    {"name": "tail", "in": "query", "required": False,
     "description": "The last N events first (ASCII digits, at most 10000; default 100, "
                    "10 when following)",
     "schema": {"type": "string", "pattern": TAIL_PATTERN}},
    LOG_PARAMS[2],
    {"name": "after", "in": "query", "required": False,
     "description": "With follow: instead of the tail, every event after this event id "
                    "first (resuming a follow that broke off; ASCII digits)",
     "schema": {"type": "string", "pattern": "^[0-9]{0,19}$"}},
]
PULL_PARAM = {
    "name": "pull", "in": "query", "required": False,
    "description": "Pull every component's image, as pull = \"always\" would "
                   "(true/false/yes/no/1/0, any case; empty: false)",
    "schema": {"type": "string", "pattern": BOOL_PATTERN}}
ALLOW_HEADER = {"Allow": {"description": "The methods this path allows",
                          "schema": {"type": "string"}}}
AUTH_HEADER = {"WWW-Authenticate": {"description": "Bearer challenge",
                                    "schema": {"type": "string"}}}


def _op(op_id: str, summary: str, role: str | None, ok: dict[str, Any], *,
        params: list[dict[str, Any]] | None = None, body: str | None = None,
        errors: tuple[str, ...] = (), optional_body: bool = False) -> dict[str, Any]:
    """One operation; its error statuses are the protocol's, the role's and ``errors``."""
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "x-mcp-role": role}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": not optional_body, "content": {"application/json": {
            "schema": _ref(body)}}}
    op["responses"] = {"200": ok}
    codes = set(PROTOCOL) | set(errors)
    if role is not None:
        codes.add("401")
        if role != "reader":  # every token is at least a reader
            codes.add("403")
    for code in sorted(codes):
        resp = _json(_ref("Error"), ERROR_RESPONSES[code])
        if code == "405":
            resp["headers"] = ALLOW_HEADER
        elif code == "401":
            resp["headers"] = AUTH_HEADER
        op["responses"][code] = resp
    op["security"] = [] if role is None else [{"bearer": []}]
    return op


# Routes that act on one service: it may be missing (404), busy or clash (409), its
# runtime may fail (502).
_SERVICE_ERRORS = ("404", "409", "502")

# OpenAPI links: what a client (and schemathesis' stateful phase) can do next with what
# an answer names. A deployed service's reads, lifecycle and removal take the name its
# status carries; a route set up is removed by its hostname. Not linked: progress,
# events and history, which answer for a name rather than for the live service (idle,
# and events and versions that outlive an undeploy, for a later rollback), and rollback,
# whose version the answer does not carry. Stop, start and restart name the first
# component the answer lists.
_SERVICE_NEXT = (("ServiceStatus", "its status"),
                 ("Logs", "its logs"), ("Stop", "stop its first component"),
                 ("Start", "start its first component"),
                 ("Restart", "restart its first component"), ("Undeploy", "remove it"))
_FIRST_COMPONENT = {"component": "$response.body#/components/0/component"}
SERVICE_LINKS: dict[str, Any] = {
    op: {"operationId": op, "description": f"The service deployed: {what}",
         "parameters": {"path.name": "$response.body#/service"},
         **({"requestBody": _FIRST_COMPONENT} if op in ("Stop", "Start", "Restart") else {})}
    for op, what in _SERVICE_NEXT}
EDGE_ROUTE_LINKS: dict[str, Any] = {
    "RemoveEdgeRoute": {"operationId": "RemoveEdgeRoute", "description": "Remove the route",
                        "parameters": {"path.hostname": "$response.body#/hostname"}},
}


def _paths() -> dict[str, dict[str, Any]]:
    status = _json(_ref("ServiceStatus"), "The service's status after the operation")
    return {
        "/v1/health": {"get": _op(
            "HealthCheck", "Node health, served from the monitor's cached view", "reader",
            _json(_ref("Health"), "Health of the node"))},
        "/v1/openapi.json": {"get": _op(
            "OpenAPI", "This document", None,
            _json({"type": "object"}, "OpenAPI 3 document"))},
        "/v1/services": {
            "get": _op("ListComponents", "Every component of every service (ps)", "reader",
                       _json({"type": "array", "items": _ref("PsRow")}, "Components")),
            "post": _op("Deploy", "Deploy or redeploy a service definition", "operator",
                        {**status, "links": SERVICE_LINKS}, body="ServiceDefinition",
                        params=[PULL_PARAM], errors=("404", "409", "502")),
        },
        "/v1/plan": {"post": _op(
            "Plan", "What deploying a definition would change, its images resolved as a "
            "deploy would (a moved tag is an image_digest change); nothing is changed",
            "operator", _json(_ref("Plan"), "The changes"), body="ServiceDefinition",
            params=[PULL_PARAM], errors=("404", "409", "502"))},
        "/v1/validate": {"post": _op(
            "Validate", "The rules a deploy of the definition would check on this node "
            "before changing anything (volume roots, host paths, secrets, routes): a 400 or "
            "409 naming the field; capacity and runtime availability, which may change "
            "before the deploy, are warnings. Nothing is changed, pulled or resolved",
            "operator", _json(_ref("Validation"), "The definition passed"),
            body="ServiceDefinition", errors=("409",))},
        "/v1/services/{name}": {
            "get": _op("ServiceStatus", "Status of one service, with drift and events",
                       "reader", status, params=[NAME_PARAM], errors=("404",)),
            "delete": _op("Undeploy", "Remove the service's workloads and registry rows",
                          "operator", _json(_ref("Undeployed"), "Undeployed"), params=[NAME_PARAM],
                          errors=_SERVICE_ERRORS),
        },
        "/v1/services/{name}/stop": {"post": _op(
            "Stop", "Stop every component, or the one named", "operator", status,
            params=[NAME_PARAM], errors=_SERVICE_ERRORS, body="StopRequest",
            optional_body=True)},
        "/v1/services/{name}/start": {"post": _op(
            "Start", "Start every component, or the one named", "operator", status,
            params=[NAME_PARAM], errors=_SERVICE_ERRORS, body="StartRequest",
            optional_body=True)},
        "/v1/services/{name}/restart": {"post": _op(
            "Restart", "Restart every component, or the one named", "operator", status,
            params=[NAME_PARAM], errors=_SERVICE_ERRORS, body="StopRequest",
            optional_body=True)},
        "/v1/services/{name}/history": {"get": _op(
            "History", "Each deployed version of the service, oldest first", "reader",
            _json({"type": "array", "items": _ref("Deployment")}, "Versions"),
            params=[NAME_PARAM], errors=("404",))},
        "/v1/services/{name}/progress": {"get": _op(
            "Progress", "What an operation in flight on the service (deploy, stop, start, "
            "restart, undeploy) is doing to each component; idle: operation null",
            "reader", _json(_ref("Progress"), "Progress"), params=[NAME_PARAM])},
        "/v1/services/{name}/rollback": {"post": _op(
            "Rollback", "Deploy an earlier version again (default: the one before the current)",
            "operator", status, params=[NAME_PARAM], errors=_SERVICE_ERRORS,
            body="RollbackRequest", optional_body=True)},
        "/v1/events": {"get": _op(
            "Events", "State changes of every service (or one); NDJSON while following",
            "reader",
            {"description": "A JSON list of events; with follow, one event per line as they "
                            "happen (chunked)",
             "content": {"application/json": {"schema": {
                 "type": "array", "items": _ref("Event")}},
                 "application/x-ndjson": {"schema": {"type": "string"}}}},
            params=EVENT_PARAMS, errors=("404",))},
        "/v1/livez": {"get": _op(
            "Livez", "Whether the agent process answers; nothing else, no token", None,
            _json({"type": "object", "required": ["status"],
                   "properties": {"status": {"const": "up"}}}, "Up"))},
        "/metrics": {"get": _op(
            "Metrics", "Prometheus text format: components by state, restarts, deploy "
                       "durations, API requests and latency, edge certificate expiry", "reader",
            {"description": "Prometheus exposition format 0.0.4",
             "content": {"text/plain": {"schema": {"type": "string"}}}})},
        "/v1/services/{name}/logs": {"get": _op(
            "Logs", "Log output of one component, or (none named, several there) of every "
                    "component interleaved by time, each line led by its component's name "
                    "padded to the longest and ' | '", "reader",
            {"description": "Log text, chunked: at most tail lines (of each component) and "
                            "server.max_log_bytes bytes (shared by the components), the "
                            "newest; when the byte cap cut earlier output, a first line says "
                            "so; notes of the agent start with '[mcp: '",
             "content": {"text/plain": {"schema": {"type": "string"}}}},
            params=[NAME_PARAM, *LOG_PARAMS], errors=_SERVICE_ERRORS)},
        "/v1/edge-routes": {
            "get": _op("ListEdgeRoutes", "Edge routes on this node", "reader",
                       _json({"type": "array", "items": _ref("EdgeRoute")}, "Edge routes"),
                       errors=("502",)),
            "post": _op("SetupEdgeRoute", "Create or update a public TLS route to a backend",
                        "master", {**_json(_ref("EdgeRoute"), "The route"),
                                   "links": EDGE_ROUTE_LINKS},
                        body="EdgeRouteSetup", errors=("409", "502")),
        },
        "/v1/edge-routes/{hostname}": {"delete": _op(
            "RemoveEdgeRoute", "Remove an edge route", "master",
            _json(_ref("RouteRemoved"), "Removed"), params=[HOSTNAME_PARAM],
            errors=("404", "409", "502"))},
        # Secrets (issue 20): a value goes in and is never answered.
        "/v1/secrets": {"get": _op(
            "ListSecrets", "The node's secrets: names, versions, times and the deployed "
            "services using each; never a value", "reader",
            _json({"type": "array", "items": _ref("SecretInfo")}, "Secrets"))},
        "/v1/secrets/{name}": {
            "put": _op("SetSecret", "Store a new version of the secret (what runs keeps its "
                       "version until deployed again)", "operator",
                       _json(_ref("SecretInfo"), "The secret, without its value"),
                       params=[SECRET_PARAM], body="SecretValue"),
            "delete": _op("RemoveSecret", "Remove the secret and its versions; 409 naming the "
                          "deployed services that use it", "operator",
                          _json(_ref("SecretRemoved"), "Removed"), params=[SECRET_PARAM],
                          errors=("404", "409")),
        },
        # Fleet mode (issue 12): 404 on an agent without [cluster]; 503 fleet_unavailable
        # while etcd has no quorum. Service writes need the master role in fleet mode.
        "/v1/nodes": {"get": _op(
            "ListNodes", "Every node of the fleet, from etcd", "reader",
            _json({"type": "array", "items": _ref("FleetNode")}, "Nodes"), errors=("404",))},
        "/v1/nodes/{node}/drain": {"post": _op(
            "DrainNode", "Cordon a node and move its unpinned services away", "master",
            _json(_ref("Drained"), "What moved and what stayed"), params=[NODE_PARAM],
            errors=("404",))},
        "/v1/nodes/{node}/uncordon": {"post": _op(
            "UncordonNode", "Let placements use a drained node again", "master",
            _json(_ref("Drained"), "The node's cordon state"), params=[NODE_PARAM],
            errors=("404",))},
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mcp-agent",
            "version": __version__,
            "description": "Node agent of mcp_node: services as podman containers or "
                           "QEMU VMs, and TLS edge routes. Errors are "
                           '{"error": {"code": ..., "message": ...}}.',
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@cache
def document_bytes() -> bytes:
    """Serialised once: the document is static for a given code version."""
    return json.dumps(document(), indent=1, sort_keys=True).encode()
