"""Private registries (issue 20, item 1), end to end with real components: Debian's
``docker-registry`` on 127.0.0.1 with TLS from a CA the test made and an htpasswd user
(tests/registry_env.py), the ``mcp-agent`` daemon running its own podman service, and a
container and a Nanos VM component pulled from it.

First each failure a new user meets, reproduced, its message checked word for word, and
nothing deployed after it: no CA configured, no login configured, a CA that is not the
registry's, a refused login, a missing image; for the container (libpod API pull) and
the VM (podman CLI pull) alike, and through ``plan`` (digest resolution). The files are
read at each pull, so each failure is mended by rewriting a file, with no restart. Then
both components deploy from the registry and answer, while a poller reads every
``/proc/*/cmdline``; the password (and its base64 forms) is in no command line, no line
of the agent's log (nor its podman service's), no event and no API answer of the test.
An ``auth_file`` logs in for both runtimes alike (refused while wrong, then mended); an
adopted podman service without the registries' HOME is restarted.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_env import Daemon
from edge_env import TestCA
from podman_env import containers_conf, podman_cli, wait_http
from qemu_env import VMReaper, nanos_dir, need_nanos
from registry_env import USER, Registry

pytestmark = pytest.mark.integration


class Agent:
    """An mcp-agent with its own podman service and a ``[registries]`` table for the
    test's registry (or none); every answer it gave the test is kept in ``answers``."""

    def __init__(self, where: Path, table: str) -> None:
        where.mkdir()
        self.conf = where / "agent.toml"
        self.conf.write_text(
            f'[podman]\ncontainers_conf = "{containers_conf()}"\n'
            f'[qemu]\nnanos_dir = "{nanos_dir()}"\nmachine = "q35"\naccel = "tcg"\n'
            f"[monitor]\ninterval_s = 0.5\n{table}")
        state = where / "state"
        state.mkdir(mode=0o700)
        self.daemon = Daemon(state, self.conf)
        self.answers: list[str] = []
        self.client = self.daemon.start()

    def mcp(self, *args: str) -> Any:
        res = self.daemon.mcp(*args)
        self.answers.append(res.output)
        return res

    def get(self, path: str) -> Any:
        body = self.client.get(path)
        self.answers.append(json.dumps(body))
        return body

    def services(self) -> list[str]:
        return sorted({row["service"] for row in self.get("/v1/services")})

    def stop(self) -> None:
        self.daemon.stop()
        self.daemon.remove_containers()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Agent]]:
    need_nanos()
    made: list[Agent] = []
    reaper = VMReaper()
    try:
        yield made
    finally:
        for a in made:
            a.stop()
            reaper.watch(a.daemon.state)
        reaper.run()


def definition(tmp_path: Path, svc: str, image: str, runtimes: tuple[str, ...]) -> Path:
    parts = [f'name = "{svc}"\n']
    for i, rt in enumerate(runtimes):
        name = "api" if rt == "container" else "vm"
        parts.append(f"""
[[components]]
name = "{name}"
image = "{image}"
runtime = "{rt}"
pull = "always"
memory_mb = 192
env = ["MESSAGE={rt}"]
[[components.routes]]
port = {8080 + i}
""")
    path = tmp_path / f"{svc}-{'-'.join(runtimes)}.toml"
    path.write_text("".join(parts))
    return path


def refused_with(agent: Agent, defn: Path, message: str) -> None:
    """``plan`` and ``deploy`` both fail with exactly ``message``; nothing is deployed."""
    for cmd in ("plan", "deploy"):
        res = agent.mcp(cmd, str(defn))
        assert (res.exit_code, res.output) == (1, f"Error: {message}\n"), res.output
    assert agent.services() == []


ONE = (("container",), ("unikernel",))


def test_new_user_without_registries_config_is_told_what_to_set(
        tmp_path: Path, private_registry: Registry, agents: list[Agent]) -> None:
    reg = private_registry
    image, host = f"{reg.host}/mcp/hello:v1", reg.host
    agent = Agent(tmp_path / "agent", "")
    agents.append(agent)
    for rts in ONE:
        refused_with(agent, definition(tmp_path, "nocfg", image, rts),
                     f"cannot pull image {image}: the TLS certificate of registry {host} is "
                     f'signed by an unknown authority; set registries."{host}".ca_file to the '
                     "CA bundle that signed it. Nothing was changed")


def test_private_registry_failures_then_a_container_and_a_nanos_vm(
        tmp_path: Path, private_registry: Registry, agents: list[Agent]) -> None:
    reg = private_registry
    host, image = reg.host, f"{reg.host}/mcp/hello:v1"
    key = f'registries."{host}"'
    ca, password = tmp_path / "registry-ca.pem", tmp_path / "registry.password"
    ca.write_bytes(TestCA("not the registry's CA").pem)
    password.write_text("not-the-password\n")
    password.chmod(0o600)
    first = Agent(tmp_path / "agent-1", f'[registries."{host}"]\nca_file = "{ca}"\n')
    agents.append(first)

    # a CA file that is not the one the registry's certificate chains to
    for rts in ONE:
        refused_with(first, definition(tmp_path, "web", image, rts),
                     f"cannot pull image {image}: the TLS certificate of registry {host} is "
                     f"signed by an unknown authority; set {key}.ca_file to the CA bundle "
                     "that signed it. Nothing was changed")
    # the right CA, read at the next pull; no login configured yet
    ca.write_bytes(reg.ca.pem)
    for rts in ONE:
        refused_with(first, definition(tmp_path, "web", image, rts),
                     f"cannot pull image {image}: registry {host} asks for a login; set "
                     f"{key}.auth_file (or {key}.username and password_file). Nothing was "
                     "changed")
    first.stop()
    agent = Agent(tmp_path / "agent-2", f'[registries."{host}"]\nusername = "{USER}"\n'
                  f'password_file = "{password}"\nca_file = "{ca}"\n')
    agents.append(agent)
    # a login the registry refuses
    for rts in ONE:
        refused_with(agent, definition(tmp_path, "web", image, rts),
                     f"cannot pull image {image}: registry {host} refused the login of {USER} "
                     f"from {key}.password_file; set it to a login the registry accepts. "
                     "Nothing was changed")
    # the right password; an image the registry does not have
    password.write_text(reg.password + "\n")
    for rts, comp in zip(ONE, ("api", "vm"), strict=True):
        refused_with(agent, definition(tmp_path, "web", f"{host}/mcp/hello:nope", rts),
                     f"cannot pull image {host}/mcp/hello:nope: registry {host} has no such "
                     f"image (manifest unknown); set the image of component {comp} to one it "
                     "has. Nothing was changed")

    # both runtimes from the registry, while every process's command line is watched
    podman_cli("rmi", image)   # this name only: the image keeps its local one
    svc = f"r{uuid.uuid4().hex[:8]}"
    secrets_seen = [reg.password, base64.b64encode(f"{USER}:{reg.password}".encode()).decode(),
                    base64.urlsafe_b64encode(reg.password.encode()).decode().rstrip("=")]
    watcher = CmdlineWatcher(secrets_seen)
    watcher.start()
    try:
        res = agent.mcp("--json", "plan", str(definition(tmp_path, svc, image, ONE[0] + ONE[1])))
        assert res.exit_code == 3, res.output   # 3: there are changes
        res = agent.mcp("deploy", str(definition(tmp_path, svc, image, ONE[0] + ONE[1])))
        assert res.exit_code == 0, res.output + agent.daemon.log()
    finally:
        watcher.stop()
    assert watcher.scans > 10 and watcher.pulls_seen, (watcher.scans, watcher.pulls_seen)
    assert watcher.found == [], watcher.found
    st = agent.get(f"/v1/services/{svc}")
    ports = {c["component"]: c["routes"][0]["host_port"] for c in st["components"]}
    assert wait_http(ports["api"]) == "hello from container\n"
    assert wait_http(ports["vm"], timeout=60) == "hello from unikernel\n"
    digests = {c["name"]: c["image_digest"] for c in st["definition"]["components"]}
    local = podman_cli("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
    assert digests == {"api": f"sha256:{local}", "vm": f"sha256:{local}"}
    agent.get(f"/v1/services/{svc}/history")
    agent.get("/v1/events")
    agent.get("/v1/health")
    agent.mcp("--json", "status", svc)

    # the password is nowhere the agent wrote or answered
    logs = {"agent.log": agent.daemon.log(),
            "first agent.log": first.daemon.log(),
            "podman service.log": (agent.daemon.state / "podman" / "service.log").read_text(
                errors="replace")}
    assert f"podman: pull {image} (login from {key}.password_file)" in logs["agent.log"]
    answers = [*first.answers, *agent.answers]
    for where, text in [*logs.items(), *((f"answer {i}", a) for i, a in enumerate(answers))]:
        for s in secrets_seen:
            assert s not in text, f"{where} holds the password"


class CmdlineWatcher:
    """Reads every /proc/*/cmdline every few ms on a thread of its own; ``found`` lists
    any that holds one of ``needles``, ``pulls_seen`` counts podman pulls it saw."""

    def __init__(self, needles: list[str]) -> None:
        self.needles = [n.encode() for n in needles]
        self.found: list[str] = []
        self.pulls_seen = 0
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    argv = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"podman\0pull\0" in argv:
                    self.pulls_seen += 1
                if any(n in argv for n in self.needles):
                    self.found.append(argv.decode(errors="replace"))
            self.scans += 1
            time.sleep(0.005)


def test_an_adopted_podman_service_with_another_home_is_restarted(
        tmp_path: Path, podman_binary: None) -> None:
    """A restarted agent adopts the service it left running only if that service has the
    HOME the registries' CAs are in (an older agent's had none): else it starts anew."""
    from egress import no_egress
    from podman_env import containers_conf

    from mcp_node.podman_service import PodmanService, read_environ

    first = PodmanService(tmp_path / "podman", containers_conf())
    with pytest.MonkeyPatch.context() as mp:
        no_egress(mp)
        first.ensure()
        old_pid = first.pid
        home = tmp_path / "home"
        home.mkdir()
        assert old_pid is not None and read_environ(old_pid).get("HOME") != str(home)
        second = PodmanService(tmp_path / "podman", containers_conf(), home=lambda: home)
        try:
            second.ensure()
            assert second.pid is not None and second.pid != old_pid
            assert read_environ(second.pid)["HOME"] == str(home)
            assert not Path(f"/proc/{old_pid}").exists() or \
                "podman" not in Path(f"/proc/{old_pid}/cmdline").read_text(errors="replace")
            third = PodmanService(tmp_path / "podman", containers_conf(), home=lambda: home)
            third.ensure()   # the same HOME: adopted, not restarted
            assert third.pid == second.pid
        finally:
            second.stop()
            first.stop()


def test_an_auth_file_logs_in_for_both_runtimes(
        tmp_path: Path, private_registry: Registry, agents: list[Agent]) -> None:
    """``auth_file`` (the containers-auth.json ``podman login`` writes) instead of a user
    and password file: refused while it holds a wrong password, then plan resolves (so
    pulls) both components through it, as the file is read at each pull."""
    reg = private_registry
    host, image = reg.host, f"{reg.host}/mcp/hello:v1"
    auth = tmp_path / "auth.json"
    wrong = base64.b64encode(f"{USER}:wrong".encode()).decode()
    auth.write_text(json.dumps({"auths": {f"https://{host}": {"auth": wrong}}}))
    auth.chmod(0o600)
    agent = Agent(tmp_path / "agent", f'[registries."{host}"]\nauth_file = "{auth}"\n'
                  f'ca_file = "{reg.ca_file}"\n')
    agents.append(agent)
    both = definition(tmp_path, "viaauth", image, ONE[0] + ONE[1])
    res = agent.mcp("plan", str(both))
    assert (res.exit_code, res.output) == (1, (
        f"Error: cannot pull image {image}: registry {host} refused the login of {USER} from "
        f'registries."{host}".auth_file; set it to a login the registry accepts. Nothing was '
        "changed\n"))
    auth.write_text(reg.auth_file.read_text())
    podman_cli("rmi", image)
    res = agent.mcp("--json", "plan", str(both))
    assert res.exit_code == 3, res.output + agent.daemon.log()
    assert [c["action"] for c in json.loads(res.output)["changes"]] == ["create", "create"]
    assert podman_cli("image", "exists", image).returncode == 0
    assert agent.services() == []
    # each plan pulled twice: the container's through the API (the login in a header),
    # the VM's through the CLI (the login in a memfd, the CA as --cert-dir)
    log = agent.daemon.log()
    assert log.count(f'podman: pull {image} (login from registries."{host}".auth_file)') == 2
    certs = agent.daemon.state / "registries" / "home" / ".config/containers/certs.d" / host
    assert log.count(f"run: podman pull --cert-dir {certs} --authfile /proc/self/fd/") == 2
    assert reg.password not in log and "wrong" not in log
