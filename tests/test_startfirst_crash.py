"""A SIGKILL of the real ``mcp-agent`` daemon during start-first replaces (issue 19: "a
kill of the agent during a rollout converges to one version, reported truthfully").

The daemon serves one container component's l7 route through the node proxy (real
Caddy, its certificate from Pebble through BIND, as test_noderoutes_live) with
``order = "start-first"``. Each round redeploys it with a new ``MESSAGE`` and kills
the agent at a seeded random point (``MCP_STARTFIRST_CRASH_ROUNDS`` rounds, default 6;
``MCP_CRASH_SEED`` replays a run): every other round as soon as the deploy's progress
shows a chosen step of the replace (beside, checking, switching, draining) plus a
random few ms, the others after a random delay within the time one replace takes. What
the crash leaves (a ``.next``, an ``.old``, the proxy on either) is left in place; the
agent is started again and, with no operator action, must converge to exactly one
workload of the component under its own name, made from the record's spec, whose
answer through Caddy is the record's version; status says it runs ready without drift,
its rollout ends (not ``in_progress`` for ever), history marks it current (a deploy the
kill cut short is recorded at the restart) and health is healthy, no orphan left.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from daemon_env import daemon_on
from edge_env import Caddy, Pebble
from podman_env import containers_conf, podman_cli
from route_env import HOST_ADDR, TSIG_NAME, ZONE, Bind, RouteNetns, tls_get

from mcp_node.client import Client
from mcp_node.errors import MCPError
from mcp_node.runtime import LABEL_OWNER

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("MCP_STARTFIRST_CRASH_ROUNDS", "6"))
CONVERGE_S = 90.0
STEPS = ("starting beside the current one", "checking", "switching", "draining")


def free_on(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, podman_socket: str, caddy: Caddy, pebble: Pebble,
                 bind: Bind) -> tuple[Path, Path]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    secret = bind.secret_file(tmp_path / "tsig.secret")
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[state]\ndir = "{state}"\n'
        f'[podman]\nsocket = "{podman_socket}"\ncontainers_conf = "{containers_conf()}"\n'
        '[monitor]\ninterval_s = 0.3\n'
        f'[node]\nadvertise = "{HOST_ADDR}"\n'
        f'[proxy]\nadmin = "{caddy.admin_url}"\nhttps_port = {caddy.https_port}\n'
        'serve_routes = true\n'
        f'[acme]\ndirectory = "{pebble.directory_url}"\nca_bundle = "{pebble.ca_bundle}"\n'
        f'http01_port = {pebble.http01_port}\n'
        f'[dns]\nupdate_server = "127.0.0.1:{bind.port}"\ntsig_name = "{TSIG_NAME}"\n'
        f'tsig_secret_file = "{secret}"\ntimeout_s = 2.0\n'
        f'[edge]\ninternal_zone = "{ZONE}"\n')
    return conf, state


def containers_of(owner: str, svc: str) -> dict[str, str]:
    out = podman_cli("ps", "-a", "--format", "json", "--filter",
                     f"label={LABEL_OWNER}={owner}").stdout
    return {e["Names"][0]: str(e["State"]) for e in json.loads(out or "[]")
            if e["Names"][0].startswith(f"mcp-{svc}-")}


class Proxied:
    """GET / through Caddy on the node's address with the route's name."""

    def __init__(self, port: int, host: str, root: Path) -> None:
        self.port, self.host = port, host
        self.tls = ssl.create_default_context(cafile=str(root))

    def __call__(self) -> str:
        data = tls_get(self.port, self.host, self.tls)
        if data.startswith("failed: "):
            return data
        head, _, body = data.partition("\r\n\r\n")
        return body if " 200 " in head.split("\r\n")[0] + " " else f"answer: {head[:80]}"


def definition(svc: str, image: str, port: int, version: str) -> dict[str, Any]:
    return {"name": svc, "update": {"order": "start-first", "drain_s": 1.0,
                                    "min_healthy_s": 0.5, "healthy_deadline_s": 30},
            "components": [{"name": "web", "image": image, "check": "http:/",
                            "check_interval_s": 1, "env": [f"MESSAGE={version}"],
                            "routes": [{"port": port}]}]}


def record_message(st: dict[str, Any]) -> str:
    env = st["definition"]["components"][0]["env"]
    return next(e.split("=", 1)[1] for e in env if e.startswith("MESSAGE="))


def test_start_first_replace_killed_at_random_points_converges_to_one_version(
        tmp_path: Path, podman_socket: str, hello_image: str, caddy: Caddy,
        bind_dns: Bind, route_pebble: Pebble, route_netns: RouteNetns) -> None:
    conf, state = write_config(tmp_path, podman_socket, caddy, route_pebble, bind_dns)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(route_pebble.root_pem())
    seed = int(os.environ.get("MCP_CRASH_SEED") or random.randrange(2**32))
    print(f"seed {seed} ({ROUNDS} rounds; MCP_CRASH_SEED={seed} replays them)", flush=True)
    rng = random.Random(seed)
    svc, port = f"k{uuid.uuid4().hex[:8]}", free_on(HOST_ADDR)
    get = Proxied(port, f"{svc}.{ZONE}", root)
    with daemon_on(state, conf) as daemon:
        client = daemon.start()
        owner = daemon.owner
        client.post("/v1/services", definition(svc, hello_image, port, "v0"))
        until(lambda: get() == "hello from v0\n", 120, f"v0 through the proxy: {get()}")
        # One replace runs to its end: how long one takes bounds the random kill times.
        t0 = time.monotonic()
        client.post("/v1/services", definition(svc, hello_image, port, "v1"))
        took = time.monotonic() - t0
        assert get() == "hello from v1\n"
        assert containers_of(owner, svc) == {f"mcp-{svc}-web": "running"}
        outcomes, current = [], "v1"
        for rnd in range(ROUNDS):
            version = f"v{rnd + 2}"
            step = STEPS[rng.randrange(len(STEPS))] if rnd % 2 == 0 else ""
            delay = rng.uniform(0, 0.05) if step else rng.uniform(0, took * 1.2)
            done = threading.Event()

            def deploy(c: Client = client, v: str = version) -> None:
                with contextlib.suppress(MCPError):   # the agent may die under it
                    c.post("/v1/services", definition(svc, hello_image, port, v))
                    done.set()

            th = threading.Thread(target=deploy, daemon=True)
            t1 = time.monotonic()
            th.start()
            if step:   # as soon as the replace shows that step (or it ended first);
                # a client of its own: one client's calls wait for each other
                watch = Client(daemon.url, (state / "token").read_text().strip())
                until(lambda c=watch, s=step: done.is_set() or s in json.dumps(
                    c.get(f"/v1/services/{svc}/progress")), 60, f"no step {step!r}",
                    every=0.005)
            seen = time.monotonic() - t1
            finished = done.wait(delay)
            daemon.kill()
            th.join(timeout=30)
            left = containers_of(owner, svc)
            why = (f"round {rnd} seed {seed}: {version} killed "
                   f"{f'at {step!r} ({seen:.3f}s in) + ' if step else 'after '}{delay:.3f}s "
                   f"(one replace {took:.2f}s; finished={finished}), left {left}, "
                   f"proxy answered {get()!r}")
            print(why, flush=True)
            client = daemon.start()

            def converged(c: Client = client) -> dict[str, Any] | None:
                st = c.get(f"/v1/services/{svc}")
                comp, r = st["components"][0], st["rollout"]
                h = c.get("/v1/health")
                ok = (containers_of(owner, svc) == {f"mcp-{svc}-web": "running"}
                      and comp["state"] == "running" and comp["ready"]
                      and not comp["drift"] and not comp["spec_drift"]
                      and r is not None and r["state"] == "succeeded"
                      and h["status"] == "healthy"
                      and get() == f"hello from {record_message(st)}\n")
                return st if ok else None

            st = until(converged, CONVERGE_S,
                       f"{why}: did not converge: {containers_of(owner, svc)}, "
                       f"{client.get(f'/v1/services/{svc}')['components']}, "
                       f"{client.get(f'/v1/services/{svc}')['rollout']}, "
                       f"{client.get('/v1/health')['reasons']}, proxy {get()!r}\n"
                       f"{daemon.log()[-3000:]}", every=0.2)
            running_version = record_message(st)
            assert running_version in (version, current), (why, running_version)
            h = client.get("/v1/health")
            assert h["orphans"] == [] and h["replacing"] == [] and h["spec_drift"] == [], h
            assert st["components"][0]["routes"][0]["host_port"] is not None
            outcomes.append("new" if running_version == version else "old")
            current = running_version
            hist = client.get(f"/v1/services/{svc}/history")
            # what runs is the current version of history (a deploy the kill cut short
            # is recorded at the restart), and the newest
            assert [h["current"] for h in hist][-1] and sum(h["current"] for h in hist) \
                == 1, (why, hist)
            print(f"  -> {running_version} runs ({outcomes[-1]}), rollout "
                  f"{st['rollout']['version']} {st['rollout']['state']}, history current "
                  f"{[h['version'] for h in hist if h['current']]} of "
                  f"{[h['version'] for h in hist]}", flush=True)
        print(f"outcomes: {outcomes}")
        assert daemon.mcp("undeploy", svc).exit_code == 0
        assert containers_of(owner, svc) == {}
