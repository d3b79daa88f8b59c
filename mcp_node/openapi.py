"""The OpenAPI 3 document of the agent's HTTP API (design §6).

Written out by hand rather than derived from the server's router, so a test
comparing the two catches an endpoint added to one and not the other. Each
operation carries ``x-mcp-role``, the least role it needs.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from . import __version__
from .runtime import DEFAULT_RUNTIME, RUNTIME_NAMES

NAME_PATTERN = "^[a-z0-9][a-z0-9-]{0,62}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR_RESPONSES: dict[str, str] = {
    "400": "Invalid request (bad JSON, wrong types, bad names, unknown keys)",
    "401": "Missing or invalid bearer token",
    "403": "The token's role is too low for this operation",
    "404": "No such service, component or route",
    "409": "Conflict (e.g. not enough resources on the node)",
    "413": "Request body larger than server.max_body",
    "500": "Internal error (details only in the agent's log)",
    "502": "A runtime, image pull, proxy or certificate issuer failed",
    "503": "The runtime this operation needs is not available on this node",
}

NAME_PARAM = {
    "name": "name", "in": "path", "required": True, "description": "Service name",
    "schema": {"type": "string", "pattern": NAME_PATTERN},
}
HOSTNAME_PARAM = {
    "name": "hostname", "in": "path", "required": True, "description": "Public DNS name",
    "schema": {"type": "string", "maxLength": 253},
}
LOG_PARAMS = [
    {"name": "component", "in": "query", "required": False,
     "description": "Only this component (default: all)",
     "schema": {"type": "string", "pattern": NAME_PATTERN}},
    {"name": "tail", "in": "query", "required": False,
     "description": "Only the last N lines of each component",
     "schema": {"type": "integer", "minimum": 0}},
    {"name": "follow", "in": "query", "required": False,
     "description": "Keep streaming new output (chunked transfer encoding)",
     "schema": {"type": "boolean", "default": False}},
]


def _op(op_id: str, summary: str, role: str | None, ok: dict[str, Any], *,
        params: list[dict[str, Any]] | None = None, body: str | None = None,
        errors: tuple[str, ...] = ("400", "401", "403", "500")) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "x-mcp-role": role}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": _ref(body)}}}
    op["responses"] = {"200": ok}
    for code in errors:
        op["responses"][code] = _json(_ref("Error"), ERROR_RESPONSES[code])
    op["security"] = [] if role is None else [{"bearer": []}]
    return op


_SERVICE_ERRORS = ("400", "401", "403", "404", "500", "502", "503")


def _paths() -> dict[str, dict[str, Any]]:
    status = _json(_ref("ServiceStatus"), "The service's status after the operation")
    return {
        "/v1/health": {"get": _op(
            "HealthCheck", "Node health, served from the monitor's cached view", "reader",
            _json(_ref("Health"), "Health of the node"), errors=("401", "500"))},
        "/v1/openapi.json": {"get": _op(
            "OpenAPI", "This document", None,
            _json({"type": "object"}, "OpenAPI 3 document"), errors=("500",))},
        "/v1/services": {
            "get": _op("ListComponents", "Every component of every service (ps)", "reader",
                       _json({"type": "array", "items": _ref("PsRow")}, "Components"),
                       errors=("401", "500")),
            "post": _op("Deploy", "Deploy or redeploy a service definition", "operator",
                        status, body="ServiceDefinition",
                        errors=("400", "401", "403", "409", "413", "500", "502", "503")),
        },
        "/v1/services/{name}": {
            "get": _op("ServiceStatus", "Status of one service, with drift and events",
                       "reader", status, params=[NAME_PARAM],
                       errors=("400", "401", "404", "500")),
            "delete": _op("Undeploy", "Remove the service's workloads and registry rows",
                          "operator", _json(_ref("Undeployed"), "Undeployed"), params=[NAME_PARAM],
                          errors=_SERVICE_ERRORS),
        },
        "/v1/services/{name}/stop": {"post": _op(
            "Stop", "Stop every component", "operator", status, params=[NAME_PARAM],
            errors=_SERVICE_ERRORS)},
        "/v1/services/{name}/start": {"post": _op(
            "Start", "Start every component", "operator", status, params=[NAME_PARAM],
            errors=_SERVICE_ERRORS)},
        "/v1/services/{name}/restart": {"post": _op(
            "Restart", "Restart every component", "operator", status, params=[NAME_PARAM],
            errors=_SERVICE_ERRORS)},
        "/v1/services/{name}/logs": {"get": _op(
            "Logs", "Log output of the service's components", "reader",
            {"description": "Log text; chunked when following",
             "content": {"text/plain": {"schema": {"type": "string"}}}},
            params=[NAME_PARAM, *LOG_PARAMS], errors=_SERVICE_ERRORS)},
        "/v1/edge-routes": {
            "get": _op("ListEdgeRoutes", "Edge routes on this node", "reader",
                       _json({"type": "array", "items": _ref("EdgeRoute")}, "Edge routes"),
                       errors=("401", "500", "502")),
            "post": _op("SetupEdgeRoute", "Create or update a public TLS route to a backend",
                        "master", _json(_ref("EdgeRoute"), "The route"),
                        body="EdgeRouteSetup",
                        errors=("400", "401", "403", "413", "500", "502")),
        },
        "/v1/edge-routes/{hostname}": {"delete": _op(
            "RemoveEdgeRoute", "Remove an edge route", "master",
            _json(_ref("RouteRemoved"), "Removed"), params=[HOSTNAME_PARAM],
            errors=("400", "401", "403", "404", "500", "502"))},
    }


_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR, "maxItems": 256}


def _schemas() -> dict[str, Any]:
    route_def = {
        "type": "object", "additionalProperties": False, "required": ["port"],
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,31}$",
                     "description": "-> $PORT_<NAME>; a single unnamed route -> $PORT"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "mode": {"type": "string", "enum": ["l4", "l7"], "default": "l7"},
            "hostname": {"type": "string", "maxLength": 253},
        },
    }
    component_def = {
        "type": "object", "additionalProperties": False, "required": ["name", "image"],
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "image": {"type": "string", "minLength": 1},
            "cmd": _STRS, "env": _STRS, "volumes": _STRS,
            "restart": {"type": "string",
                        "enum": ["", "no", "always", "on-failure", "unless-stopped"]},
            "runtime": {"type": "string", "enum": list(RUNTIME_NAMES)},
            "memory_mb": {"type": "integer", "minimum": 0,
                          "description": "required > 0 for a VM component"},
            "vcpus": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
            "binary": {"type": "string"},
            "image_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
            "routes": {"type": "array", "items": route_def},
            "check": {"type": "string",
                      "pattern": "^(|tcp|none|http:/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,255})$"},
        },
    }
    route_out = {
        "type": "object",
        "properties": {"name": _STR, "port": {"type": "integer"}, "mode": _STR,
                       "hostname": _STR, "host_port": {"type": "integer"}},
    }
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": _STR, "message": _STR},
            }},
        },
        "ServiceDefinition": {
            "type": "object", "additionalProperties": False, "required": ["name", "components"],
            "properties": {
                "name": {"type": "string", "pattern": NAME_PATTERN},
                "active": {"type": "boolean", "default": True},
                "runtime": {"type": "string", "enum": list(RUNTIME_NAMES),
                            "default": DEFAULT_RUNTIME},
                "components": {"type": "array", "minItems": 1, "maxItems": 64,
                               "items": component_def},
            },
        },
        "PsRow": {
            "type": "object",
            "properties": {
                "service": _STR, "component": _STR, "node": _STR, "runtime": _STR,
                "state": _STR, "desired_state": _STR, "version": _STR,
                "uptime_s": {"type": ["number", "null"]},
                "routes": {"type": "array", "items": route_out},
            },
        },
        "ServiceStatus": {
            "type": "object", "additionalProperties": True,
            "properties": {
                "service": _STR,
                "components": {"type": "array", "items": {
                    "type": "object", "additionalProperties": True,
                    "properties": {"component": _STR, "state": _STR, "desired_state": _STR,
                                   "drift": {"type": "boolean"},
                                   "events": {"type": "array", "items": {"type": "object"}}},
                }},
            },
        },
        "Health": {
            "type": "object", "additionalProperties": True, "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["healthy", "degraded"]},
                "containers": {"type": "integer"},
                "reasons": {"type": "array", "items": _STR},
                "runtimes": {"type": "object"},
            },
        },
        "EdgeRouteSetup": {
            "type": "object", "additionalProperties": False,
            "required": ["hostname", "backend_hostname", "backend_port"],
            "properties": {
                "hostname": {"type": "string", "maxLength": 253},
                "backend_hostname": {"type": "string", "maxLength": 253},
                "backend_port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "backend_tls": {"type": "boolean", "default": True},
            },
        },
        "EdgeRoute": {
            "type": "object", "additionalProperties": True,
            "properties": {
                "hostname": _STR, "backend_hostname": _STR,
                "backend_port": {"type": "integer"}, "backend_address": _STR,
                "cert_serial": _STR, "cert_expires": {"type": "string", "format": "date-time"},
                "created_at": _STR, "updated_at": _STR,
            },
        },
        "Undeployed": {
            "type": "object", "required": ["service", "undeployed"],
            "properties": {"service": _STR, "undeployed": {"type": "boolean", "const": True}},
        },
        "RouteRemoved": {
            "type": "object", "required": ["hostname", "removed"],
            "properties": {"hostname": _STR, "removed": {"type": "boolean", "const": True}},
        },
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
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@cache
def document_bytes() -> bytes:
    """Serialised once: the document is static for a given code version."""
    return json.dumps(document(), indent=1, sort_keys=True).encode()
