"""The registry's service-network tables (migration 018, issue 23): which /24 index a
service holds and each component's host number in it. Allocation is one transaction
(``Registry._tx``), so two deploys racing for a number cannot both get it. A mixin of
``Registry``, as ``registry_history`` is."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from .errors import ResourceError
from .netplan import FIRST_HOST, LAST_HOST, free_number


class NetworkTables:
    if TYPE_CHECKING:   # provided by Registry
        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]: ...

    def networks(self) -> dict[str, tuple[int, dict[str, int]]]:
        """service -> (index, component -> host number), for every allocated network."""
        out: dict[str, tuple[int, dict[str, int]]] = {
            r["service"]: (int(r["idx"]), {}) for r in
            self._query("SELECT service, idx FROM service_networks")}
        for r in self._query("SELECT service, component, host FROM network_hosts"):
            if r["service"] in out:
                out[r["service"]][1][r["component"]] = int(r["host"])
        return out

    def allocate_network(self, service: str, components: Sequence[str],
                         count: int) -> tuple[int, dict[str, int]]:
        """The service's index and host numbers, allocating what is missing (the lowest
        free); components no longer listed keep theirs until ``release_hosts``."""
        with self._tx() as db:
            row = db.execute("SELECT idx FROM service_networks WHERE service=?",
                             (service,)).fetchone()
            if row is None:
                used = [int(r[0]) for r in db.execute("SELECT idx FROM service_networks")]
                idx = free_number(used, 0, count - 1)
                if idx is None:
                    raise ResourceError(f"no free service network: all {count} /24s of "
                                        "[network] cidr are taken")
                db.execute("INSERT INTO service_networks (service, idx) VALUES (?, ?)",
                           (service, idx))
            else:
                idx = int(row[0])
            hosts = {r[0]: int(r[1]) for r in db.execute(
                "SELECT component, host FROM network_hosts WHERE service=?", (service,))}
            for c in components:
                if c in hosts:
                    continue
                n = free_number(list(hosts.values()), FIRST_HOST, LAST_HOST)
                if n is None:
                    raise ResourceError(f"service {service!r} has no free address in its "
                                        "/24")
                db.execute("INSERT INTO network_hosts (service, component, host) "
                           "VALUES (?, ?, ?)", (service, c, n))
                hosts[c] = n
            return idx, hosts

    def promote_host(self, service: str, component: str, nxt: str, old: str) -> None:
        """A start-first switch, in one transaction: the component takes the number of
        its ``nxt`` workload (which becomes its own), ``old`` keeps the one it had while
        that workload drains."""
        with self._tx() as db:
            rows = dict(db.execute("SELECT component, host FROM network_hosts WHERE "
                                   "service=? AND component IN (?, ?)",
                                   (service, component, nxt)).fetchall())
            if nxt not in rows or component not in rows:
                raise ResourceError(f"service {service!r}: no address of {nxt!r} to "
                                    f"give {component!r}")
            db.execute("DELETE FROM network_hosts WHERE service=? AND component IN (?, ?)",
                       (service, nxt, old))
            db.execute("UPDATE network_hosts SET host=? WHERE service=? AND component=?",
                       (rows[nxt], service, component))
            db.execute("INSERT INTO network_hosts (service, component, host) "
                       "VALUES (?, ?, ?)", (service, old, rows[component]))

    def drop_host(self, service: str, key: str) -> None:
        """A side workload's number back (its replace ended)."""
        with self._tx() as db:
            db.execute("DELETE FROM network_hosts WHERE service=? AND component=?",
                       (service, key))

    def release_hosts(self, service: str, keep: Sequence[str]) -> None:
        """Host numbers of components no longer in the service (and of side workloads
        no replace holds: a crash cut it) go back."""
        with self._tx() as db:
            marks = ",".join("?" * len(keep))
            db.execute(f"DELETE FROM network_hosts WHERE service=? "  # noqa: S608
                       f"AND component NOT IN ({marks})", (service, *keep))

    def release_network(self, service: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM network_hosts WHERE service=?", (service,))
            db.execute("DELETE FROM service_networks WHERE service=?", (service,))
