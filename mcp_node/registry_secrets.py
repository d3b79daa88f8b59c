"""The registry's ``secrets`` table (migration 016): sealed rows only. What a row holds
and how it is sealed is ``secretstore``'s; here are the statements, each write in one
transaction of ``Registry._tx``. A mixin of ``Registry``, as ``registry_history`` is."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


@dataclass(frozen=True)
class SealedRow:
    name: str
    version: int
    created_at: str
    key_id: str
    nonce: bytes
    ciphertext: bytes


def _row(r: sqlite3.Row) -> SealedRow:
    return SealedRow(r["name"], int(r["version"]), r["created_at"], r["key_id"],
                     bytes(r["nonce"]), bytes(r["ciphertext"]))


class SecretTables:
    if TYPE_CHECKING:   # provided by Registry
        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]: ...

    def secret_rows(self, name: str | None = None) -> list[SealedRow]:
        """Every stored version (of one secret), by name then version."""
        where, args = ("WHERE name=?", (name,)) if name is not None else ("", ())
        return [_row(r) for r in self._query(
            f"SELECT * FROM secrets {where} ORDER BY name, version", args)]  # noqa: S608

    def secret_row(self, name: str, version: int) -> SealedRow | None:
        rows = self._query("SELECT * FROM secrets WHERE name=? AND version=?", (name, version))
        return _row(rows[0]) if rows else None

    def put_secret(self, name: str, seal: Callable[[int, sqlite3.Connection], SealedRow],
                   keep: Callable[[str, int, int], bool]) -> SealedRow:
        """A new version of ``name`` (the next number), sealed by ``seal(version, db)``
        inside the transaction; older versions ``keep(name, version, newest)`` refuses
        are deleted with it."""
        with self._tx() as db:
            top = db.execute("SELECT MAX(version) FROM secrets WHERE name=?",
                             (name,)).fetchone()[0]
            row = seal(int(top or 0) + 1, db)
            db.execute("INSERT INTO secrets (name, version, created_at, key_id, nonce, "
                       "ciphertext) VALUES (?,?,?,?,?,?)",
                       (row.name, row.version, row.created_at, row.key_id, row.nonce,
                        row.ciphertext))
            for (version,) in db.execute("SELECT version FROM secrets WHERE name=? AND "
                                         "version<?", (name, row.version)).fetchall():
                if not keep(name, int(version), row.version):
                    db.execute("DELETE FROM secrets WHERE name=? AND version=?",
                               (name, version))
        return row

    def delete_secret(self, name: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM secrets WHERE name=?", (name,)).rowcount > 0

    def reseal_secrets(self, reseal: Callable[[SealedRow], SealedRow],
                       before_commit: Callable[[], None]) -> int:
        """Every row sealed again (``reseal``) in one transaction; ``before_commit`` runs
        last inside it (the new key file written), so either every row and the key move
        together or nothing changes."""
        with self._tx() as db:
            rows = [_row(r) for r in db.execute("SELECT * FROM secrets").fetchall()]
            for old in rows:
                new = reseal(old)
                db.execute("UPDATE secrets SET key_id=?, nonce=?, ciphertext=? WHERE name=? "
                           "AND version=?", (new.key_id, new.nonce, new.ciphertext,
                                             old.name, old.version))
            before_commit()
        return len(rows)

    def secret_key_ids(self) -> set[str]:
        return {str(r[0]) for r in self._query("SELECT DISTINCT key_id FROM secrets")}
