"""Registry migrations as properties (hypothesis): a registry at any schema version,
holding generated rows, migrated to the latest keeps every row and ends with exactly
the schema of a fresh database; stopping after any migration resumes cleanly."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_node.registry import Registry, latest_version

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
VALUES = {
    "TEXT": TEXT,
    "INTEGER": st.integers(-(2**40), 2**40),
    "REAL": st.floats(allow_nan=False, allow_infinity=False, width=64),
    "BLOB": st.binary(max_size=12),
}


def schema(db: sqlite3.Connection) -> list[tuple[str, str]]:
    return db.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                      "ORDER BY name").fetchall()


def tables(db: sqlite3.Connection) -> list[str]:
    """User tables in creation order (parents before children)."""
    return [r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
        "AND name != 'schema_migrations' ORDER BY rowid")]


def fill(db: sqlite3.Connection, data: st.DataObject) -> None:
    """Insert generated rows into every table, honouring foreign keys by copying parents."""
    for table in tables(db):
        cols = db.execute(f"PRAGMA table_info({table})").fetchall()  # noqa: S608
        fks: dict[int, list[tuple[str, str, str]]] = {}
        for fk in db.execute(f"PRAGMA foreign_key_list({table})"):
            fks.setdefault(fk[0], []).append((fk[2], fk[3], fk[4]))  # (parent, from, to)
        for _ in range(data.draw(st.integers(0, 4), label=f"{table} rows")):
            row: dict[str, Any] = {}
            for refs in fks.values():
                parent = refs[0][0]
                prow = db.execute(
                    f"SELECT {', '.join(to for _, _, to in refs)} FROM {parent} "  # noqa: S608
                    "ORDER BY random() LIMIT 1").fetchone()
                if prow is None:
                    break
                row.update({frm: prow[i] for i, (_, frm, _) in enumerate(refs)})
            else:
                for _cid, name, ctype, _notnull, _default, pk in cols:
                    if name in row or (pk and ctype == "INTEGER" and table == "events"):
                        continue
                    row[name] = data.draw(VALUES[ctype], label=f"{table}.{name}")
                # A drawn key may collide with an earlier row: skip that row.
                with contextlib.suppress(sqlite3.IntegrityError):
                    db.execute(f"INSERT INTO {table} ({', '.join(row)}) "  # noqa: S608
                               f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))


def snapshot(db: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for table in tables(db):
        cur = db.execute(f"SELECT * FROM {table}")  # noqa: S608
        names = [d[0] for d in cur.description]
        out[table] = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), start=st.integers(1, latest_version()))
def test_migrating_generated_rows_keeps_them_and_reaches_the_fresh_schema(
        data: st.DataObject, start: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_path, path = Path(tmp) / "fresh.db", Path(tmp) / "old.db"
        Registry(fresh_path).close()
        Registry(path, migrate_to=start).close()
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA foreign_keys=ON")
        fill(db, data)
        before = snapshot(db)
        db.close()
        # Stop after any later migration (a crash between two), then resume.
        stop = data.draw(st.integers(start, latest_version()), label="stop after")
        Registry(path, migrate_to=stop).close()
        reg = Registry(path)
        assert reg.schema_version() == latest_version()
        reg.close()
        db, fresh = sqlite3.connect(path), sqlite3.connect(fresh_path)
        try:
            assert schema(db) == schema(fresh)
            after = snapshot(db)
        finally:
            db.close()
            fresh.close()
        for table, rows in before.items():
            kept = [{k: r[k] for k in rows[0]} for r in after[table]] if rows else []
            assert sorted(map(repr, kept)) == sorted(map(repr, rows)), table
