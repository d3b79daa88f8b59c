"""Secrets end to end (issue 20): a real ``mcp-agent`` daemon, a real podman container and
a real Nanos VM (``$MCP_NANOS_DIR``) given one secret as a file and as an env value. The
container's /run/secrets/NAME and env and the VM program's output show the value
arrived; then registry.db, agent.log, every API answer of the test and every
process's command line are searched for it, and it is nowhere."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from conftest import until
from daemon_env import Daemon
from podman_env import containers_conf, podman_cli
from qemu_env import nanos_dir, qemu_pids_in

from mcp_node.cli import cli
from mcp_node.secretfiles import MEMORY_FS, fs_type

VALUE = "Zk4-" + uuid.uuid4().hex[:12]   # unique: found only where it leaked
# busybox sh on Nanos (builtins only): the value printed in two halves, never whole.
SCRIPT = """read line < /run/secrets/db-password
echo "file<${line:0:4}|${line:4}>"
echo "env<${DB_PASSWORD:0:4}|${DB_PASSWORD:4}>"
echo guest-done
"""


def _all_cmdlines() -> bytes:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                out.append((p / "cmdline").read_bytes())
    return b"\n".join(out)


def test_secret_reaches_container_and_vm_and_leaks_nowhere(
        tmp_path: Path, podman_socket: str, busybox_image: str, nanos: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[podman]\nsocket = "{podman_socket}"\ncontainers_conf = '
                    f'"{containers_conf()}"\n[qemu]\nnanos_dir = "{nanos_dir()}"\n'
                    'accel = "tcg"\nmachine = "q35"\n[monitor]\ninterval_s = 0.3\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    d = Daemon(state, conf)
    answers: list[Any] = []
    svc = f"s{uuid.uuid4().hex[:6]}"
    try:
        client = d.start()
        runner = CliRunner()
        base = ["--agent", d.url, "--token-file", str(state / "token")]
        res = runner.invoke(cli, [*base, "secret", "set", "db-password"], input=VALUE + "\n")
        assert (res.exit_code, res.stdout) == (0, "secret db-password version 1 stored\n")
        answers.append(res.stdout + res.stderr)
        defn = {"name": svc, "components": [
            {"name": "box", "image": busybox_image, "cmd": ["sh", "-c", "sleep 600"],
             "secrets": ["db-password"], "env": ["DB_PASSWORD=secret:db-password"]},
            {"name": "vm", "image": busybox_image, "runtime": "unikernel", "memory_mb": 128,
             "cmd": ["sh", "-c", SCRIPT], "restart": "no", "secrets": ["db-password"],
             "env": ["DB_PASSWORD=secret:db-password"]}]}
        answers.append(client.post("/v1/plan", defn))
        answers.append(client.post("/v1/services", defn))

        # the container: a 0400 file on a tmpfs, and the env value
        name = f"mcp-{svc}-box"
        got = podman_cli("exec", name, "/bin/busybox", "cat", "/run/secrets/db-password")
        assert got.stdout == VALUE, got.stderr
        mode = podman_cli("exec", name, "/bin/busybox", "stat", "-c", "%a %u",
                          "/run/secrets/db-password")
        assert mode.stdout.split() == ["400", "0"]
        env = podman_cli("exec", name, "/bin/busybox", "sh", "-c", 'printf %s "$DB_PASSWORD"')
        assert env.stdout == VALUE
        inspect = json.loads(podman_cli("inspect", name).stdout)[0]
        src = next(m["Source"] for m in inspect["Mounts"]
                   if m["Destination"] == "/run/secrets/db-password")
        assert fs_type(Path(src)) in MEMORY_FS and oct(Path(src).stat().st_mode) == "0o100400"
        assert oct(Path(src).parent.stat().st_mode & 0o777) == "0o700"

        # the VM: its program read both; its image (with the secret) is gone after boot
        def console() -> str:
            text = client.request("GET", f"/v1/services/{svc}/logs",
                                  params={"component": "vm"})
            return text if text and "guest-done" in text else ""   # None: nothing yet
        out = until(console, 60, "not within 60s: the VM program's output", every=0.2)
        answers.append(out)
        assert f"file<{VALUE[:4]}|{VALUE[4:]}>" in out
        assert f"env<{VALUE[:4]}|{VALUE[4:]}>" in out
        vm_dir = next((state / "vms").glob(f"{svc}-vm"))
        for f in vm_dir.rglob("*"):
            if f.is_file():
                assert VALUE.encode() not in f.read_bytes(), f
        sealed = Path(src).parent.parent
        assert [p.name for p in sealed.iterdir()] == [Path(src).parent.name]   # no VM build

        # a changed secret is a change plan shows (by version) and a deploy rolls out
        res = runner.invoke(cli, [*base, "secret", "set", "db-password"],
                            input=VALUE + "-2\n")
        assert res.exit_code == 0 and "used by " + svc in res.stdout
        plan = client.post("/v1/plan", defn)
        answers.append(plan)
        assert {c["component"] for c in plan["changes"]} == {"box", "vm"}
        assert plan["changes"][0]["fields"] == [
            {"field": "secret_versions", "from": [["db-password", 1]],
             "to": [["db-password", 2]]}]
        res = runner.invoke(cli, [*base, "secret", "rm", "db-password"])
        assert (res.exit_code, res.stderr) == (1, f"Error: secret db-password is used by "
                                               f"deployed service {svc}: take it out of "
                                               "their definitions and deploy them, or "
                                               "undeploy them, first\n")
        for path in (f"/v1/services/{svc}", f"/v1/services/{svc}/history", "/v1/secrets",
                     "/v1/events", "/v1/health", "/v1/services"):
            answers.append(client.get(path))
        answers.append(client.request("GET", "/metrics"))
        res = runner.invoke(cli, [*base, "--json", "status", svc])
        answers.append(res.stdout)

        # nowhere in clear
        blob = json.dumps(answers, default=str)
        assert VALUE not in blob
        for f in state.glob("registry.db*"):
            assert VALUE.encode() not in f.read_bytes(), f
        assert VALUE not in d.log() and "secret set name=db-password" in d.log()
        assert VALUE.encode() not in _all_cmdlines()
        b64 = base64.b64encode(VALUE.encode())
        assert b64 not in _all_cmdlines()

        client.delete(f"/v1/services/{svc}")
        assert not Path(src).parent.exists()          # the container's files went with it
        res = runner.invoke(cli, [*base, "secret", "rm", "db-password"])
        assert (res.exit_code, res.stdout) == (0, "removed secret db-password\n")
    finally:
        d.stop()
        d.remove_containers()
        for pid in qemu_pids_in(state):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
