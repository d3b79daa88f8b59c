"""Self-fencing (issue 18): a node that cannot show its lease is alive stops its
fleet-placed workloads before etcd can expire that lease, so a failover (which waits
for the expiry plus the grace) never runs a second copy beside them.

The agent may die at any instant (SIGKILL, SIGSTOP, a hang), so the stopping is not
left to it: a small fence process per node, ``python -m mcp_node.fence STATE_DIR``,
started by the agent in a session of its own (it outlives the agent), watches the
agent's heartbeat file ``fence.json``. The agent rewrites it whenever it renewed its
lease: ``deadline`` on CLOCK_MONOTONIC (one clock for every process of the machine),
the keepalive's send time plus the TTL, less a margin for the clock's rate and for
the stopping itself. When that deadline passes, because the agent is dead, stopped or
cut off from etcd, the fence SIGKILLs every running container labelled with the
agent's owner id whose service is not ``exempt`` (services from before fleet mode,
and ``failover = "overlap"`` ones) and every such VM's qemu, and keeps doing so until
the agent writes a deadline in the future again (it renewed the lease, or joined
again and synced, so what moved away is removed). Containers have no podman restart
policy (podmanargs), so a killed one stays down; the agent's reconcile does not
start a fleet-placed service while fenced either.

One fence per state dir: it holds an exclusive lock on ``fence.pid``. It leaves when
the state dir is gone, when told to (``exit``), or once the deadline is long past and
nothing of the node's runs any more.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .files import lock_held
from .podman_service import _UnixHTTPConnection, socket_path
from .runtime import LABEL_OWNER, LABEL_SERVICE

log = logging.getLogger("mcp_node.fence")

BEAT = "fence.json"
PIDFILE = "fence.pid"
RATE_MARGIN = 0.02        # this host's clock may run this much slower than etcd's leader's
POLL_S = 0.1
API = "/v4.0.0/libpod"


def margin_s(ttl: float) -> float:
    """What the fence keeps in hand before the expiry: time to kill the workloads."""
    return max(0.4, 0.15 * ttl)


def fence_at(sent: float, ttl: float) -> float:
    """Before this monotonic instant etcd cannot have expired a lease whose keepalive
    (or grant) was sent at ``sent`` (etcd counts the TTL from when it received it)."""
    return sent + ttl * (1 - RATE_MARGIN) - margin_s(ttl)


@dataclass
class Beat:
    deadline: float                   # CLOCK_MONOTONIC
    owner: str
    ttl: float
    podman: str = ""                  # the podman API's unix:// URL
    containers_conf: str = ""         # for the CLI, when that API does not answer
    exempt: list[str] = field(default_factory=list)
    exit: bool = False

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> Beat:
        return Beat(deadline=float(raw["deadline"]), owner=str(raw["owner"]),
                    ttl=float(raw["ttl"]), podman=str(raw.get("podman", "")),
                    containers_conf=str(raw.get("containers_conf", "")),
                    exempt=[str(s) for s in raw.get("exempt", [])],
                    exit=bool(raw.get("exit", False)))


def write_beat(state_dir: Path, beat: Beat) -> None:
    """Atomically (rename), 0600; no fsync: a monotonic deadline means nothing after
    a reboot anyway, and the write is on the lease's renewal path."""
    path = state_dir / BEAT
    tmp = path.with_name(f".{BEAT}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(beat), f)
    os.replace(tmp, path)


def read_beat(state_dir: Path) -> Beat | None:
    try:
        return Beat.from_dict(json.loads((state_dir / BEAT).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fence_running(state_dir: Path) -> bool:
    """True while a fence holds the lock on this state dir's ``fence.pid``."""
    return lock_held(state_dir / PIDFILE)


def fence_pid(state_dir: Path) -> int | None:
    """The running fence's pid (tests stop it by this), or None."""
    if not fence_running(state_dir):
        return None
    with contextlib.suppress(OSError, ValueError):
        return int((state_dir / PIDFILE).read_text().strip())
    return None


def spawn(state_dir: Path) -> None:
    """Start the fence in a session of its own (a SIGKILL of the agent's process group
    does not reach it); it exits at once if one is already running."""
    with open(state_dir / "fence.log", "ab") as logf:
        os.chmod(state_dir / "fence.log", 0o600)
        subprocess.Popen(   # noqa: S603 - our own interpreter and module, no shell
            [sys.executable, "-m", "mcp_node.fence", str(state_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
            start_new_session=True, close_fds=True, cwd="/")


# -- the fence process ---------------------------------------------------------------


def _podman(url: str, method: str, path: str) -> Any:
    sock = socket_path(url)
    if not sock:
        raise OSError(f"not a unix socket: {url}")
    conn = _UnixHTTPConnection(sock, timeout=3.0)
    try:
        conn.request(method, API + path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status >= 400 and resp.status not in (404, 409):
            raise OSError(f"podman {method} {path}: HTTP {resp.status} {body[:200]!r}")
        return json.loads(body) if body.strip() else None
    finally:
        conn.close()


def enforce(state_dir: Path, beat: Beat) -> int:
    """Kill what runs of the node's non-exempt services; how many were running
    (-1 when podman could not be asked)."""
    found = 0
    exempt = set(beat.exempt)
    if beat.podman:
        try:
            flt = quote(json.dumps({"label": [f"{LABEL_OWNER}={beat.owner}"]}))
            for c in _podman(beat.podman, "GET", f"/containers/json?filters={flt}") or []:
                service = (c.get("Labels") or {}).get(LABEL_SERVICE, "")
                if not service or service in exempt or c.get("State") != "running":
                    continue
                found += 1
                log.warning("fence: killing container %s (service %s)",
                            str(c.get("Names") or c.get("Id"))[:80], service)
                _podman(beat.podman, "POST", f"/containers/{c['Id']}/kill?signal=SIGKILL")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("fence: podman API: %s; trying the CLI", exc)
            found = _cli_kill(beat, exempt)
    found += _kill_vms(state_dir, exempt)
    return found


def _cli_kill(beat: Beat, exempt: set[str]) -> int:
    """The same through the podman CLI (the API's service died or hangs)."""
    from .podman_service import run_cli

    out = run_cli("podman", beat.containers_conf, "ps", "--filter",
                  f"label={LABEL_OWNER}={beat.owner}", "--format", "json", timeout=20)
    try:
        rows = json.loads(out.stdout or "[]") if out.returncode == 0 else None
    except ValueError:
        rows = None
    if rows is None:
        log.warning("fence: podman ps failed: %s", out.stderr[-300:])
        return -1
    ids = [str(r["Id"]) for r in rows
           if (r.get("Labels") or {}).get(LABEL_SERVICE, "") not in exempt | {""}]
    if ids:
        run_cli("podman", beat.containers_conf, "kill", "--signal", "KILL", *ids, timeout=20)
    return len(ids)


def _kill_vms(state_dir: Path, exempt: set[str]) -> int:
    from .vmstate import VMDir, live_pid, read_meta

    found = 0
    vms = state_dir / "vms"
    for path in sorted(vms.iterdir()) if vms.is_dir() else []:
        d = VMDir(path)
        meta = read_meta(d)
        if meta is None or meta.service in exempt:
            continue
        pid = live_pid(d, meta)
        if pid is not None:
            found += 1
            log.warning("fence: killing qemu pid %d (service %s)", pid, meta.service)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return found


def run(state_dir: Path) -> int:
    """The fence's loop: armed by the agent's beat, fencing past its deadline."""
    fd = os.open(state_dir / PIDFILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0                      # another fence guards this node
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    fired = False
    started = time.monotonic()
    while state_dir.is_dir():
        beat = read_beat(state_dir)
        now = time.monotonic()
        if beat is None:
            if now - started > 60:
                return 0              # never armed
        elif beat.exit:
            log.info("fence: released by the agent")
            return 0
        elif now >= beat.deadline:
            if not fired:
                log.warning("fence: the lease is not known alive (deadline passed %.2f s "
                            "ago); stopping fleet-placed workloads", now - beat.deadline)
            fired = True
            found = enforce(state_dir, beat)
            if found <= 0 and now > beat.deadline + max(10.0, 3 * beat.ttl):
                log.info("fence: nothing of this node runs; leaving")
                return 0
        elif fired:
            fired = False
            log.info("fence: the lease is alive again")
        time.sleep(POLL_S)
    return 0


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m mcp_node.fence STATE_DIR")
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
