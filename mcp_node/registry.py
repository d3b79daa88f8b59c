"""SQLite registry: desired and observed state, edge routes; what happened (events,
deployment history) is read and pruned by ``registry_history``.

One connection, one lock: every write goes through ``_tx``, so there is a
single writer path and each operation is one transaction. WAL mode keeps
readers in other processes (``mcp --local``) from blocking the agent.
Migrations are the numbered files in the top-level ``sql/``; each is applied in its own
transaction together with its row in ``schema_migrations``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConflictError, NotFoundError, RegistryError, SchemaTooNewError
from .records import (
    ComponentRecord,
    EdgeRouteRecord,
    Event,
    HostRecord,
    ServiceRecord,
    component_settings,
    service_settings,
    service_tables,
    settings_values,
)
from .registry_history import HistoryTables
from .registry_net import NetworkTables
from .registry_secrets import SecretTables
from .runtime import workload_name
from .servicedef import ComponentDef, RouteDef, ServiceDef
from .states import RUNNING, STOPPED, UNKNOWN, State

PORT_MIN, PORT_MAX = 10000, 60000
SQL_PACKAGE = "mcp_node.sql"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration, in order.

    The files are the top-level ``sql/`` of the source tree, packaged as
    ``mcp_node.sql`` (pyproject ``package-dir``), so the same lookup works in
    a wheel install and an editable one.
    """
    out = []
    for entry in resources.files(SQL_PACKAGE).iterdir():
        fname = entry.name
        if fname.endswith(".sql") and fname[:3].isdigit():
            out.append((int(fname[:3]), fname[4:-4], entry.read_text(encoding="utf-8")))
    return sorted(out)


def latest_version() -> int:
    return migrations()[-1][0]


def _private(path: Path) -> None:
    """The database holds env values (secrets among them): 0600 from its first byte, and
    an older 0644 one tightened. SQLite gives its -wal and -shm the database's mode.

    An existing file is never opened here: closing any descriptor of it drops every POSIX
    lock this process holds on it, a Registry already open on it included (its WAL-mode
    read lock), and another process then takes itself for the last user and checkpoints
    and removes the WAL under it: three agents opened in one process beside a daemon
    left "database disk image is malformed"."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if not os.access(path, os.W_OK):   # refused here, before anything else starts
            code = errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES
            raise PermissionError(code, os.strerror(code), str(path)) from None
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with suppress(FileNotFoundError):
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def corrupt_message(path: Path, detail: str) -> str:
    """One line: which file, what SQLite said, and what the operator can do."""
    found = [ln.strip() for ln in detail.splitlines() if ln.strip() and "***" not in ln]
    detail = found[0][:200] if found else "unreadable"
    if len(found) > 1:
        detail += f", and {len(found) - 1} more problems"
    return (f"registry {path} is corrupt ({detail}); the agent will not start on it: "
            f"move it aside (mv {path} {path}.corrupt, with its -wal and -shm files) and "
            "restore a backup, or start mcp-agent --adopt on a new registry to take the "
            "running workloads over as orphans")


def storage_error(path: Path, what: str, exc: sqlite3.Error) -> RegistryError:
    """A RegistryError for a failed SQLite call, with the likely cause spelled out."""
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in low or "malformed" in low or "corrupt" in low):
        return RegistryError(corrupt_message(path, msg))
    if "full" in low:
        hint = "the filesystem of the state dir is full; free space and retry"
    elif "readonly" in low or "read-only" in low:
        hint = "the registry file or its directory is read-only; make it writable and retry"
    elif "i/o" in low or "unable to open" in low:
        hint = "the registry file cannot be read or written; check the disk and permissions"
    else:
        hint = "nothing was changed"
    return RegistryError(f"registry {path}: {what} failed: {msg} ({hint})")


def inspect_file(path: Path) -> int | None:
    """Services recorded in the registry at ``path``, or None when there is no file.

    Run by the daemon before it starts: a corrupt file is refused here, naming it,
    and a new or empty registry is told apart from one that has services.
    """
    if not path.exists():
        return None
    # Checked before Registry() migrates: a scribbled page can read as any schema version.
    try:
        con = sqlite3.connect(str(path), timeout=10.0)
    except sqlite3.Error as exc:
        raise storage_error(path, "open", exc) from exc
    try:
        bad = [str(r[0]) for r in con.execute("PRAGMA quick_check") if str(r[0]) != "ok"]
        bad = [line for b in bad for line in b.splitlines()]
    except sqlite3.Error as exc:
        raise storage_error(path, "integrity check", exc) from exc
    finally:
        con.close()
    if bad:
        raise RegistryError(corrupt_message(path, "\n".join(bad)))
    reg = Registry(path)
    try:
        return len(reg._query("SELECT name FROM services"))
    finally:
        reg.close()


class Registry(HistoryTables, SecretTables, NetworkTables):
    def __init__(self, path: Path, migrate_to: int | None = None) -> None:
        """Open (creating) and migrate; ``migrate_to`` stops early, as an older release would."""
        self.path = path
        self._lock = threading.RLock()
        # list_services' answer, kept while nothing wrote: each monitor round reads every
        # record, and an idle node's rounds must not decode them all again (issue 21).
        # (own transactions, the connection's PRAGMA data_version for other processes')
        self._writes = 0
        self._services: tuple[tuple[int, int], list[ServiceRecord]] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _private(path)
            self._db = sqlite3.connect(
                str(path), timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot open registry {path}: {exc}") from exc
        self._db.row_factory = sqlite3.Row
        try:
            with self._guard("open"):
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._db.execute("PRAGMA synchronous=FULL")
            self.migrate(migrate_to)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Storage failures (full disk, read-only file or directory, I/O error, a corrupt
        file) become a RegistryError naming the file and the cause, never a bare
        sqlite3 error (which the server would answer as a generic 500)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise storage_error(self.path, what, exc) from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; on any failure it is rolled back, so nothing half-written stays."""
        with self._lock, self._guard("write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            finally:
                self._writes += 1   # what list_services cached may be stale now

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, self._guard("read"):
            return self._db.execute(sql, args).fetchall()

    def check(self) -> None:
        """Raise RegistryError if SQLite finds the file damaged (``PRAGMA quick_check``)."""
        rows = self._query("PRAGMA quick_check")
        bad = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if bad:
            raise RegistryError(corrupt_message(self.path, "\n".join(bad)))

    # -- migrations ---------------------------------------------------------

    def schema_version(self) -> int:
        with self._lock, self._guard("read"):
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def migrate(self, target: int | None = None) -> int:
        """Apply pending migrations up to ``target`` (default: all)."""
        current = self.schema_version()
        latest = latest_version()
        if current > latest:
            raise SchemaTooNewError(
                f"registry {self.path} has schema version {current}, newer than this "
                f"mcp_node understands ({latest}); upgrade mcp_node"
            )
        # Every migration not applied yet, not only those above the newest applied: one
        # numbered below a migration that was released first is still applied.
        with self._lock, self._guard("read"):
            applied = {int(r[0]) for r in self._db.execute(
                "SELECT version FROM schema_migrations").fetchall()}
        for version, name, sql in migrations():
            if version in applied or (target is not None and version > target):
                continue
            try:
                with self._tx() as db:
                    for stmt in _statements(sql):
                        db.execute(stmt)
                    db.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)",
                        (version, name, now_iso()),
                    )
            except RegistryError as exc:
                raise RegistryError(f"migration {version:03d}_{name} failed: {exc}") from exc
        return self.schema_version()

    # -- services -----------------------------------------------------------

    def put_service(
        self, svc: ServiceDef, ports: dict[tuple[str, str], int] | None = None,
        desired: dict[str, State] | None = None, fresh: frozenset[str] = frozenset(),
    ) -> ServiceRecord:
        """Insert or replace a service; keep each route's host port, allocate new ones.

        ``ports`` forces (component, route) -> host port and ``desired`` component ->
        desired state, used to restore a previous record on rollback. The components
        in ``fresh`` get new host ports (a start-first replace: the new workload runs
        beside the old one, which keeps its ports until it is stopped).
        """
        ts = now_iso()
        with self._tx() as db:
            old_ports = {
                (r["component"], r["name"]): r["host_port"]
                for r in db.execute("SELECT * FROM routes WHERE service=?", (svc.name,))
            }
            # A redeploy is no observed state change: keep what the monitor last saw, or the
            # next refresh logs "unknown -> running" again and redeploys count as flapping.
            old_observed = {
                r["name"]: r["observed_state"]
                for r in db.execute("SELECT name, observed_state FROM components WHERE service=?",
                                    (svc.name,))
            }
            db.execute(
                "INSERT INTO services (name, active, created_at, updated_at, settings) "
                "VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET active=excluded.active, "
                "updated_at=excluded.updated_at, settings=excluded.settings, "
                "undeploying=0",   # a deploy is newer intent
                (svc.name, int(svc.active), ts, ts, service_settings(svc)),
            )
            db.execute("DELETE FROM components WHERE service=?", (svc.name,))
            keep = {k: p for k, p in old_ports.items() if k[0] not in fresh}
            keep.update(ports or {})
            # The ports this deploy holds; those of other services are looked up by port
            # (UNIQUE(host_port) is an index), whatever the number of routes on the node.
            used = set(keep.values()) | set(old_ports.values())   # a fresh port is none
            #                                                    the old workload holds
            for c in svc.components:
                state = RUNNING if svc.active else STOPPED
                state = (desired or {}).get(c.name, state)
                db.execute(
                    "INSERT INTO components (service, name, image, cmd, env, volumes, restart, "
                    "desired_state, observed_state, version, updated_at, runtime, memory_mb, "
                    "vcpus, binary, image_sha256, health_check, image_digest) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (svc.name, c.name, c.image, json.dumps(c.cmd), json.dumps(c.env),
                     json.dumps(c.volumes), c.restart, state,
                     old_observed.get(c.name, UNKNOWN), c.version, ts, c.runtime,
                     c.memory_mb, c.vcpus, c.binary, c.image_sha256, c.check,
                     c.image_digest),
                )
                db.execute("UPDATE components SET settings=? WHERE service=? AND name=?",
                           (component_settings(c), svc.name, c.name))
                for r in c.routes:
                    host_port = keep.get((c.name, r.name)) or self._allocate(db, used)
                    db.execute(
                        "INSERT INTO routes (service, component, name, port, mode, hostname, "
                        "host_port) VALUES (?,?,?,?,?,?,?)",
                        (svc.name, c.name, r.name, r.port, r.mode, r.hostname, host_port),
                    )
        return self.get_service(svc.name)

    @staticmethod
    def _allocate(db: sqlite3.Connection, used: set[int]) -> int:
        """A host port not in ``used`` (then added to it), nor any route's, that nothing
        on the host is bound to.

        Runs inside the writer transaction, so concurrent deploys cannot
        both take the same port; UNIQUE(host_port) is the backstop.
        """
        for _ in range(200):
            port = random.randint(PORT_MIN, PORT_MAX)
            if port not in used and not db.execute(
                    "SELECT 1 FROM routes WHERE host_port=?", (port,)).fetchone() \
                    and _port_free(port):
                used.add(port)
                return port
        raise ConflictError(f"no free host port in {PORT_MIN}-{PORT_MAX}")

    def delete_service(self, name: str, now: float | None = None) -> None:
        """The record and its events go; its history stays, marked undeployed at ``now``
        (pruned later by ``prune_history``)."""
        with self._tx() as db:
            db.execute("DELETE FROM services WHERE name=?", (name,))
            db.execute("DELETE FROM events WHERE service=?", (name,))
            db.execute("DELETE FROM rollouts WHERE service=?", (name,))
            db.execute("INSERT OR REPLACE INTO undeployed (service, time) SELECT ?, ? "
                       "WHERE EXISTS (SELECT 1 FROM deployments WHERE service=?)",
                       (name, time.time() if now is None else now, name))

    def has_service(self, name: str) -> bool:
        return bool(self._query("SELECT 1 FROM services WHERE name=?", (name,)))

    def get_service(self, name: str) -> ServiceRecord:
        recs = self._load(name)
        if not recs:
            names = [r["name"] for r in self._query("SELECT name FROM services ORDER BY name "
                                                    "LIMIT 11")]
            known = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise NotFoundError(f"unknown service {name!r} "
                                f"({'services: ' + known if known else 'no services deployed'})")
        return recs[0]

    def list_services(self) -> list[ServiceRecord]:
        """Every record; the same objects while nothing was written (callers never change
        a record: they write the registry)."""
        with self._lock, self._guard("read"):
            seen = (self._writes, int(self._db.execute("PRAGMA data_version").fetchone()[0]))
            if self._services is None or self._services[0] != seen:
                self._services = (seen, self._load(None))
            return list(self._services[1])

    def _load(self, name: str | None) -> list[ServiceRecord]:
        where, args = ("WHERE name=?", (name,)) if name else ("", ())
        cwhere = "WHERE service=?" if name else ""
        with self._lock, self._guard("read"):
            svcs = self._db.execute(
                f"SELECT * FROM services {where} ORDER BY name", args  # noqa: S608
            ).fetchall()
            comps = self._db.execute(
                f"SELECT * FROM components {cwhere} ORDER BY service, rowid", args  # noqa: S608
            ).fetchall()
            routes = self._db.execute(
                f"SELECT * FROM routes {cwhere} ORDER BY service, component, rowid", args  # noqa: S608
            ).fetchall()
        by_comp: dict[tuple[str, str], list[sqlite3.Row]] = {}
        for r in routes:
            by_comp.setdefault((r["service"], r["component"]), []).append(r)
        by_svc: dict[str, list[ComponentRecord]] = {}
        for c in comps:
            rs = by_comp.get((c["service"], c["name"]), [])
            defn = ComponentDef(
                name=c["name"], image=c["image"], runtime=c["runtime"],
                cmd=tuple(json.loads(c["cmd"])), env=tuple(json.loads(c["env"])),
                volumes=tuple(json.loads(c["volumes"])), restart=c["restart"],
                memory_mb=c["memory_mb"], vcpus=c["vcpus"], binary=c["binary"],
                image_sha256=c["image_sha256"], check=c["health_check"],
                image_digest=c["image_digest"],
                routes=tuple(
                    RouteDef(name=r["name"], port=r["port"], mode=r["mode"],
                             hostname=r["hostname"]) for r in rs
                ),
            )
            defn = replace(defn, **settings_values(c["settings"]))   # issues 19, 20
            by_svc.setdefault(c["service"], []).append(ComponentRecord(
                defn=defn, desired_state=State(c["desired_state"]),
                observed_state=State(c["observed_state"]),
                host_ports={r["name"]: r["host_port"] for r in rs}, updated_at=c["updated_at"],
            ))
        out = []
        for s in svcs:
            update, network = service_tables(s["settings"])
            out.append(ServiceRecord(name=s["name"], active=bool(s["active"]),
                                     components=by_svc.get(s["name"], []),
                                     created_at=s["created_at"], updated_at=s["updated_at"],
                                     undeploying=bool(s["undeploying"]), update=update,
                                     network=network))
        return out

    def set_desired(self, service: str, state: State, component: str | None = None) -> None:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM services WHERE name=?", (service,)).fetchone():
                raise NotFoundError(f"unknown service {service!r}")
            sql = "UPDATE components SET desired_state=?, updated_at=? WHERE service=?"
            args: tuple[Any, ...] = (state, now_iso(), service)
            if component:
                sql, args = sql + " AND name=?", (*args, component)
            db.execute(sql, args)
            # Active while any component should run (one component stopped is not the service).
            db.execute("UPDATE services SET active=EXISTS(SELECT 1 FROM components WHERE "
                       "service=? AND desired_state=?) WHERE name=?", (service, RUNNING, service))

    def mark_undeploying(self, service: str) -> None:
        """An undeploy's intent, recorded before anything is removed (one transaction):
        every component desired stopped and the service marked ``undeploying``, so an
        interrupted undeploy is finished by reconcile, never left half-done."""
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM services WHERE name=?", (service,)).fetchone():
                raise NotFoundError(f"unknown service {service!r}")
            db.execute("UPDATE components SET desired_state=?, updated_at=? WHERE service=?",
                       (STOPPED, now_iso(), service))
            db.execute("UPDATE services SET active=0, undeploying=1 WHERE name=?", (service,))

    def record_observed(self, changes: list[Event]) -> None:
        """Store new observed states and their events in one transaction."""
        if not changes:
            return
        written: set[str] = set()
        with self._tx() as db:
            for e in changes:
                cur = db.execute(
                    "UPDATE components SET observed_state=? WHERE service=? AND name=?",
                    (e.new_state, e.service, e.component),
                )
                if cur.rowcount == 0:
                    continue  # undeployed since the listing: its events went with it
                db.execute(
                    "INSERT INTO events (service, component, time, prev_state, new_state, detail, "
                    "unplanned) VALUES (?,?,?,?,?,?,?)",
                    (e.service, e.component, e.time, e.prev_state, e.new_state, e.detail,
                     int(e.unplanned)),
                )
                written.add(e.service)
            self.cap_events(db, written, self.events_per_service)

    # -- names --------------------------------------------------------------

    def check_workload_names(self, defn: ServiceDef) -> None:
        """Service "a-b" component "c" and service "a" component "b-c" would share one
        workload name; deploying the second would replace the first one's workload."""
        # A name "s-c" can only clash with the (service, component) pairs it splits into
        # at a dash: a lookup each, whatever the number of services on the node.
        for c in defn.components:
            joined = f"{defn.name}-{c.name}"
            for i in (i for i, ch in enumerate(joined) if ch == "-"):
                service, component = joined[:i], joined[i + 1:]
                if service == defn.name or not service or not component:
                    continue
                if self._query("SELECT 1 FROM components WHERE service=? AND name=?",
                               (service, component)):
                    raise ConflictError(
                        f"component {c.name!r} of service {defn.name!r} would be named "
                        f"{workload_name(defn.name, c.name)}, as component {component!r} of "
                        f"service {service!r} is; rename one of them")

    # -- edge routes --------------------------------------------------------

    def put_edge_route(self, rec: EdgeRouteRecord) -> None:
        ts = now_iso()
        with self._tx() as db:
            db.execute(
                "INSERT INTO edge_routes (hostname, backend_hostname, backend_port, "
                "backend_address, backend_tls, cert_path, key_path, cert_serial, cert_expires, "
                "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(hostname) DO UPDATE SET backend_hostname=excluded.backend_hostname, "
                "backend_port=excluded.backend_port, backend_address=excluded.backend_address, "
                "backend_tls=excluded.backend_tls, cert_path=excluded.cert_path, "
                "key_path=excluded.key_path, cert_serial=excluded.cert_serial, "
                "cert_expires=excluded.cert_expires, updated_at=excluded.updated_at",
                (rec.hostname, rec.backend_hostname, rec.backend_port, rec.backend_address,
                 int(rec.backend_tls), rec.cert_path, rec.key_path, rec.cert_serial,
                 rec.cert_expires, rec.created_at or ts, ts),
            )

    def get_edge_route(self, hostname: str) -> EdgeRouteRecord | None:
        rows = self._query("SELECT * FROM edge_routes WHERE hostname=?", (hostname,))
        return _edge(rows[0]) if rows else None

    def list_edge_routes(self) -> list[EdgeRouteRecord]:
        return [_edge(r) for r in self._query("SELECT * FROM edge_routes ORDER BY hostname")]

    def delete_edge_route(self, hostname: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM edge_routes WHERE hostname=?", (hostname,))
            return cur.rowcount > 0


    # -- node hosts (component routes' certificates and DNS, migration 010) ----------

    def node_hosts(self) -> dict[str, HostRecord]:
        rows = self._query("SELECT * FROM node_hosts ORDER BY hostname")
        return {r["hostname"]: HostRecord(r["hostname"], r["cert_path"], r["key_path"],
                                          r["cert_serial"], r["cert_expires"], r["dns_address"])
                for r in rows}

    def put_node_host(self, h: HostRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO node_hosts (hostname, cert_path, key_path, "
                       "cert_serial, cert_expires, dns_address, updated_at) "
                       "VALUES (?,?,?,?,?,?,?)", (h.hostname, h.cert_path, h.key_path,
                                                  h.cert_serial, h.cert_expires,
                                                  h.dns_address, now_iso()))

    def delete_node_host(self, hostname: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM node_hosts WHERE hostname=?", (hostname,))


def _edge(r: sqlite3.Row) -> EdgeRouteRecord:
    return EdgeRouteRecord(
        hostname=r["hostname"], backend_hostname=r["backend_hostname"],
        backend_port=r["backend_port"], backend_address=r["backend_address"],
        backend_tls=bool(r["backend_tls"]), cert_path=r["cert_path"], key_path=r["key_path"],
        cert_serial=r["cert_serial"], cert_expires=r["cert_expires"],
        created_at=r["created_at"], updated_at=r["updated_at"],
    )


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (no triggers with inner ';' here)."""
    out, buf = [], []
    for line in sql.splitlines():
        if line.strip().startswith("--"):
            continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            stmt = "\n".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        out.append(rest)
    return out
