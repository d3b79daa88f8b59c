"""The registry's history tables, the ones that only grow and are pruned: ``events``
(observed state changes, appended by ``Registry.record_observed`` in the same
transaction as the state), ``deployments`` (each service's definitions, the newest
``HISTORY_KEEP`` versions) and ``undeployed`` (when a service went, recorded by
``Registry.delete_service``), and ``rollouts`` (each service's latest; issue 19). A
mixin of ``Registry``, so callers keep one object and
every write goes through its single transaction path (``_tx``)."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .records import Deployment, Event, definition_digest
from .rollout import Rollout
from .servicedef import ServiceDef, from_dict
from .states import State

STATES = {s.value for s in State}


def _state(value: str) -> str:
    """A component's State, or a rollout's state word as stored (a service's event)."""
    return State(value) if value in STATES else value

HISTORY_KEEP = 20


class HistoryTables:
    """Events and deployment history (see the module docstring)."""

    events_per_service = 10000   # history.max_events_per_service; the agent sets it

    if TYPE_CHECKING:   # provided by Registry
        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]: ...

    def events(self, service: str | None, limit: int = 50, since: float = 0.0,
               after_id: int = 0) -> list[Event]:
        """The newest ``limit`` events (of one service, or all), oldest first."""
        where = "time>=? AND id>?"
        args: list[Any] = [since, after_id]
        if service is not None:
            where, args = where + " AND service=?", [*args, service]
        rows = self._query(f"SELECT * FROM events WHERE {where} "  # noqa: S608
                           "ORDER BY id DESC LIMIT ?", (*args, limit))
        return [
            Event(service=r["service"], component=r["component"], time=r["time"],
                  prev_state=_state(r["prev_state"]), new_state=_state(r["new_state"]),
                  detail=r["detail"], unplanned=bool(r["unplanned"]), id=r["id"])
            for r in reversed(rows)
        ]

    def record_events(self, events: list[Event]) -> None:
        """Events that change no component's observed state (a rollout's, component "")."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO events (service, component, time, prev_state, new_state, detail, "
                "unplanned) VALUES (?,?,?,?,?,?,?)",
                [(e.service, e.component, e.time, e.prev_state, e.new_state, e.detail,
                  int(e.unplanned)) for e in events])
            self.cap_events(db, {e.service for e in events}, self.events_per_service)

    def put_rollout(self, r: Rollout) -> None:
        body = json.dumps({**asdict(r), "components": list(r.components)}, sort_keys=True)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM services WHERE name=?", (r.service,)).fetchone():
                db.execute("INSERT OR REPLACE INTO rollouts (service, body) VALUES (?,?)",
                           (r.service, body))

    def rollouts(self) -> list[Rollout]:
        out = []
        for row in self._query("SELECT body FROM rollouts ORDER BY service"):
            d = json.loads(row["body"])
            out.append(Rollout(**{**d, "components": tuple(d["components"])}))
        return out

    def event_counts(self, since: float,
                     service: str | None = None) -> dict[tuple[str, str], int]:
        """Unplanned state changes per component since ``since`` (of one service, or
        all): the flap detector's input, read from the window alone (``events_unplanned``)."""
        sql = ("SELECT service, component, COUNT(*) FROM events WHERE time>=? AND "
               "unplanned=1 {} GROUP BY service, component")
        rows = (self._query(sql.format(""), (since,)) if service is None else
                self._query(sql.format("AND service=?"), (since, service)))
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def prune_events(self, older_than_s: float, now: float | None = None) -> int:
        """Events older than ``older_than_s`` go (each round: a seek on ``events_by_time``
        and, only when there is something to forget, one transaction). Returns how many."""
        cutoff = (time.time() if now is None else now) - older_than_s
        if not self._query("SELECT 1 FROM events WHERE time < ? LIMIT 1", (cutoff,)):
            return 0
        with self._tx() as db:
            return db.execute("DELETE FROM events WHERE time < ?", (cutoff,)).rowcount

    @staticmethod
    def cap_events(db: sqlite3.Connection, services: set[str], keep: int) -> None:
        """Beyond each of ``services``' newest ``keep`` events, the older ones go: run in
        the transaction that wrote new ones, so the log never holds more (a seek on
        ``events_by_service`` per service, whatever the table's size)."""
        for service in services:
            db.execute("DELETE FROM events WHERE service=? AND id < (SELECT id FROM events "
                       "WHERE service=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                       (service, service, keep - 1))

    def record_deployment(self, svc: ServiceDef, keep: int = HISTORY_KEEP,
                          note: str = "") -> int:
        """Add ``svc`` as the next version unless it is the latest already; returns the
        version that is now current. Only the newest ``keep`` versions stay. ``note``:
        why the agent made it itself (a revert)."""
        digest = definition_digest(svc)
        with self._tx() as db:
            last = db.execute("SELECT version, digest FROM deployments WHERE service=? "
                              "ORDER BY version DESC LIMIT 1", (svc.name,)).fetchone()
            if last is not None and last["digest"] == digest:
                return int(last["version"])
            version = int(last["version"]) + 1 if last is not None else 1
            db.execute("INSERT INTO deployments (service, version, time, digest, definition, "
                       "note) VALUES (?,?,?,?,?,?)",
                       (svc.name, version, time.time(), digest,
                        json.dumps(svc.to_dict(), sort_keys=True), note[:2000]))
            db.execute("DELETE FROM deployments WHERE service=? AND version<=?",
                       (svc.name, version - keep))
        return version

    def prune_history(self, keep_s: float, max_services: int,
                      now: float | None = None) -> list[str]:
        """Forget the history of services no longer deployed: those undeployed more than
        ``keep_s`` ago, and beyond the ``max_services`` most recently undeployed. A
        deployed service's history is never touched here (it has its own cap of
        versions). Returns the services forgotten, in one transaction (none when there
        is nothing to forget, so a monitor round costs a read)."""
        cutoff = (time.time() if now is None else now) - keep_s
        sql = ("SELECT service, time FROM undeployed WHERE service NOT IN "
               "(SELECT name FROM services) ORDER BY time DESC, service")

        def due(rows: list[sqlite3.Row]) -> list[str]:
            return [r["service"] for i, r in enumerate(rows)
                    if i >= max_services or r["time"] < cutoff]

        if not due(self._query(sql)):
            return []
        with self._tx() as db:   # again, under the write lock: a redeploy may have come
            gone = due(db.execute(sql).fetchall())
            for name in gone:
                db.execute("DELETE FROM deployments WHERE service=?", (name,))
                db.execute("DELETE FROM undeployed WHERE service=?", (name,))
        return gone

    def history_services(self) -> list[str]:
        """Every service with a recorded version (deployed or not): image pruning."""
        return [r[0] for r in self._query("SELECT DISTINCT service FROM deployments "
                                          "ORDER BY service")]

    def latest_version(self, service: str) -> int | None:
        """The newest version recorded for ``service`` (None: none), read alone."""
        row = self._query("SELECT MAX(version) FROM deployments WHERE service=?", (service,))
        return int(row[0][0]) if row and row[0][0] is not None else None

    def history(self, service: str) -> list[Deployment]:
        rows = self._query("SELECT * FROM deployments WHERE service=? ORDER BY version",
                           (service,))
        return [Deployment(r["service"], r["version"], r["time"], r["digest"],
                           from_dict(json.loads(r["definition"])), r["note"]) for r in rows]
