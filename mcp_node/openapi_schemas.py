"""The component schemas of the OpenAPI document (``openapi``): what a service
definition, an edge route and the answers may hold, and the patterns they share with
the parameters. Each runtime's demands come from its own Traits, never its name."""

from __future__ import annotations

from typing import Any

from . import grammar, servicedef
from .runtimenames import DEFAULT_RUNTIME, RUNTIME_NAMES, TRAITS

NAME_PATTERN = "^[a-z0-9][a-z0-9-]{0,62}$"
ROUTE_NAME_PATTERN = "^[a-z0-9][a-z0-9_-]{0,31}$"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# servicedef.check_hostname: ASCII labels, at most 253 characters, one optional trailing dot.
HOSTNAME_PATTERN = f"^(?=.{{1,253}}\\.?$){_LABEL}(?:\\.{_LABEL})*\\.?$"
_NO_DOTDOT = "(?!.*(?:^|/)\\.\\.(?:/|$))"
BINARY_PATTERN = f"^$|^{_NO_DOTDOT}/[^\\u0000]*$"
# grammar.parse_volume: no '..' segment in either path, no control character, a guest
# path that is not / (nor only slashes) and not at or under /proc, /sys or /dev, at most
# one option of each family (ro/rw, z/Z). Rules across items (no path twice), on other
# spellings (/./proc) and on the node (the host path existing under the volume roots)
# are the server's alone: a 400 naming components[i].volumes[j].
_RESERVED_GUEST = "|".join(r.lstrip("/") for r in grammar.RESERVED_GUEST)
_ONE_OF_EACH = "".join(f"(?![^:]*:[^:]*:(?:[^,]*,)*{a},(?:[^,]*,)*{b}(?:,|$))"
                       for family in grammar.VOLUME_OPTION_FAMILIES
                       for a in family for b in family)
VOLUME_PATTERN = ("^(?!(?:[^:]*/)?\\.\\.[/:])(?![^:]*:(?:[^:]*/)?\\.\\.(?:/|:|$))"
                  "(?![^\\u0000]*[\\u0001-\\u001f\\u007f])"
                  f"(?![^:]*:/*(?:(?:{_RESERVED_GUEST})(?:/|:|$)|:|$))"
                  + _ONE_OF_EACH + grammar.VOLUME_PATTERN[1:])


_STR = {"type": "string"}


def _text(max_len: int = grammar.MAX_STR, pattern: str = grammar.TEXT_PATTERN,
          **more: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_len, "pattern": pattern, **more}


def _strs(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item, "maxItems": servicedef.MAX_LIST}


# Strict base64, as the server decodes it (b64decode with validate: whole quanta only).
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def schemas() -> dict[str, Any]:
    route_def = {
        "type": "object", "additionalProperties": False, "required": ["port"],
        "properties": {
            "name": {"type": "string", "pattern": f"^$|{ROUTE_NAME_PATTERN}",
                     "description": "-> $PORT_<NAME>; only a single route may be unnamed "
                                    "(-> $PORT); names unique, also as $PORT_<NAME>"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "mode": {"type": "string", "enum": list(servicedef.ROUTE_MODES), "default": "l7"},
            "hostname": {"type": "string", "pattern": f"^$|{HOSTNAME_PATTERN}",
                         "maxLength": 254},
            "public_hostname": {"type": "string", "pattern": f"^$|{HOSTNAME_PATTERN}",
                                "maxLength": 254,
                                "description": "fleet mode: served by every edge node"},
        },
    }
    # What each runtime asks of its components, as it declares it (runtimenames.Traits).
    by_runtime = {name: t.openapi() for name, t in TRAITS.items() if t.openapi()}
    memory_note = "; ".join(f"required, at least {t.min_memory_mb}, for a {t.kind} component"
                            for t in TRAITS.values() if t.memory_required)
    component_def = {
        "type": "object", "additionalProperties": False, "required": ["name", "image"],
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "image": {"type": "string", "minLength": 1, "maxLength": grammar.MAX_IMAGE,
                      "pattern": grammar.IMAGE_PATTERN,
                      "description": "OCI reference: [domain[:port]/]path[:tag] or "
                                     "[domain[:port]/]path@sha256:<64 hex>; not 1-64 bare "
                                     "hex digits, which podman reads as an image ID"},
            "cmd": _strs(_text()),
            "env": _strs(_text(pattern=grammar.ENV_PATTERN, description=(
                "KEY=VALUE; keys unique; PORT and PORT_* are the agent's"))),
            "volumes": _strs(_text(pattern=VOLUME_PATTERN, description=(
                "/host:/guest[:ro|rw|z|Z,...], at most one of ro/rw and of z/Z; guest not "
                "/, /proc, /sys, /dev or below them; host and guest paths unique; the host "
                "path must exist and (symlinks resolved, at deploy and at every start) lie "
                "under [podman] volume_roots (default <state>/volumes and /srv)"))),
            "restart": {"type": "string", "enum": list(servicedef.RESTART_POLICIES)},
            "runtime": {"type": "string", "enum": list(RUNTIME_NAMES)},
            "memory_mb": {"type": "integer", "minimum": 0, "maximum": servicedef.MAX_MEMORY_MB,
                          "description": memory_note},
            "vcpus": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
            "binary": _text(pattern=BINARY_PATTERN),
            "image_sha256": {"type": "string", "pattern": "^$|^[0-9a-fA-F]{64}$"},
            "routes": {"type": "array", "items": route_def, "maxItems": servicedef.MAX_ROUTES,
                       "if": {"minItems": 2},
                       "then": {"items": {"required": ["name"],
                                          "properties": {"name": {"minLength": 1}}}}},
            "check": {"type": "string", "maxLength": grammar.MAX_STR,
                      "pattern": "^(?:|tcp|none|http:/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,255})$",
                      "description": "tcp and http:/path need a route to probe"},
            "check_interval_s": {"anyOf": [{"type": "number", "enum": [0]},
                                           {"type": "number", "minimum": 0.1,
                                            "maximum": 86400}],
                                 "default": 10,
                                 "description": "checked this often while it runs; 0: once "
                                                "per run"},
            "check_timeout_s": {"type": "number", "minimum": 0.1, "maximum": 60,
                                "default": 2},
            "check_failures": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3,
                               "description": "failures in a row before it is unhealthy"},
            "pull": {"type": "string", "enum": list(servicedef.PULL_POLICIES),
                     "default": "missing"},
            "image_digest": {"type": "string", "pattern": "^(?:|sha256:[0-9a-f]{64})$",
                             "description": "the image ID the agent resolved image to (status "
                                            "and history carry it); set, the deploy runs "
                                            "exactly that image, which must be on the node"},
            "secrets": {"type": "array", "maxItems": servicedef.MAX_LIST, "uniqueItems": True,
                        "items": {"type": "string", "pattern": grammar.SECRET_NAME_PATTERN},
                        "description": "secrets of the node given as /run/secrets/<name> "
                                       "(0400); env values secret:NAME name more"},
            "secret_versions": {
                "type": "object", "maxProperties": servicedef.MAX_LIST,
                "propertyNames": {"pattern": grammar.SECRET_NAME_PATTERN},
                "additionalProperties": {"type": "integer", "minimum": 1},
                "description": "the version of each secret it uses, recorded by the agent "
                               "(status and history carry it); set, a deploy gives exactly "
                               "that version while the node keeps it"},
        },
        "allOf": [
            *({"if": {"required": ["runtime"], "properties": {"runtime": {"const": name}}},
               "then": fragment} for name, fragment in by_runtime.items()),
            {"if": {"required": ["check"], "properties": {"check": {"pattern": "^(?:tcp|http:)"}}},
             "then": {"required": ["routes"], "properties": {"routes": {"minItems": 1}}}},
        ],
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
            "description": "Component names unique; a component without its own runtime "
                           "takes the service's",
            "properties": {
                "name": {"type": "string", "pattern": NAME_PATTERN},
                "active": {"type": "boolean", "default": True},
                "runtime": {"type": "string", "enum": list(RUNTIME_NAMES),
                            "default": DEFAULT_RUNTIME},
                "components": {"type": "array", "minItems": 1,
                               "maxItems": servicedef.MAX_COMPONENTS, "items": component_def},
                "node": {"type": "string", "pattern": "^$|^(?:pool:)?" + NAME_PATTERN[1:],
                         "description": "fleet mode: NAME (pinned), pool:NAME, or absent "
                                        "(any compute node); a single node refuses any name "
                                        "but its own"},
                "failover": {"type": "string", "enum": list(servicedef.FAILOVER_MODES),
                             "default": "",
                             "description": "fleet mode: absent, \"\" or \"fence\" (a lost "
                                            "node stops its copy before the lease expires, "
                                            "never two copies); \"overlap\": a stateless "
                                            "service may briefly run twice"},
                "update": {
                    "type": "object", "additionalProperties": False,
                    "description": "how a deploy replaces what runs",
                    "properties": {
                        "order": {"type": "string", "enum": list(servicedef.UPDATE_ORDERS),
                                  "description": "stop-first (the default): the old "
                                                 "workload stops before the new one "
                                                 "starts; start-first: a component whose "
                                                 "routes the node proxy serves gets its "
                                                 "new workload beside the old one, "
                                                 "switched once it passes its check"},
                        "min_healthy_s": {"type": "number", "minimum": 0, "maximum": 3600,
                                          "default": 5},
                        "healthy_deadline_s": {"type": "number", "minimum": 1,
                                               "maximum": 86400, "default": 60,
                                               "description": "counted as at least "
                                                              "min_healthy_s"},
                        "auto_revert": {"type": "boolean", "default": True},
                        "drain_s": {"type": "number", "minimum": 0, "maximum": 3600,
                                    "default": 5},
                    },
                },
                "network": {
                    "type": "object", "additionalProperties": False,
                    "description": "bridge mode: who may reach this service's components",
                    "properties": {
                        "allow_from": {
                            "type": "array", "maxItems": servicedef.MAX_LIST,
                            "uniqueItems": True,
                            "items": {"type": "string", "pattern": NAME_PATTERN},
                            "description": "services whose components may open connections "
                                           "to this service's (not the service itself); "
                                           "they resolve <component>.<service>.internal"},
                    },
                },
            },
            # A service's runtime is its components' default: each runtime's demands
            # hold for the components that name none.
            "allOf": [{"if": {"required": ["runtime"], "properties": {"runtime": {"const": name}}},
                       "then": {"properties": {"components": {"items": {
                           "if": {"not": {"required": ["runtime"]}}, "then": fragment}}}}}
                      for name, fragment in by_runtime.items()],
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
            "type": "object", "additionalProperties": True, "required": ["service"],
            "properties": {
                "service": _STR,
                "components": {"type": "array", "items": {
                    "type": "object", "additionalProperties": True,
                    "properties": {"component": _STR, "state": _STR, "desired_state": _STR,
                                   "drift": {"type": "boolean"},
                                   # which run this is (a follow tells a replace by it):
                                   # RFC 3339 start and short workload id, null when down
                                   "started_at": {"type": ["string", "null"]},
                                   "workload_id": {"type": ["string", "null"]},
                                   # the last check result; null before the first probe
                                   "check": {"type": ["object", "null"],
                                             "required": ["ok", "time", "detail"],
                                             "properties": {
                                                 "ok": {"type": "boolean"},
                                                 "time": _STR, "detail": _STR}},
                                   "events": {"type": "array", "items": {"type": "object"}}},
                }},
                # the latest rollout (issue 19); null before the first deploy that changed
                "rollout": {"type": ["object", "null"],
                            "required": ["version", "state", "reason"],
                            "properties": {
                                "version": {"type": "integer"},
                                "state": {"type": "string", "enum": [
                                    "in_progress", "succeeded", "failed", "reverted"]},
                                "reverting": {"type": "boolean"},
                                "reason": _STR,
                                "components": {"type": "array", "items": _STR},
                                "previous": {"type": ["integer", "null"]},
                                "generation": {"type": "integer", "description":
                                               "fleet mode: the generation that began it"}}},
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
            "description": "hostname must be under one of edge.allowed_domains and outside "
                           "edge.internal_zone; backend_hostname inside edge.internal_zone",
            "properties": {
                "hostname": {"type": "string", "pattern": HOSTNAME_PATTERN, "maxLength": 254},
                "backend_hostname": {"type": "string", "pattern": HOSTNAME_PATTERN,
                                     "maxLength": 254},
                "backend_port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "backend_tls": {"type": "boolean", "enum": [True], "default": True,
                                "description": "no cleartext to backends: false is refused"},
            },
        },
        "EdgeRoute": {
            "type": "object", "additionalProperties": True, "required": ["hostname"],
            "properties": {
                "hostname": _STR, "backend_hostname": _STR,
                "backend_port": {"type": "integer"}, "backend_address": _STR,
                "cert_serial": _STR, "cert_expires": {"type": "string", "format": "date-time"},
                "created_at": _STR, "updated_at": _STR,
            },
        },
        "StopRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {"component": {"type": "string", "pattern": NAME_PATTERN},
                           "timeout": {"type": "number", "minimum": 0, "maximum": 3600}},
        },
        "StartRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {"component": {"type": "string", "pattern": NAME_PATTERN}},
        },
        "RollbackRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {"version": {"type": "integer", "minimum": 1, "maximum": 1 << 31}},
        },
        "Progress": {
            "type": "object",
            "required": ["service", "operation", "elapsed_s", "components"],
            "properties": {
                "service": _STR,
                "operation": {"enum": ["deploy", "stop", "start", "restart", "undeploy",
                                       None]},
                "elapsed_s": {"type": "number", "minimum": 0},
                "components": {"type": "object", "additionalProperties": _STR}},
        },
        "Deployment": {
            "type": "object",
            "required": ["service", "version", "time", "digest", "current", "images",
                         "image_digests"],
            "properties": {"service": _STR, "version": {"type": "integer"},
                           "time": {"type": "string", "format": "date-time"}, "digest": _STR,
                           "current": {"type": "boolean"},
                           "images": {"type": "array", "items": _STR},
                           "image_digests": {"type": "array", "items": _STR,
                                             "description": "the image ID each image "
                                                            "resolved to (\"\": unknown)"}},
        },
        "Plan": {
            "type": "object", "required": ["service", "changed", "changes"],
            "properties": {"service": _STR, "changed": {"type": "boolean"},
                           "changes": {"type": "array", "items": {
                               "type": "object",
                               "required": ["action", "component", "reason", "fields"],
                               "properties": {
                                   "action": {"enum": ["create", "replace", "remove", "start",
                                                       "stop", "set"]},
                                   "component": _STR, "reason": _STR,
                                   "fields": {"type": "array", "items": {
                                       "type": "object", "required": ["field", "from", "to"],
                                       "properties": {"field": _STR, "from": {}, "to": {}}}}}}}},
        },
        "Validation": {
            "type": "object",
            "required": ["service", "valid", "components", "warnings", "checked_by"],
            "properties": {"service": _STR, "valid": {"const": True},
                           "components": {"type": "integer", "minimum": 1},
                           "warnings": {"type": "array", "items": _STR},
                           "checked_by": _STR}},
        "Event": {
            "type": "object",
            "required": ["id", "time", "service", "component", "from", "to", "detail",
                         "unplanned"],
            "properties": {"id": {"type": "integer"},
                           "time": {"type": "string", "format": "date-time"},
                           "service": _STR, "component": _STR, "from": _STR, "to": _STR,
                           "detail": _STR, "unplanned": {"type": "boolean"}},
        },
        "Undeployed": {
            "type": "object", "required": ["service", "undeployed"],
            "properties": {"service": _STR, "undeployed": {"type": "boolean", "const": True}},
        },
        "RouteRemoved": {
            "type": "object", "required": ["hostname", "removed"],
            "properties": {"hostname": _STR, "removed": {"type": "boolean", "const": True}},
        },
        "SecretInfo": {
            "type": "object", "required": ["name", "version", "versions", "created", "updated",
                                           "used_by"],
            "properties": {"name": {"type": "string", "pattern": grammar.SECRET_NAME_PATTERN},
                           "version": {"type": "integer", "minimum": 1},
                           "versions": {"type": "array", "items": {"type": "integer"}},
                           "created": _STR, "updated": _STR,
                           "used_by": {"type": "array", "items": _STR}},
        },
        "SecretValue": {
            "type": "object", "required": ["value"], "additionalProperties": False,
            "properties": {"value": {"type": "string", "contentEncoding": "base64",
                                     "pattern": BASE64_PATTERN,
                                     "minLength": 4, "maxLength": 2 * 65536,
                                     "description": "the value, base64 (at most 64 KiB)"}},
        },
        "SecretRemoved": {
            "type": "object", "required": ["name", "removed"],
            "properties": {"name": _STR, "removed": {"type": "boolean", "const": True}},
        },
        "FleetNode": {
            "type": "object", "required": ["node", "state"], "additionalProperties": True,
            "properties": {"node": _STR, "state": {"type": "string", "enum": ["up", "down"]},
                           "roles": {"type": "array", "items": _STR}, "pool": _STR,
                           "cordoned": {"type": "boolean"}, "leader": {"type": "boolean"},
                           "services": {"type": "integer"}},
        },
        "Drained": {
            "type": "object", "required": ["node", "cordoned"], "additionalProperties": True,
            "properties": {"node": _STR, "cordoned": {"type": "boolean"},
                           "moved": {"type": "array", "items": {"type": "object"}},
                           "stayed": {"type": "array", "items": {"type": "object"}}},
        },
    }
