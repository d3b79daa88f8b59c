"""The agent's secret operations (issue 20), a mixin of ``agent.Agent``: set, list and
remove a secret in the node's store (``secretstore``), which deployed services use
which, and each deploy's ``secret_versions`` (the version of every secret a component
uses, recorded with its definition, so a changed secret is a changed definition that
``plan`` shows and a deploy rolls out, and a revert gets the value it ran with)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConflictError, NotFoundError, ValidationError
from .grammar import check_secret_name
from .secretstore import SecretStore

if TYPE_CHECKING:
    from .config import AgentConfig
    from .registry import Registry
    from .servicedef import ServiceDef

log = logging.getLogger("mcp_node.agent")


def key_path(config: AgentConfig) -> Path:
    """``[secrets] key_file``, default ``<state>/secrets.key``."""
    f = config.secrets.key_file
    return Path(f).expanduser() if f else config.state_dir / "secrets.key"


def open_store(config: AgentConfig, registry: Registry) -> SecretStore:
    return SecretStore(registry, key_path(config))


class Source(Protocol):
    """Where deploys find a secret's versions and workloads its value: the node's store
    (``secretstore.SecretStore``) or, in fleet mode, the fleet's (``fleetsecrets``)."""

    scope: str          # "on this node", "in the fleet": how a refusal says where

    def newest(self, name: str) -> int | None: ...
    def has(self, name: str, version: int) -> bool: ...
    def value(self, name: str, version: int) -> bytes: ...


class SecretOps:
    if TYPE_CHECKING:   # provided by Agent
        registry: Registry
        secrets: SecretStore
    # Set by a fleet member (fleetnode): deploys and workloads then read the fleet's.
    secret_source: Source | None = None

    def secret_set(self, name: str, value: bytes | None = None) -> dict[str, Any]:
        """A new version of secret ``name``; what runs keeps its version until deployed
        again. Returns its name, versions and times (never the value)."""
        check_secret_name(name)
        if value is None:
            raise ValidationError("is required", "value")
        info = self.secrets.set(name, value, self._secret_in_use)
        log.info("secret set name=%s version=%d", name, info["version"])
        return {**info, "used_by": self._secret_users().get(name, [])}

    def secret_list(self) -> list[dict[str, Any]]:
        users = self._secret_users()
        return [{**s, "used_by": users.get(s["name"], [])} for s in self.secrets.list()]

    def secret_remove(self, name: str) -> None:
        """Refused (409, naming them) while a deployed service uses it."""
        check_secret_name(name)
        users = self._secret_users().get(name)
        if users:
            raise ConflictError(f"secret {name} is used by deployed service"
                                f"{'s' if len(users) > 1 else ''} {', '.join(users)}: take "
                                "it out of their definitions and deploy them, or undeploy "
                                "them, first")
        if not self.secrets.remove(name):
            raise NotFoundError(f"no secret {name!r} on this node")
        log.info("secret removed name=%s", name)

    def secret_value(self, name: str, version: int) -> bytes:
        """For the runtimes (``Runtime.secret_source``): the value a workload is given."""
        return (self.secret_source or self.secrets).value(name, version)

    def _secret_users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rec in self.registry.list_services():
            for n in sorted({n for c in rec.components for n in c.defn.used_secrets}):
                out.setdefault(n, []).append(rec.name)
        return out

    def _secret_in_use(self, name: str, version: int) -> bool:
        return any((name, version) in c.defn.secret_versions
                   for rec in self.registry.list_services() for c in rec.components)

    def with_secret_versions(self, defn: ServiceDef) -> ServiceDef:
        """``defn`` with each component's ``secret_versions`` (``pinned``) from the node's
        store, or in fleet mode the fleet's."""
        return pinned(defn, self.secret_source or self.secrets)


def pinned(defn: ServiceDef, source: Source) -> ServiceDef:
    """``defn`` with each component's ``secret_versions``: the version it carries (a
    version from history, a revert) while ``source`` keeps it, else the newest. A secret
    not set is a 400 naming it and the field, before anything changes."""
    comps = []
    for i, c in enumerate(defn.components):
        used = c.used_secrets
        if not used and not c.secret_versions:
            comps.append(c)
            continue
        carried = dict(c.secret_versions)
        got = []
        for n in used:
            v = carried.get(n)
            if v is not None and source.has(n, v):
                got.append((n, v))
                continue
            newest = source.newest(n)
            if newest is None:
                raise ValidationError(f"secret {n!r} is not set {source.scope} (set it "
                                      f"first: mcp secret set {n})",
                                      f"components[{i}].{'secrets' if n in c.secrets else 'env'}")
            if v is not None:
                raise ValidationError(
                    f"secret {n!r} version {v} is no longer kept {source.scope} (newest: "
                    f"{newest}); deploy without secret_versions to use the newest",
                    f"components[{i}].secret_versions")
            got.append((n, newest))
        comps.append(replace(c, secret_versions=tuple(sorted(got))))
    return replace(defn, components=tuple(comps))
