"""Fleet secrets (issue 20, item 4): in fleet mode a secret lives in etcd, sealed with
AES-256-GCM under the fleet key (``secretstore``'s sealing: name and version are the
associated data), which every node is given out of band as a file
(``[secrets] fleet_key_file``, the node key's format: 32 random bytes in base64, 0600).

``/mcp/secrets/<name>`` holds the kept versions (each with its time, key id, nonce and
ciphertext; never a value). Any agent with the key takes ``mcp secret set/rm``; any
agent answers ``list``. A deploy pins each component's ``secret_versions`` from etcd
and its placement transaction compares the secrets' revisions, while ``rm`` (and a
``set`` that drops an old version) compares that no service record was written since
it looked: neither can slip past the other. The node a service is placed on opens
every secret it needs before it changes anything, and when it cannot (no key, another
key, a missing version) says why and runs nothing new. The sealed rows it read last
are kept in memory (never a value), so a workload's restart goes on while etcd is lost.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .cluster import KV, SECRETS, SERVICES
from .errors import (
    ConflictError,
    FleetUnavailable,
    MCPError,
    NotFoundError,
    SecretStoreError,
    ValidationError,
)
from .grammar import check_secret_name
from .registry import now_iso
from .registry_secrets import SealedRow
from .secretstore import KEEP_VERSIONS, check_secret_value, key_id, read_key, seal, unseal
from .secretuse import pinned
from .servicedef import ServiceDef, from_dict

if TYPE_CHECKING:
    from .cluster import Etcd
    from .config import SecretsConfig

log = logging.getLogger("mcp_node.fleet")

SETTING = "secrets.fleet_key_file"
ATTEMPTS = 60
NO_KEY = (f"this node has no fleet key ({SETTING} is not set): fleet mode keeps secrets in "
          "etcd sealed under the fleet's key; copy the fleet key file to this node (mode "
          f"0600) and name it in {SETTING}")


def key_file(cfg: SecretsConfig) -> Path | None:
    return Path(cfg.fleet_key_file).expanduser() if cfg.fleet_key_file else None


def check_key_file(cfg: SecretsConfig) -> list[ValidationError]:
    """check-config: a configured fleet key file exists, is 0600 and holds a key."""
    path = key_file(cfg)
    if path is None:
        return []
    try:
        read_key(path, SETTING)
    except SecretStoreError as exc:
        return [ValidationError(str(exc), SETTING)]
    return []


def _dump(row: SealedRow) -> dict[str, Any]:
    return {"created": row.created_at, "key_id": row.key_id,
            "nonce": base64.b64encode(row.nonce).decode(),
            "ciphertext": base64.b64encode(row.ciphertext).decode()}


def _rows(kv: KV | None) -> dict[int, SealedRow]:
    """A secret's record in etcd as its sealed rows, by version."""
    if kv is None or not isinstance(kv.value, dict):
        return {}
    name = str(kv.value.get("name", ""))
    return {int(v): SealedRow(name, int(v), d["created"], d["key_id"],
                              base64.b64decode(d["nonce"]), base64.b64decode(d["ciphertext"]))
            for v, d in (kv.value.get("versions") or {}).items()}


def _info(rows: dict[int, SealedRow], used_by: list[str]) -> dict[str, Any]:
    vs = sorted(rows)
    return {"name": rows[vs[-1]].name, "version": vs[-1], "versions": vs,
            "created": rows[vs[0]].created_at, "updated": rows[vs[-1]].created_at,
            "used_by": used_by}


def _defs(services: dict[str, KV]) -> list[ServiceDef]:
    out = []
    for kv in services.values():
        try:
            out.append(from_dict(kv.value["definition"]))
        except (MCPError, KeyError, TypeError):
            continue       # not ours to judge here; fleet reads name it
    return out


def users(services: dict[str, KV]) -> dict[str, list[str]]:
    """Secret -> the fleet's services using it."""
    out: dict[str, set[str]] = {}
    for d in _defs(services):
        for c in d.components:
            for n in c.used_secrets:
                out.setdefault(n, set()).add(d.name)
    return {n: sorted(s) for n, s in out.items()}


def _used_versions(services: dict[str, KV]) -> set[tuple[str, int]]:
    return {pair for d in _defs(services) for c in d.components for pair in c.secret_versions}


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # noqa: S311


class Member(Protocol):
    """What the store needs of the fleet member (``fleetnode.Fleet``): its etcd client."""

    etcd: Etcd


class FleetSecrets:
    """The fleet's secrets as this member reads and writes them (a ``secretuse.Source``)."""

    scope = "in the fleet"

    def __init__(self, fleet: Member, cfg: SecretsConfig) -> None:
        self.fleet = fleet
        self.key_path = key_file(cfg)
        self._rows: dict[tuple[str, int], SealedRow] = {}
        self._lock = threading.Lock()

    def key(self) -> bytes:
        if self.key_path is None:
            raise SecretStoreError(NO_KEY)
        return read_key(self.key_path, SETTING)

    def _get(self, name: str) -> KV | None:
        """``name``'s record in etcd; its sealed rows replace those kept of it."""
        kv = self.fleet.etcd.get(SECRETS + name)
        with self._lock:
            for k in [k for k in self._rows if k[0] == name]:
                del self._rows[k]
            for v, row in _rows(kv).items():
                self._rows[(name, v)] = row
        return kv

    def _kept(self, name: str, version: int) -> SealedRow | None:
        """The sealed row as etcd has it now, or while etcd is lost as it was last read
        (a restart of a workload goes on without etcd)."""
        try:
            return _rows(self._get(name)).get(version)
        except FleetUnavailable:
            with self._lock:
                row = self._rows.get((name, version))
            if row is None:
                raise
            return row

    # -- writes: any member holding the fleet key ----------------------------------------

    def set(self, name: str, value: bytes) -> dict[str, Any]:
        """A new version of ``name`` in etcd; versions beyond the newest ``KEEP_VERSIONS``
        go unless a service record pins them. Returns its name, versions, times, users."""
        check_secret_name(name)
        check_secret_value(value)
        key = self.key()
        etcd = self.fleet.etcd
        _, kvs = etcd.get_prefix(SECRETS)
        others = {r.key_id for kv in kvs.values() for r in _rows(kv).values()} - {key_id(key)}
        if others:   # a node given another key would seal what the others cannot open
            raise SecretStoreError(
                f"this node's fleet key ({SETTING} {self.key_path}, key {key_id(key)}) is not "
                f"the one the fleet's secrets are sealed with (key {', '.join(sorted(others))})"
                ": copy the fleet's key file to this node")
        for attempt in range(ATTEMPTS):
            rev, services = etcd.get_prefix(SERVICES)
            kv = self._get(name)
            rows = _rows(kv)
            top = max(rows, default=0) + 1
            pinned_ = _used_versions(services)
            kept = {v: r for v, r in rows.items()
                    if v > top - KEEP_VERSIONS or (name, v) in pinned_}
            kept[top] = seal(key, name, top, value, now_iso())
            rec = {"name": name, "versions": {str(v): _dump(r) for v, r in sorted(kept.items())}}
            # dropping a version must not race a deploy that pins it: no service record
            # may have been written since the read
            guard = {SERVICES: rev} if len(kept) <= len(rows) else None
            if etcd.txn({SECRETS + name: kv.mod_revision if kv else 0}, {SECRETS + name: rec},
                        unchanged=guard):
                log.info("fleet: secret set name=%s version=%d", name, top)
                return _info(kept, users(services).get(name, []))
            _backoff(attempt)
        raise MCPError(f"fleet: {ATTEMPTS} conflicting writes in a row; try again")

    def list(self) -> list[dict[str, Any]]:
        _, services = self.fleet.etcd.get_prefix(SERVICES)
        _, kvs = self.fleet.etcd.get_prefix(SECRETS)
        used = users(services)
        out = []
        for kv in kvs.values():
            rows = _rows(kv)
            if rows:
                out.append(_info(rows, used.get(next(iter(rows.values())).name, [])))
        return sorted(out, key=lambda r: r["name"])

    def remove(self, name: str) -> None:
        """Refused (409, naming them) while a service in the fleet uses it; one
        transaction that fails if any service record was written since it looked."""
        check_secret_name(name)
        self.key()
        etcd = self.fleet.etcd
        for attempt in range(ATTEMPTS):
            rev, services = etcd.get_prefix(SERVICES)
            using = users(services).get(name)
            if using:
                raise ConflictError(
                    f"secret {name} is used by service{'s' if len(using) > 1 else ''} "
                    f"{', '.join(using)} in the fleet: take it out of their definitions and "
                    "deploy them, or undeploy them, first")
            kv = etcd.get(SECRETS + name)
            if kv is None:
                raise NotFoundError(f"no secret {name!r} in the fleet")
            if etcd.txn({SECRETS + name: kv.mod_revision}, {}, (SECRETS + name,),
                        unchanged={SERVICES: rev}):
                self._get(name)     # forgets the rows kept of it
                log.info("fleet: secret removed name=%s", name)
                return
            _backoff(attempt)
        raise MCPError(f"fleet: {ATTEMPTS} conflicting writes in a row; try again")

    # -- deploys: versions pinned where it is placed, values opened where it runs --------

    def pin(self, defn: ServiceDef) -> tuple[ServiceDef, dict[str, int]]:
        """``defn`` with its ``secret_versions`` from etcd (``secretuse.pinned``; a secret
        not set is a 400), and the revisions read, for the placement to compare."""
        names = sorted({n for c in defn.components for n in c.used_secrets})
        kvs = {n: self._get(n) for n in names}
        out = pinned(defn, _Read(kvs))
        return out, {SECRETS + n: kv.mod_revision for n, kv in kvs.items() if kv is not None}

    def newest(self, name: str) -> int | None:
        return max(_rows(self._get(name)), default=None)

    def has(self, name: str, version: int) -> bool:
        return self._kept(name, version) is not None

    def value(self, name: str, version: int) -> bytes:
        """The value, opened with this node's fleet key; SecretStoreError saying why not."""
        row = self._kept(name, version)
        if row is None:
            raise NotFoundError(f"it is not in etcd (set it: mcp secret set {name})")
        key = self.key()
        if key_id(key) != row.key_id:
            raise SecretStoreError(
                f"it was sealed with fleet key {row.key_id}, but this node's {SETTING} "
                f"({self.key_path}) holds key {key_id(key)}: give this node the fleet's key")
        return unseal(key, row)

    def check_can_run(self, defn: ServiceDef) -> None:
        """Open every secret ``defn`` needs before anything is changed for it; a
        SecretStoreError naming the service, the secret, its version and why."""
        try:
            defn = pinned(defn, self)      # a record from before fleet secrets: the newest
        except ValidationError as exc:
            raise SecretStoreError(f"cannot run service {defn.name}: {exc}; nothing "
                                   "changed here") from exc
        for c in defn.components:
            for n, v in c.secret_versions:
                try:
                    self.value(n, v)
                except (SecretStoreError, NotFoundError) as exc:
                    raise SecretStoreError(f"cannot run service {defn.name}: secret {n} "
                                           f"version {v}: {exc}; nothing changed here") from exc


class _Read:
    """The secrets' records one deploy read, as a ``secretuse.Source`` for ``pinned``."""

    scope = "in the fleet"

    def __init__(self, kvs: dict[str, KV | None]) -> None:
        self.rows = {n: _rows(kv) for n, kv in kvs.items()}

    def newest(self, name: str) -> int | None:
        return max(self.rows.get(name) or {}, default=None)

    def has(self, name: str, version: int) -> bool:
        return version in (self.rows.get(name) or {})

    def value(self, name: str, version: int) -> bytes:
        raise NotImplementedError("a deploy's read only pins versions")
