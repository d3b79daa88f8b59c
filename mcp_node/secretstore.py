"""The node's secret store (issue 20): values sealed with AES-256-GCM under the node's
key file, kept in the registry's ``secrets`` table (``registry_secrets``).

The key file (``[secrets] key_file``, default ``<state>/secrets.key``) holds 32 random
bytes in base64, mode 0600, made on the first ``set``; a file readable by others is
refused. Each row names the key it was sealed with (``key_id``), and its name and
version are the cipher's associated data: a wrong key file, a row moved under another
name and an altered ciphertext are each a ``SecretStoreError`` saying which.

``rotate`` seals every row again under a new key in one registry transaction. The new
key is written beside the old one (``secrets.key.new``) inside that transaction and
moved over it after the commit; a process that finds a ``.new`` whose key the rows
carry finishes the move, so a crash between the two never loses the key.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NotFoundError, SecretStoreError, ValidationError
from .grammar import check_secret_name
from .registry_secrets import SealedRow

if TYPE_CHECKING:
    from .registry import Registry

MAX_SECRET_BYTES = 64 * 1024
KEEP_VERSIONS = 3          # versions kept per secret, besides those deployed services use
KEY_BYTES = 32


def check_secret_value(value: bytes, field: str = "value") -> bytes:
    if not value:
        raise ValidationError("a secret must not be empty", field)
    if len(value) > MAX_SECRET_BYTES:
        raise ValidationError(f"a secret holds at most {MAX_SECRET_BYTES} bytes "
                              f"(is {len(value)})", field)
    return value


def decode_value(data: Any, field: str = "value") -> bytes:
    """The API's body ``{"value": "<base64>"}`` as the value's bytes."""
    if not isinstance(data, dict) or set(data) != {"value"}:
        raise ValidationError('expected {"value": "<base64>"}', "body")
    raw = data["value"]
    if not isinstance(raw, str) or len(raw) > 2 * MAX_SECRET_BYTES:
        raise ValidationError("must be a base64 string", field)
    try:
        value = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError(f"is not base64 ({exc})", field) from exc
    return check_secret_value(value, field)


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"mcp-secrets-key\0" + key).hexdigest()[:16]


def _aad(name: str, version: int) -> bytes:
    return f"mcp-secret\0{name}\0{version}".encode()


NODE_KEY_SETTING = "[secrets] key_file"


def read_key(path: Path, setting: str = NODE_KEY_SETTING) -> bytes:
    """The key in ``path``; SecretStoreError when missing, readable by others or malformed.
    Another ``setting`` than the node key's (the fleet key's) is named in each message."""
    what = str(path) if setting == NODE_KEY_SETTING else f"{path} ({setting})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise SecretStoreError(f"secret key file {path} is missing (restore it from your "
                               f"backup; {setting} names it)") from exc
    except OSError as exc:
        raise SecretStoreError(f"cannot open secret key file {what}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise SecretStoreError(f"secret key file {what} must be mode 0600 (is "
                                   f"{st.st_mode & 0o777:04o}): chmod 600 {path}")
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise SecretStoreError(f"secret key file {what} does not hold a key (base64 of "
                               f"{KEY_BYTES} bytes)")
    return key


def write_key(path: Path, key: bytes, exclusive: bool) -> None:
    """``key`` into a new file at ``path``, 0600 from its first byte, synced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(key: bytes, name: str, version: int, value: bytes, created_at: str) -> SealedRow:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return SealedRow(name, version, created_at, key_id(key), nonce,
                     AESGCM(key).encrypt(nonce, value, _aad(name, version)))


def unseal(key: bytes, row: SealedRow) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(row.nonce, row.ciphertext, _aad(row.name, row.version))
    except InvalidTag as exc:
        raise SecretStoreError(f"secret {row.name} version {row.version} cannot be opened: "
                               "its stored ciphertext or record was altered (AES-GCM "
                               "authentication failed); set it again") from exc


class SecretStore:
    """Secrets of one node: ``registry``'s rows, sealed under the key at ``key_path``."""

    scope = "on this node"

    def __init__(self, registry: Registry, key_path: Path) -> None:
        self.registry = registry
        self.key_path = key_path
        self.pending_path = key_path.with_name(key_path.name + ".new")

    # -- the key -----------------------------------------------------------------------

    def _finish_rotation(self) -> None:
        """A rotation that committed but did not move its key file: move it now."""
        if not self.pending_path.exists():
            return
        new = read_key(self.pending_path)
        if key_id(new) in self.registry.secret_key_ids():
            os.replace(self.pending_path, self.key_path)

    def key(self, create: bool = False) -> bytes:
        self._finish_rotation()
        if create and not self.key_path.exists():
            with contextlib.suppress(FileExistsError):   # another process made it first
                write_key(self.key_path, os.urandom(KEY_BYTES), exclusive=True)
        return read_key(self.key_path)

    def _key_for(self, row: SealedRow) -> bytes:
        key = self.key()
        if key_id(key) == row.key_id:
            return key
        if self.pending_path.exists():   # a rotation committing right now
            new = read_key(self.pending_path)
            if key_id(new) == row.key_id:
                return new
        raise SecretStoreError(
            f"secret {row.name} version {row.version} was sealed with key {row.key_id}, "
            f"but the key file {self.key_path} holds key {key_id(key)}: restore the key "
            "file it was written with")

    # -- values ------------------------------------------------------------------------

    def set(self, name: str, value: bytes, keep: Callable[[str, int], bool]) -> dict[str, Any]:
        """A new version of ``name``; versions beyond the newest ``KEEP_VERSIONS`` go
        unless ``keep(name, version)`` (a deployed service uses it)."""
        from .registry import now_iso

        check_secret_name(name)
        check_secret_value(value)
        key = self.key(create=True)

        def sealed(version: int, db: sqlite3.Connection) -> SealedRow:
            return seal(key, name, version, value, now_iso())

        self.registry.put_secret(
            name, sealed, lambda n, v, top: keep(n, v) or v > top - KEEP_VERSIONS)
        return self._info(self.registry.secret_rows(name))

    def value(self, name: str, version: int) -> bytes:
        row = self.registry.secret_row(name, version)
        if row is None:
            raise NotFoundError(f"secret {name} has no version {version} on this node")
        return unseal(self._key_for(row), row)

    def versions(self) -> dict[str, int]:
        """Each secret's newest version."""
        out: dict[str, int] = {}
        for row in self.registry.secret_rows():
            out[row.name] = max(out.get(row.name, 0), row.version)
        return out

    def newest(self, name: str) -> int | None:
        rows = self.registry.secret_rows(name)
        return rows[-1].version if rows else None

    def has(self, name: str, version: int) -> bool:
        return self.registry.secret_row(name, version) is not None

    def list(self) -> list[dict[str, Any]]:
        by_name: dict[str, builtins.list[SealedRow]] = {}
        for row in self.registry.secret_rows():
            by_name.setdefault(row.name, []).append(row)
        return [self._info(rows) for _name, rows in sorted(by_name.items())]

    @staticmethod
    def _info(rows: builtins.list[SealedRow]) -> dict[str, Any]:
        return {"name": rows[-1].name, "version": rows[-1].version,
                "versions": [r.version for r in rows], "created": rows[0].created_at,
                "updated": rows[-1].created_at}

    def remove(self, name: str) -> bool:
        return self.registry.delete_secret(check_secret_name(name))

    def rotate(self) -> int:
        """Seal every row again under a new key; returns how many rows. The old key must
        open them all first, else nothing changes."""
        old = self.key(create=True)
        new = os.urandom(KEY_BYTES)
        if self.pending_path.exists():
            self.pending_path.unlink()   # a rotation that never committed

        def reseal(row: SealedRow) -> SealedRow:
            if row.key_id != key_id(old):
                raise SecretStoreError(
                    f"secret {row.name} version {row.version} was sealed with key "
                    f"{row.key_id}, not the key file's {key_id(old)}; nothing rotated")
            return seal(new, row.name, row.version, unseal(old, row), row.created_at)

        try:
            count = self.registry.reseal_secrets(
                reseal, lambda: write_key(self.pending_path, new, exclusive=True))
        except BaseException:
            if self.pending_path.exists() and key_id(read_key(self.pending_path)) \
                    not in self.registry.secret_key_ids():
                self.pending_path.unlink()
            raise
        os.replace(self.pending_path, self.key_path)
        return count
