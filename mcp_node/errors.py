"""Domain errors of mcp_node: one tree under ``MCPError``.

Modules raise these; only the CLI turns them into ``click.ClickException`` and
only the HTTP server turns them into JSON errors, using ``status`` and
``code``. A wrapping error keeps its cause (``raise X(...) from exc``).

A class sits on the branch whose status it shares, so ``except ConflictError``
means "answered 409" wherever it is caught; a subclass only narrows ``code``.
``HTTPError`` and ``RemoteError`` carry the status of the one response they
stand for, so they hang off the root::

    MCPError                      500 internal
     +-- ValidationError          400 invalid      (bad input; nothing changed)
     |    +-- DNSCheckError       400 dns          (backend not on the Tailnet)
     |    +-- HostPathError       400 invalid      (a volume's host path: missing, outside roots)
     |    +-- ValidationErrors    400 invalid      (several at once, listed; field: the first)
     +-- AuthError                401 unauthenticated
     +-- ForbiddenError           403 forbidden    (a valid token without the role)
     +-- NotFoundError            404 not_found
     +-- ConflictError            409 conflict
     |    +-- ResourceError       409 resources    (would overcommit the node)
     |    +-- HostnameTaken       409 hostname_taken (DNS name held for another address)
     +-- TokenStoreError          500 token_store  (tokens file untrusted or unreadable)
     +-- SecretStoreError         500 secret_store (key file wrong or a sealed row altered)
     +-- RegistryError            503 registry     (storage: full, read-only, corrupt)
     |    +-- SchemaTooNewError   503 schema_too_new
     +-- WorkloadError            502 runtime      (podman / qemu refused or failed)
     |    +-- ImageError          502 image        (pull, extract, build)
     |    +-- NetworkSetupError   502 network      (ip / nft / dnsmasq of bridged networking)
     |    +-- qmp.QMPError        502 runtime      (QEMU's monitor; in mcp_node.qmp)
     +-- EdgeError                502 edge
     |    +-- IssuerError         502 issuer       (ACME CA)
     |    +-- ProxyError          502 proxy        (Caddy admin API, HAProxy)
     |    +-- DNSUpdateError      502 dns_update   (RFC 2136 server refused or unreachable)
     |    +-- RouteError          502 route        (a node route not set up; components run)
     +-- RuntimeUnavailable       503 runtime_unavailable
     +-- FleetUnavailable         503 fleet_unavailable (etcd lost: no fleet writes)
     +-- AgentUnreachable         503 unreachable  (client side: no answer at all)
     +-- HTTPError                4xx/5xx          (server side: protocol-level refusal)
     +-- RemoteError              4xx/5xx          (client side: the agent's error reply)
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


class ValidationErrors(ValidationError):
    """Several rule breaks found in one pass (problems.Problems): a ValidationError
    whose ``field`` is the first one's and whose message lists each, one a line."""

    def __init__(self, errors: list[ValidationError]) -> None:
        self.errors = errors
        MCPError.__init__(self, f"{len(errors)} errors:\n"
                          + "\n".join(f"  {e}" for e in errors))
        self.field = errors[0].field


class NotFoundError(MCPError):
    status = 404
    code = "not_found"


class ConflictError(MCPError):
    status = 409
    code = "conflict"


class ResourceError(ConflictError):
    """The node has not the memory or CPUs left: a conflict with what already runs."""

    code = "resources"


class AuthError(MCPError):
    """No credentials, or ones that match nothing."""

    status = 401
    code = "unauthenticated"


class ForbiddenError(MCPError):
    """Authenticated, but the token's role is below what the call needs."""

    status = 403
    code = "forbidden"


class TokenStoreError(MCPError):
    """The tokens file exists but cannot be trusted or parsed."""

    status = 500
    code = "token_store"


class RegistryError(MCPError):
    """The registry cannot be read or written (full disk, read-only, I/O error, corrupt):
    the node is unavailable for that operation, not the request wrong."""

    status = 503
    code = "registry"


class SchemaTooNewError(RegistryError):
    code = "schema_too_new"


class SecretStoreError(MCPError):
    """The secret store cannot open a value: its key file is missing, not 0600 or holds
    another key, or a row was altered (AES-GCM authentication failed)."""

    status = 500
    code = "secret_store"


class RuntimeUnavailable(MCPError):
    """A runtime this operation needs is not enabled on this node."""

    status = 503
    code = "runtime_unavailable"


class FleetUnavailable(MCPError):
    """Fleet mode: etcd does not answer (no quorum, or every endpoint down)."""

    status = 503
    code = "fleet_unavailable"


class WorkloadError(MCPError):
    """podman or qemu refused or failed an operation."""

    status = 502
    code = "runtime"


class ImageError(WorkloadError):
    code = "image"


class NetworkSetupError(WorkloadError):
    """A host-side step of bridged networking (a link, the nft table, a service's
    dnsmasq) failed: the workloads it was for cannot be wired."""

    code = "network"


class EdgeError(MCPError):
    status = 502
    code = "edge"


class HostPathError(ValidationError):
    """A volume's host path is missing, unresolvable or resolves outside the volume roots.
    Checked at deploy and again at every create, start and boot, so the reconciler can
    tell a path that escaped since (it holds the component down) from other failures."""


class DNSCheckError(ValidationError):
    """The backend does not resolve to Tailnet addresses: the request names a bad backend."""

    code = "dns"


class IssuerError(EdgeError):
    code = "issuer"


class ProxyError(EdgeError):
    code = "proxy"


class DNSUpdateError(EdgeError):
    """The RFC 2136 update server refused or could not be reached."""

    code = "dns_update"


class RouteError(EdgeError):
    """A node route could not be set up (its step named); the components run."""

    code = "route"


class HostnameTaken(ConflictError):
    """The route hostname already points at another address: taking it would hijack it."""

    code = "hostname_taken"


class AgentUnreachable(MCPError):
    """No answer from the agent at all (refused, DNS, timeout, TLS failure)."""

    status = 503
    code = "unreachable"


class HTTPError(MCPError):
    """A protocol-level refusal by the server, with its own status and code."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.close = close
        self.headers = headers


class RemoteError(MCPError):
    """An error reply from the agent, with the agent's own status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


