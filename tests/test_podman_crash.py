"""SIGKILL the podman service the agent started for itself, mid-create or mid-start:
nothing of ours is left behind.

Each round (its seed printed) deploys or redeploys a service of three components with
host ports and kills ``podman system service`` (by the pid in the agent's state dir)
after a seeded delay within the operation. The agent starts a new service by itself;
then, within a bounded wait, podman must run exactly the registry, and no conmon, CNI
address reservation or DNAT rule may be left for a container podman no longer knows.
What is attributed to us: conmons named ``mcp-<service>-*``, DNAT rules for our host
ports, and the reservations of those containers' ids or of ids new in the round. All
of them are of containers the agent started, so it recorded their ids: each must be
cleared, not only named in health (what it cannot prove its own it names instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from daemon_env import Daemon
from podman_env import containers_conf, podman_cli
from test_crash import mismatch

from mcp_node.client import Client
from mcp_node.errors import MCPError
from mcp_node.files import read_cmdline

ROUNDS = int(os.environ.get("MCP_PODMAN_CRASH_ROUNDS", "6"))
CONVERGE_S = 60.0
LEAK_WAIT_S = 20.0   # after converging: the agent's sweep runs on its next listing
CNI_DIR = Path("/var/lib/cni/networks/podman")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    need("podman", "iptables")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[podman]\ncontainers_conf = "{containers_conf()}"\n'
                    '[monitor]\ninterval_s = 0.3\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    d = Daemon(state, conf)
    try:
        yield d
    finally:
        d.stop()
        d.remove_containers()
        with contextlib.suppress(OSError, ValueError):
            pid = service_pid(d)
            if "service" in read_cmdline(pid):   # the agent left it running: by pid
                os.kill(pid, signal.SIGTERM)


def service_pid(d: Daemon) -> int:
    return int((d.state / "podman" / "service.pid").read_text())


def live_service_pid(d: Daemon) -> int:
    """The agent's podman service once it runs again (it restarts it on its next call)."""
    deadline = time.monotonic() + CONVERGE_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            pid = service_pid(d)
            if "service" in read_cmdline(pid):
                return pid
        assert time.monotonic() < deadline, f"no podman service\n{d.log()[-2000:]}"
        time.sleep(0.1)


def known_ids() -> set[str]:
    out = podman_cli("ps", "-a", "--external", "--no-trunc", "--format", "{{.ID}}").stdout
    return set(out.split())


def conmons(prefix: str) -> dict[str, str]:
    """conmon pid -> container id, for conmons of containers named ``prefix``*."""
    out: dict[str, str] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        argv = read_cmdline(int(p.name))
        if not argv or not argv[0].endswith("conmon"):
            continue
        opts = dict(zip(argv[1::1], argv[2::1], strict=False))
        if opts.get("-n", "").startswith(prefix) and "-c" in opts:
            out[p.name] = opts["-c"]
    return out


def reservations() -> dict[str, str]:
    """CNI address -> container id."""
    out: dict[str, str] = {}
    for f in CNI_DIR.glob("*.*.*.*") if CNI_DIR.is_dir() else []:
        with contextlib.suppress(OSError, IndexError):   # IndexError: being written
            out[f.name] = f.read_text().split()[0]
    return out


def dnat_ids(ports: set[int]) -> dict[int, set[str]]:
    """Host port -> ids named in the iptables DNAT rules podman's portmap made for it."""
    text = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                          timeout=30).stdout
    out: dict[int, set[str]] = {}
    for line in text.splitlines():
        m = re.search(r'id: \\"([0-9a-f]{64}).*--dports ([0-9,]+) -j CNI-DN-', line)
        if m and line.startswith("-A CNI-HOSTPORT-DNAT "):
            for port in m.group(2).split(","):
                if int(port) in ports:
                    out.setdefault(int(port), set()).add(m.group(1))
    return out


def leaks(prefix: str, ports: set[int], fresh: set[str]) -> list[str]:
    """What of ours names a container podman no longer knows."""
    ids = known_ids()
    out = [f"conmon pid {pid} of gone {cid[:12]}" for pid, cid in conmons(prefix).items()
           if cid not in ids]
    ours = set(conmons(prefix).values())
    for port, held in dnat_ids(ports).items():
        ours |= held
        out += [f"DNAT for port {port} of gone {cid[:12]}" for cid in held if cid not in ids]
    out += [f"CNI reservation {ip} of gone {cid[:12]}" for ip, cid in reservations().items()
            if cid not in ids and (cid in ours or cid in fresh)]
    return sorted(out)


POINTS = ("delay", "reserved", "conmon")


def wait_for_point(point: str, name: str, before: set[str], done: threading.Event) -> None:
    """Until the deploy reaches ``point`` for container ``name`` (or ends): "reserved",
    a new CNI address reserved (mid-create: its network is set up, conmon not yet
    running); "conmon", its conmon running (mid-start: ``runc init`` waits for start)."""
    deadline = time.monotonic() + 30
    while not done.is_set() and time.monotonic() < deadline:
        if point == "reserved" and len(set(reservations().values()) - before) >= \
                1 + "abc".index(name[-1]):
            return
        if point == "conmon" and conmons(name):
            return
        time.sleep(0.002)


def converge(d: Daemon, owner: str, why: str) -> None:
    deadline = time.monotonic() + CONVERGE_S
    while (diff := mismatch(d.state, owner)):
        assert time.monotonic() < deadline, f"{why}: not converged: {diff}\n{d.log()[-3000:]}"
        time.sleep(0.2)


def body(rng: random.Random, name: str, image: str) -> dict[str, Any]:
    return {"name": name, "components": [
        {"name": c, "image": image, "env": [f"MESSAGE={c}{rng.randrange(1000)}"],
         "routes": [{"port": 8080}]} for c in ("a", "b", "c")]}


def test_podman_service_killed_mid_create_or_start_leaves_nothing(
        daemon: Daemon, hello_image: str) -> None:
    client = daemon.start()
    owner = daemon.owner
    svc = f"p{uuid.uuid4().hex[:6]}"
    ports: set[int] = set()
    took = 1.5
    found: list[str] = []
    for rnd in range(ROUNDS):
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        delay = rng.uniform(0.05, took)
        point, comp = rng.choice(POINTS), rng.choice(("a", "b", "c"))
        print(f"round {rnd} seed {seed}: kill the podman service at {point} of {comp} "
              f"(delay {delay:.3f}s)", flush=True)
        before_ids = set(reservations().values())
        pid = live_service_pid(daemon)
        started = time.monotonic()
        done = threading.Event()

        def op(c: Client = client, b: dict[str, Any] = body(rng, svc, hello_image)
               ) -> None:
            with contextlib.suppress(MCPError):   # podman dies under it
                c.post("/v1/services", b)
            done.set()

        t = threading.Thread(target=op, daemon=True)
        t.start()
        if point == "delay":
            if done.wait(delay):
                took = max(0.3, (time.monotonic() - started) * 1.2)
        else:
            wait_for_point(point, f"mcp-{svc}-{comp}", before_ids, done)
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=120)
        assert not t.is_alive(), f"round {rnd} seed {seed}: the deploy did not end"
        why = f"round {rnd} seed {seed}"
        converge(daemon, owner, why)
        with contextlib.suppress(MCPError):   # a deploy podman died under is rolled back
            comps = client.get(f"/v1/services/{svc}")["components"]
            ports |= {r["host_port"] for c in comps for r in c["routes"]}
        fresh = set(reservations().values()) - before_ids
        deadline = time.monotonic() + LEAK_WAIT_S
        while (left := leaks(f"mcp-{svc}-", ports, fresh)):
            if time.monotonic() > deadline:
                # Every one of these is the agent's own (it started each container and
                # so recorded its id): cleared, not just named. Say which were named.
                text = json.dumps(client.get("/v1/health").get("reasons", []))
                found += [f"{why}: {x}"
                          + (" (named in health)" if x.split(" of gone ")[1] in text else "")
                          for x in left]
                break
            time.sleep(0.5)
    assert not found, "\n".join(found)
