"""What a podman service killed mid-create or mid-start leaves outside podman's records.

podman records a container's OCI state only after ``runc create`` returns; killed
in between, its next service sees the container as never initialised, and
removing it leaves the ``conmon`` + ``runc init`` pair (and whatever network it
had set up) running for a container podman no longer knows. Those are found here
by their container id: conmon's command line names the id (``-c``), the
container name (``-n``) and the OCI runtime (``-r``); CNI's host-local
reservations are files holding the id.

What is cleared is only what is provably ours: the id of a container the runtime
removed itself (it had our owner label) or one it recorded when it made it.
``runc delete --force`` ends the waiting ``runc init`` and its state, and conmon
then exits by itself; CNI's DEL, run as podman would but without the network
namespace, releases the address and the port forwards. Anything else found under
one of our workload names, and what those leave, is reported by name, never
touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import read_cmdline

log = logging.getLogger("mcp_node.podman")

CNI_NETWORKS = Path("/var/lib/cni/networks")      # host-local's reservations
CNI_CONFIG = Path("/etc/cni/net.d")               # podman's CNI network configs
CNI_PLUGIN_DIRS = tuple(Path(d) for d in ("/usr/libexec/cni", "/usr/lib/cni",
                                          "/usr/local/lib/cni", "/opt/cni/bin"))
CLEAR_WAIT_S = 10.0


@dataclass(frozen=True)
class Conmon:
    pid: int
    cid: str          # the container's full id
    name: str         # the container's name
    runtime: str      # the OCI runtime binary (conmon's -r)
    runtime_root: str  # its --root, "" for its default


def _option(argv: list[str], flag: str) -> str:
    with contextlib.suppress(ValueError, IndexError):
        return argv[argv.index(flag) + 1]
    return ""


def conmons() -> list[Conmon]:
    """Every live conmon on the host (a zombie has no command line)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = read_cmdline(int(entry.name))
        if not argv or os.path.basename(argv[0]) != "conmon":
            continue
        cid = _option(argv, "-c")
        if not cid:
            continue
        root = next((a.split("=", 1)[1] for a in argv if a.startswith("--root=")), "")
        out.append(Conmon(int(entry.name), cid, _option(argv, "-n"), _option(argv, "-r"),
                          root))
    return out


def reservations(cid: str) -> list[str]:
    """The CNI addresses (network/address) host-local holds for container ``cid``."""
    return sorted(f"{net}/{addr}" for net, addr, _ in _reserved(cid))


def _reserved(cid: str) -> list[tuple[str, str, str]]:
    """(network, address, interface) of each reservation of ``cid``."""
    out = []
    for f in CNI_NETWORKS.glob("*/*") if CNI_NETWORKS.is_dir() else []:
        with contextlib.suppress(OSError, IndexError):
            words = f.read_text().split()
            if words[0] == cid:
                out.append((f.parent.name, f.name, words[1] if len(words) > 1 else "eth0"))
    return out


def release(cid: str) -> str:
    """CNI's DEL for a container podman forgot, as podman would run it but with no
    network namespace (it is gone): each network's plugins in reverse order, so
    portmap drops its port forwards (DNAT) and host-local the address; then the
    masquerade rules the bridge plugin removes only from inside the namespace. ""
    when nothing of it is left, else why not."""
    errors = []
    for net, _, ifname in _reserved(cid):
        conf = _conflist(net)
        if conf is None:
            errors.append(f"no CNI config for network {net} in {CNI_CONFIG}")
            continue
        dirs = os.pathsep.join(str(d) for d in CNI_PLUGIN_DIRS if d.is_dir())
        env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid, "CNI_NETNS": "",
               "CNI_IFNAME": ifname, "CNI_PATH": dirs, "PATH": os.environ.get("PATH", "")}
        for plugin in reversed(conf.get("plugins") or []):
            kind = str(plugin.get("type", ""))
            binary = next((d / kind for d in CNI_PLUGIN_DIRS if (d / kind).is_file()), None)
            if binary is None or "/" in kind:
                errors.append(f"CNI plugin {kind!r} not found")
                continue
            stdin = json.dumps({**plugin, "name": conf.get("name"),
                                "cniVersion": conf.get("cniVersion")})
            try:
                done = subprocess.run([str(binary)], input=stdin, env=env, text=True,
                                      capture_output=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{kind} DEL: {exc}")
                continue
            if done.returncode != 0:
                errors.append(f"{kind} DEL: {(done.stdout or done.stderr).strip()[:200]}")
        _drop_masquerade(net, cid)
    left = reservations(cid)
    if not left:
        return ""
    return f"CNI DEL left {', '.join(left)}" + (f" ({'; '.join(errors)})" if errors else "")


def _conflist(net: str) -> dict[str, Any] | None:
    for f in sorted(CNI_CONFIG.glob("*.conflist")) if CNI_CONFIG.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            conf = json.loads(f.read_text())
            if isinstance(conf, dict) and conf.get("name") == net:
                return conf
    return None


def _drop_masquerade(net: str, cid: str) -> None:
    """The bridge plugin's nat rules for ``cid`` (their comment names the network and
    the id): the POSTROUTING jump, then its chain."""
    try:
        text = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                              timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    mark = f'--comment "name: \\"{net}\\" id: \\"{cid}\\""'
    for line in text.splitlines():
        if not line.startswith("-A POSTROUTING ") or mark not in line or " -j CNI-" not in line:
            continue
        spec = shlex.split(line[len("-A POSTROUTING "):])
        chain = spec[-1]
        for argv in (["-D", "POSTROUTING", *spec], ["-F", chain], ["-X", chain]):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(["iptables", "-t", "nat", *argv], capture_output=True,
                               timeout=30, check=False)


def clear(c: Conmon, timeout: float = CLEAR_WAIT_S) -> str:
    """End the runc container ``c`` waits for (its conmon then exits); "" when it is
    gone, else why not. Logged at warning level: it repairs podman's breakage."""
    runtime = c.runtime or "runc"
    argv = [runtime, *(["--root", c.runtime_root] if c.runtime_root else []),
            "delete", "--force", c.cid]
    log.warning("podman: conmon pid %d of %s (%s) outlived its container in podman's "
                "records; running %s", c.pid, c.name, c.cid[:12], " ".join(argv))
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv)}: {exc}"
    deadline = time.monotonic() + timeout
    while _alive(c):
        if time.monotonic() > deadline:
            # runc has no such container (its state gone too): conmon waits on nothing.
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
            if not _alive(c):
                break
            return (f"conmon pid {c.pid} still runs after {' '.join(argv)} "
                    f"({done.stderr.strip()[-200:]})")
        time.sleep(0.05)
    return ""


def _alive(c: Conmon) -> bool:
    argv = read_cmdline(c.pid)
    return bool(argv) and _option(argv, "-c") == c.cid


class Leftovers:
    """The ids of the containers a runtime made (a file keeps them across agent
    restarts), what it cleared of theirs, and what it found and could not clear."""

    def __init__(self, ids_file: Path) -> None:
        self.ids_file = ids_file
        self._ids: dict[str, str] = {}          # name -> id, this run
        self._uncleared: dict[str, str] = {}    # id -> reason
        self._lock = threading.Lock()           # the file: appends against rewrites

    def record(self, name: str, cid: str) -> None:
        self._ids[name] = cid
        with self._lock, contextlib.suppress(OSError):   # a configured socket: no dir yet
            self.ids_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.ids_file, "a") as f:
                f.write(f"{cid} {name}\n")

    def recorded(self) -> dict[str, str]:
        """id -> name of every container made (this run and earlier ones)."""
        out = {cid: name for name, cid in self._ids.items()}
        with contextlib.suppress(OSError):
            for line in self.ids_file.read_text().splitlines():
                cid, _, name = line.partition(" ")
                out.setdefault(cid, name)
        return out

    def removed(self, name: str, cid: str) -> None:
        """After podman removed our container: end a conmon of its id left running
        (given a second to exit by itself, as it does after a clean remove)."""
        cid = cid or self._ids.get(name, "")
        if cid:
            self.clear_gone({cid: name}, wait_s=1.0)
            if cid not in self._uncleared:   # gone for good: the file need not keep it
                with self._lock:
                    self._keep({c: n for c, n in self.recorded().items() if c != cid})
                if self._ids.get(name) == cid:
                    del self._ids[name]

    def clear_gone(self, gone: dict[str, str], wait_s: float = 0.0) -> None:
        """End the conmons of removed containers ``gone`` (id -> name, ours); note
        what cannot be cleared, CNI reservations included (only CNI's DEL, which
        podman runs with a record it no longer has, releases them)."""
        deadline = time.monotonic() + wait_s
        while True:
            left = [c for c in conmons() if c.cid in gone]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for c in left:
            why = clear(c)
            if why:
                self._uncleared[c.cid] = (f"podman: cannot end conmon pid {c.pid} of removed "
                                          f"container {c.name} ({c.cid[:12]}): {why}")
        for cid, name in gone.items():
            held = reservations(cid)
            if not held:
                continue
            log.warning("podman: CNI address %s still reserved for removed container %s "
                        "(%s); running CNI DEL for it", ", ".join(held), name, cid[:12])
            why = release(cid)
            if why:
                self._uncleared[cid] = (
                    f"podman: CNI address {', '.join(held)} (and its port forwards) still "
                    f"reserved for removed container {name} ({cid[:12]}): {why}")

    def settle(self, found: list[Conmon], known: set[str]) -> None:
        """``found``: conmons under our workload names, scanned before ``known`` (the ids
        podman lists) was listed, so a container made meanwhile is known. Ours of
        unknown id are cleared; one under a name we made, of another id, is named and
        never touched (another agent's on this host are none of our business)."""
        ours = self.recorded()
        gone = {c.cid: c.name for c in found if c.cid not in known and c.cid in ours}
        gone.update({cid: name for cid, name in ours.items()
                     if cid not in known and cid not in gone and reservations(cid)})
        if gone:
            self.clear_gone(gone)
        names = set(ours.values())
        for c in found:   # under a name we used, of an id we did not record: say so
            if c.cid not in known and c.cid not in ours and c.name in names:
                self._uncleared[c.cid] = (
                    f"podman: conmon pid {c.pid} runs for container {c.name} ({c.cid[:12]}) "
                    "that podman does not know, of an id this agent did not record: left "
                    "alone")
        with self._lock:   # forget what is gone for good (an id made meanwhile stays)
            self._keep({cid: name for cid, name in self.recorded().items()
                        if cid in known or cid in self._uncleared or cid not in ours})
        self._ids = {n: c for n, c in self._ids.items() if c in known or c not in ours}

    def _keep(self, ids: dict[str, str]) -> None:
        with contextlib.suppress(OSError):
            tmp = self.ids_file.with_suffix(".tmp")
            tmp.write_text("".join(f"{cid} {name}\n" for cid, name in ids.items()))
            os.replace(tmp, self.ids_file)

    def reasons(self) -> list[str]:
        """What was found and not cleared, while it is still there."""
        if not self._uncleared:
            return []
        live = {c.cid for c in conmons()}
        for cid in list(self._uncleared):
            if cid not in live and not reservations(cid):
                del self._uncleared[cid]
        return [self._uncleared[k] for k in sorted(self._uncleared)]
