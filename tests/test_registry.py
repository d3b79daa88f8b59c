"""Registry: migrations, schema guard, port allocation, service records, events."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from mcp_node.errors import NotFoundError, SchemaTooNewError
from mcp_node.records import EdgeRouteRecord, Event
from mcp_node.registry import PORT_MAX, PORT_MIN, Registry, latest_version, migrations
from mcp_node.servicedef import from_dict

TOP = Path(__file__).resolve().parent.parent


def schema(path: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(path)
    rows = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    db.close()
    return rows


def svc(name: str = "hello", comps: int = 1, routes: int = 1) -> object:
    return from_dict({"name": name, "components": [
        {"name": f"c{i}", "image": "localhost/x:v1",
         "routes": [{"name": f"r{j}", "port": 8000 + j} for j in range(routes)]}
        for i in range(comps)
    ]})


def test_migrations_are_numbered_from_the_seed() -> None:
    names = [(v, n) for v, n, _ in migrations()]
    assert names[:5] == [(1, "services"), (2, "routes"), (3, "events"), (4, "edge_routes"),
                         (5, "component_runtime")]
    assert [v for v, _ in names] == list(range(1, len(names) + 1))


@pytest.mark.parametrize("start", range(0, latest_version() + 1))
def test_every_intermediate_version_migrates_to_the_same_schema(tmp_path: Path,
                                                                start: int) -> None:
    fresh = tmp_path / "fresh.db"
    Registry(fresh).close()
    old = tmp_path / "old.db"
    reg_partial = Registry(old, migrate_to=start)
    assert reg_partial.schema_version() == min(start, latest_version())
    reg_partial.close()
    reg = Registry(old)
    assert reg.schema_version() == latest_version()
    reg.close()
    assert schema(old) == schema(fresh)


def test_each_migration_is_recorded_with_its_version(tmp_path: Path) -> None:
    Registry(tmp_path / "r.db").close()
    db = sqlite3.connect(tmp_path / "r.db")
    rows = db.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, latest_version() + 1))


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    Registry(tmp_path / "r.db").close()
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'now')")
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNewError, match="schema version 999"):
        Registry(tmp_path / "r.db")


def test_failed_migration_rolls_back_with_its_record(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mcp_node.registry as registry

    real = registry.migrations()
    broken = [*real, (len(real) + 1, "broken", "CREATE TABLE ok (x INT);\nNOT SQL;")]
    monkeypatch.setattr(registry, "migrations", lambda: broken)
    monkeypatch.setattr(registry, "latest_version", lambda: len(real) + 1)
    with pytest.raises(registry.RegistryError, match="broken"):
        Registry(tmp_path / "r.db")
    monkeypatch.undo()
    reg = Registry(tmp_path / "r.db")
    assert reg.schema_version() == latest_version()
    assert not reg._query("SELECT name FROM sqlite_master WHERE name='ok'")


def test_put_get_delete_service_round_trip(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    definition = svc(comps=2, routes=2)
    rec = reg.put_service(definition)  # type: ignore[arg-type]
    assert rec.definition() == definition
    ports = [p for c in rec.components for p in c.host_ports.values()]
    assert len(set(ports)) == 4 and all(PORT_MIN <= p <= PORT_MAX for p in ports)
    # A redeploy keeps the ports it had.
    again = reg.put_service(definition)  # type: ignore[arg-type]
    assert [c.host_ports for c in again.components] == [c.host_ports for c in rec.components]
    reg.delete_service("hello")
    with pytest.raises(NotFoundError):
        reg.get_service("hello")
    assert reg._query("SELECT COUNT(*) FROM routes")[0][0] == 0


def test_concurrent_deploys_never_share_a_port(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    errors: list[BaseException] = []

    def deploy(i: int) -> None:
        try:
            reg.put_service(svc(f"s{i}", comps=2, routes=3))  # type: ignore[arg-type]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ports = [r[0] for r in reg._query("SELECT host_port FROM routes")]
    assert len(ports) == 16 * 6 == len(set(ports))


def test_desired_state_and_events(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    reg.put_service(svc())  # type: ignore[arg-type]
    reg.set_desired("hello", "stopped")
    rec = reg.get_service("hello")
    assert rec.components[0].desired_state == "stopped" and not rec.active
    reg.record_observed([Event("hello", "c0", 1.0, "unknown", "running"),
                         Event("hello", "c0", 2.0, "running", "missing")])
    assert reg.get_service("hello").components[0].observed_state == "missing"
    assert [e.new_state for e in reg.events("hello")] == ["running", "missing"]
    assert reg.event_counts(1.5) == {("hello", "c0"): 1}
    with pytest.raises(NotFoundError):
        reg.set_desired("nope", "running")


def test_edge_routes_round_trip(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    rec = EdgeRouteRecord("a.example.net", "b.svc.mcp.example.net", 443, "100.64.0.2",
                          "/c.pem", "/k.pem", "0a", "2030-01-01T00:00:00Z")
    reg.put_edge_route(rec)
    got = reg.get_edge_route("a.example.net")
    assert got is not None and got.backend_address == "100.64.0.2" and got.cert_serial == "0a"
    assert [r.hostname for r in reg.list_edge_routes()] == ["a.example.net"]
    assert reg.delete_edge_route("a.example.net") and not reg.delete_edge_route("a.example.net")


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    rec = reg.put_service(svc())  # type: ignore[arg-type]
    reg.close()
    again = Registry(tmp_path / "r.db").get_service("hello")
    assert again.components[0].host_ports == rec.components[0].host_ports


def test_a_second_registry_in_one_process_keeps_the_first_ones_writes_visible(
        tmp_path: Path) -> None:
    """Opening the file again in the same process must not drop the first connection's
    POSIX locks (closing any descriptor of a file does): without them another process
    takes itself for the WAL's last user, checkpoints and removes it, and stops seeing
    what the first one writes after (it saw 5 of 10 services here; in a benchmark that
    opened three agents beside a daemon, the file was then malformed)."""
    path = tmp_path / "r.db"
    first = Registry(path)
    for i in range(5):
        first.put_service(svc(f"s{i}"))  # type: ignore[arg-type]
    second = Registry(path)
    count = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
             "print(c.execute('SELECT COUNT(*) FROM services').fetchone()[0]); c.close()")
    subprocess.run([sys.executable, "-c", count, str(path)], check=True)
    for i in range(5, 10):
        first.put_service(svc(f"s{i}"))  # type: ignore[arg-type]
    seen = subprocess.run([sys.executable, "-c", count, str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert seen == "10"
    first.close()
    second.close()


def test_observed_changes_of_a_deleted_service_leave_no_events(tmp_path: Path) -> None:
    # The monitor compares a listing taken before an undeploy committed: its events for the
    # service must not outlive the service's rows (a redeploy under that name would show them).
    reg = Registry(tmp_path / "r.db")
    reg.put_service(svc())  # type: ignore[arg-type]
    reg.delete_service("hello")
    reg.record_observed([Event("hello", "c0", 1.0, "unknown", "running")])
    assert reg.events("hello") == []
    assert reg.event_counts(0.0) == {}
    reg.close()


def test_migrations_are_the_top_level_sql_files() -> None:
    files = sorted(TOP.glob("sql/[0-9][0-9][0-9]_*.sql"))
    assert len(files) >= 7
    assert migrations() == [(int(f.name[:3]), f.name[4:-4], f.read_text()) for f in files]


def test_wheel_ships_the_migrations_and_an_install_from_it_opens_a_registry(
        tmp_path: Path) -> None:
    """Built from a copy of the tree (no build/ left in the work tree), installed
    non-editable and offline into a target dir, and used from there alone."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("mcp_node", "sql"):
        shutil.copytree(TOP / part, src / part, ignore=ignore)
    shutil.copy2(TOP / "pyproject.toml", src / "pyproject.toml")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("mcp_node-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".sql")}
    assert shipped == {f"mcp_node/sql/{f.name}" for f in TOP.glob("sql/*.sql")}

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, cwd=tmp_path)
    shutil.rmtree(src)   # nothing of the source tree left to fall back on
    probe = (
        "import sys, mcp_node, mcp_node.sql\n"
        "from mcp_node.registry import Registry, latest_version\n"
        "reg = Registry(__import__('pathlib').Path(sys.argv[1]))\n"
        "print(mcp_node.__file__, mcp_node.sql.__file__, reg.schema_version(),"
        " latest_version(), sep='\\n')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}   # before the editable install's finder
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "reg.db")],
                         check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    pkg, sql_pkg, version, latest = out.stdout.split("\n")[:4]
    assert pkg == str(site / "mcp_node" / "__init__.py")
    assert sql_pkg == str(site / "mcp_node" / "sql" / "__init__.py")
    assert int(version) == int(latest) == latest_version()
    db = sqlite3.connect(tmp_path / "reg.db")
    applied = [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    db.close()
    assert applied == [v for v, _, _ in migrations()]
