"""Domain errors of mcp_node.

Modules raise these; only the CLI turns them into ``click.ClickException`` and
only the HTTP server turns them into JSON errors, using ``status`` and
``code``. A wrapping error keeps its cause (``raise X(...) from exc``).

::

    MCPError                      500 internal
     +-- ValidationError          400 invalid      (bad input; nothing changed)
     +-- NotFoundError            404 not_found
     +-- ConflictError            409 conflict
     +-- AuthError                401 unauthenticated
     |    +-- ForbiddenError      403 forbidden
     +-- RegistryError            500 registry
     |    +-- SchemaTooNewError   500 schema_too_new
     +-- RuntimeUnavailable       503 runtime_unavailable
     +-- WorkloadError            502 runtime      (podman / qemu failed)
     |    +-- ImageError          502 image        (pull, extract, build)
     |    +-- ResourceError       409 resources    (would overcommit the node)
     +-- EdgeError                502 edge
          +-- DNSCheckError       400 dns          (backend not on the Tailnet)
          +-- IssuerError         502 issuer       (ACME CA)
          +-- ProxyError          502 proxy        (Caddy admin API)
"""

from __future__ import annotations


class MCPError(Exception):
    """Base of every error the agent reports to a user."""

    status = 500
    code = "internal"


class ValidationError(MCPError):
    """Input that breaks a rule; ``field`` names what was wrong."""

    status = 400
    code = "invalid"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class NotFoundError(MCPError):
    status = 404
    code = "not_found"


class ConflictError(MCPError):
    status = 409
    code = "conflict"


class AuthError(MCPError):
    status = 401
    code = "unauthenticated"


class ForbiddenError(AuthError):
    status = 403
    code = "forbidden"


class RegistryError(MCPError):
    code = "registry"


class SchemaTooNewError(RegistryError):
    code = "schema_too_new"


class RuntimeUnavailable(MCPError):
    """A runtime this operation needs is not enabled on this node."""

    status = 503
    code = "runtime_unavailable"


class WorkloadError(MCPError):
    """podman or qemu refused or failed an operation."""

    status = 502
    code = "runtime"


class ImageError(WorkloadError):
    code = "image"


class ResourceError(WorkloadError):
    status = 409
    code = "resources"


class EdgeError(MCPError):
    status = 502
    code = "edge"


class DNSCheckError(EdgeError):
    status = 400
    code = "dns"


class IssuerError(EdgeError):
    code = "issuer"


class ProxyError(EdgeError):
    code = "proxy"


RuntimeError_ = WorkloadError  # temporary: the VM modules still use the old name
