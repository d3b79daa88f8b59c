"""The error tree: one root, and every branch answers with the status of its members."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import mcp_node
from mcp_node import errors
from mcp_node.errors import (
    AgentUnreachable,
    ConflictError,
    DNSCheckError,
    EdgeError,
    ForbiddenError,
    HTTPError,
    MCPError,
    RegistryError,
    RemoteError,
    ResourceError,
    SchemaTooNewError,
    TokenStoreError,
    ValidationError,
)

# Second bases kept while a caller still catches by them (see DNSCheckError's docstring).
BRIDGES = {(DNSCheckError, EdgeError)}


def project_exceptions() -> list[type[BaseException]]:
    """Every public exception class defined in an mcp_node module."""
    found = []
    for info in pkgutil.iter_modules(mcp_node.__path__):
        module = importlib.import_module(f"mcp_node.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__ and not name.startswith("_")):
                found.append(obj)
    return found


def test_every_project_error_is_defined_in_errors_py_or_under_the_root() -> None:
    classes = project_exceptions()
    assert {c.__name__ for c in classes} >= {"WorkloadError", "RemoteError", "HTTPError"}
    outside = [c for c in classes if c.__module__ != "mcp_node.errors"]
    # Only the QMP wrapper lives elsewhere (qmp.py), and it too is under the root.
    assert {c.__qualname__ for c in outside} <= {"QMPError"}
    assert [c.__name__ for c in classes if not issubclass(c, MCPError)] == []


def test_a_branch_shares_the_status_of_its_members() -> None:
    def subclasses(cls: type[MCPError]) -> list[type[MCPError]]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    mismatched = [
        (cls.__name__, cls.status, base.__name__, base.status)
        for cls in subclasses(MCPError)
        for base in cls.__mro__[1:]
        if issubclass(base, MCPError) and base is not MCPError
        and "status" in vars(cls) and base.status != cls.status and (cls, base) not in BRIDGES
    ]
    assert mismatched == []


def test_moved_classes_keep_their_wire_contract() -> None:
    assert (ResourceError.status, ResourceError.code) == (409, "resources")
    assert issubclass(ResourceError, ConflictError)
    assert (DNSCheckError.status, DNSCheckError.code) == (400, "dns")
    assert issubclass(DNSCheckError, ValidationError)
    assert DNSCheckError("no A records").field is None
    assert (ForbiddenError.status, ForbiddenError.code) == (403, "forbidden")
    assert (TokenStoreError.status, TokenStoreError.code) == (500, "token_store")
    assert (AgentUnreachable.status, AgentUnreachable.code) == (503, "unreachable")
    # storage trouble is the node's, not the request's: 503, never a generic 500
    assert (RegistryError.status, RegistryError.code) == (503, "registry")
    assert (SchemaTooNewError.status, SchemaTooNewError.code) == (503, "schema_too_new")
    err = HTTPError(405, "method_not_allowed", "use GET", headers=(("Allow", "GET"),))
    assert (err.status, err.code, str(err), err.headers) == (
        405, "method_not_allowed", "use GET", (("Allow", "GET"),))
    remote = RemoteError(404, "not_found", "unknown service 'x'")
    assert (remote.status, remote.code, str(remote)) == (404, "not_found", "unknown service 'x'")


def test_the_docstring_draws_every_class_of_the_module() -> None:
    drawn = errors.__doc__ or ""
    for name, obj in vars(errors).items():
        if inspect.isclass(obj) and issubclass(obj, MCPError) and name == obj.__name__:
            assert f"-- {name} " in drawn or name == "MCPError", name
