"""The podman REST service the agent talks to: find it, or run it for itself.

``podman system service --time=0`` on ``<state_dir>/podman/podman.sock`` (or a
short path under /tmp when that would overflow sun_path), started with the
configured CONTAINERS_CONF, waited for with a deadline, logged, and stopped by
pid. A pid file lets a restarted agent adopt the service it left running.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from podman import PodmanClient
from podman.errors import PodmanError

from .errors import RuntimeUnavailable, WorkloadError
from .files import read_cmdline

log = logging.getLogger("mcp_node.podman")

SERVICE_START_TIMEOUT_S = 30.0
MAX_UNIX_PATH = 100              # sun_path is 108 bytes; keep a margin


def socket_url(value: str) -> str:
    """Accept ``unix:///p``, ``unix:/p`` or a bare path; podman-py wants ``unix://``."""
    value = value.strip()
    if value.startswith("/"):
        return "unix://" + value
    if value.startswith("unix:") and not value.startswith("unix://"):
        return "unix://" + value[len("unix:"):]
    return value


def socket_path(url: str) -> str | None:
    """The filesystem path of a unix socket URL, else None (tcp/ssh)."""
    for prefix in ("unix://", "http+unix://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return None


def service_argv(podman: str, url: str) -> list[str]:
    """``--time=0``: the service must outlive idle periods between agent calls."""
    return [podman, "system", "service", "--time=0", url]


def service_env(base: Mapping[str, str], containers_conf: str,
                home: str = "") -> dict[str, str]:
    """The service's environment: CONTAINERS_CONF from config wins over the inherited one;
    ``home``: its HOME (where containers/image finds the registries' CAs, issue 20)."""
    env = dict(base)
    if containers_conf:
        env["CONTAINERS_CONF"] = containers_conf
    if home:
        env["HOME"] = home
    return env


def read_environ(pid: int) -> dict[str, str]:
    """``/proc/<pid>/environ`` as a dict ({} when unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def run_cli(podman: str, containers_conf: str, *args: str,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """The podman CLI, for what the REST API cannot reach (storage-only containers).

    Logged at warning level: it runs only to repair podman's own breakage, and an
    operator reading the log should see exactly what was done.
    """
    argv = [podman, *args]
    log.warning("podman: running %s", " ".join(argv))
    try:
        return subprocess.run(argv, env=service_env(os.environ, containers_conf),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkloadError(f"{' '.join(argv)}: {exc}") from exc


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def socket_answers(url: str, timeout: float = 2.0) -> bool:
    """True if a podman API answers ``/_ping`` at ``url`` (unix socket or tcp)."""
    path = socket_path(url)
    try:
        if path is not None:
            if not os.path.exists(path):
                return False
            conn = _UnixHTTPConnection(path, timeout)
            try:
                conn.request("GET", "/_ping")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        with PodmanClient(base_url=url, timeout=timeout) as client:
            return bool(client.ping())
    except (OSError, PodmanError, ValueError, http.client.HTTPException):
        return False


class PodmanService:
    """A ``podman system service`` the agent runs for itself on a socket in its state dir.

    A pid file lets an agent restarted after a crash adopt the service it left
    running (checked against /proc/<pid>/cmdline), so it reuses rather than
    duplicates it and still stops it on close.
    """

    def __init__(self, directory: Path, containers_conf: str = "",
                 podman: str = "podman", home: Callable[[], Path] | None = None) -> None:
        self.directory = directory
        self.podman = podman
        self.containers_conf = containers_conf
        self.home = home    # makes and names the HOME the service gets (Registries)
        path = directory / "podman.sock"
        if len(str(path)) > MAX_UNIX_PATH:
            # sun_path cannot hold it: a short, stable per-state-dir place instead.
            digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
            path = Path("/tmp") / f"mcp-podman-{os.getuid()}-{digest}" / "podman.sock"
        self.socket = path
        self.url = "unix://" + str(path)
        self.pid_file = directory / "service.pid"
        self.log_file = directory / "service.log"
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return service_argv(self.podman, self.url)

    def answering(self, timeout: float = 2.0) -> bool:
        return socket_answers(self.url, timeout)

    def _prepare_dirs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock_dir = self.socket.parent
        if sock_dir != self.directory:
            with contextlib.suppress(FileExistsError):
                sock_dir.mkdir(mode=0o700)
            st = os.lstat(sock_dir)
            if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
                    or st.st_mode & 0o077):
                raise RuntimeUnavailable(
                    f"podman socket directory {sock_dir} is not a private directory of ours")

    def _adopt(self) -> None:
        """Take over the pid of a service a previous agent run started on this socket."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if read_cmdline(pid) == self.argv:
            self.pid = pid
            log.info("podman: adopted podman service pid %d on %s", pid, self.url)

    def ensure(self, timeout: float = SERVICE_START_TIMEOUT_S) -> None:
        """Reuse the service answering on our socket, or start one and wait for it."""
        if self.pid is not None and self.answering():
            return
        if self.answering():
            log.info("podman: reusing podman service already answering on %s", self.url)
            self._adopt()
            if self.pid is None or self.home is None or (
                    read_environ(self.pid).get("HOME") == str(self.home())):
                return
            log.info("podman: service pid %d runs with another HOME; restarting it", self.pid)
            self.stop()
        podman = shutil.which(self.podman)
        if podman is None:
            raise RuntimeUnavailable(f"podman binary {self.podman!r} not found on PATH")
        self._prepare_dirs()
        home = str(self.home()) if self.home is not None else ""
        if self.socket.is_socket():
            self.socket.unlink()   # stale: ours, and nothing answers on it
        env = service_env(os.environ, self.containers_conf, home)
        argv = self.argv
        log.info("podman: starting %s (CONTAINERS_CONF=%s)", " ".join(argv),
                 env.get("CONTAINERS_CONF", ""))
        with open(self.log_file, "ab") as out:
            # Own session: a Ctrl-C or SIGTERM to the agent's group must not hit it.
            self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._proc.pid
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{self.pid}\n")
        os.replace(tmp, self.pid_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answering(timeout=1.0):
                log.info("podman: service pid %d answering on %s", self.pid, self.url)
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.1)
        code = self._proc.poll()
        self.stop()
        tail = self._log_tail()
        why = f"exited with {code}" if code is not None else f"not answering after {timeout:g}s"
        raise RuntimeUnavailable(f"podman system service {why}: {tail}")

    def _log_tail(self) -> str:
        try:
            data = self.log_file.read_bytes()[-400:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and read_cmdline(self.pid) == self.argv

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the service we started or adopted (by pid), SIGKILL after ``timeout``."""
        pid, proc = self.pid, self._proc
        self.pid, self._proc = None, None
        if pid is None:
            return
        if proc is None and read_cmdline(pid) != self.argv:
            return   # the pid is no longer our service
        log.info("podman: stopping podman service pid %d", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    break
            elif not Path(f"/proc/{pid}").exists() or read_cmdline(pid) != self.argv:
                break
            time.sleep(0.05)
        else:
            log.warning("podman: service pid %d ignored SIGTERM, killing", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if proc is not None:
                proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
