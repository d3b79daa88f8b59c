"""Volumes (issue 16): host paths resolved and checked at every create, start and boot,
not only at deploy; and every volume mistake a 400 naming the field.

The escape: a component with ``<root>/app:/app`` and ``<root>/app/conf:/conf`` replaced
``/app/conf`` by a symlink to a directory outside the roots and exited; the agent
restarted it a second later and podman mounted the outside directory on ``/conf``
(the container wrote a file there) while health said healthy. Here that container
runs on real podman under a reconciling agent, which must refuse the restart, hold
the component down with one event and a health reason naming the path, and start it
again once the path is back inside the roots.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from podman_env import podman_cli
from server_env import LiveServer

from mcp_node.agent import Agent
from mcp_node.config import AgentConfig, MonitorConfig
from mcp_node.errors import HostPathError, ValidationError
from mcp_node.grammar import parse_volumes, resolve_volumes
from mcp_node.reconcile import Backoff, Policy, plan
from mcp_node.servicedef import check_volume_roots, from_dict

WAIT_S = 90.0


def defn(volumes: list[str], name: str = "v", **extra: Any) -> Any:
    return from_dict({"name": name, "components": [
        {"name": "c", "image": "localhost/x:v1", "volumes": volumes, **extra}]})


# -- the grammar: what podman and qemu would refuse later, refused first (400) --------------

@pytest.mark.parametrize(("volumes", "index", "words"), [
    (["/srv/a:/"], 0, "guest's /"),
    (["/srv/a://"], 0, "guest's /"),
    (["/srv/a:/proc"], 0, "/proc is the kernel's"),
    (["/srv/a:/proc/x"], 0, "/proc is the kernel's"),
    (["/srv/a://proc/"], 0, "/proc is the kernel's"),
    (["/srv/a:/dev"], 0, "/dev is the kernel's"),
    (["/srv/a:/dev/shm"], 0, "/dev is the kernel's"),
    (["/srv/a:/sys"], 0, "/sys is the kernel's"),
    (["/srv/a:/x:z,Z"], 0, "at most one of z or Z"),
    (["/srv/a:/x:Z,ro,z"], 0, "at most one of z or Z"),
    (["/srv/a:/x:ro,ro"], 0, "at most one of ro or rw"),
    (["/srv/a\nb:/x"], 0, "control character (U+000A)"),
    (["/srv/a:/x\ny"], 0, "control character (U+000A)"),
    (["/srv/a:/x\ty"], 0, "control character (U+0009)"),
    (["/srv/a\x7f:/x"], 0, "control character (U+007F)"),
    (["/srv/a:/x", "/srv/b://x"], 1, "guest path '/x' is also in"),
    (["/srv/a:/x", "/srv/b:/x/"], 1, "guest path '/x' is also in"),
    (["/srv/a:/x", "/srv/b:/./x"], 1, "guest path '/x' is also in"),
    (["/srv/a:/x", "//srv/a:/y"], 1, "host path '/srv/a' is also in"),
])
def test_volume_mistakes_are_validation_errors_naming_the_field(
        volumes: list[str], index: int, words: str) -> None:
    """Each of these went on to podman: a 502 at create or start, or (``/sys``, a newline
    in a guest path) a container started with it."""
    with pytest.raises(ValidationError) as err:
        defn(volumes)
    assert err.value.field == f"components[0].volumes[{index}]"
    assert words in str(err.value)


def test_good_volumes_are_read_canonically() -> None:
    vols = parse_volumes(["/srv/a/:/data/", "//srv/b:/x/./y:ro,z", "/srv/c:/devices"])
    assert [(v.host, v.guest, v.options) for v in vols] == [
        ("/srv/a", "/data", ()), ("/srv/b", "/x/y", ("ro", "z")), ("/srv/c", "/devices", ())]


def test_host_paths_that_cannot_be_used_are_errors_naming_the_field(tmp_path: Path) -> None:
    """``/proc/1/root`` made realpath raise PermissionError (a 500); a missing host path
    was podman's statfs error (a 502); one directory twice through a symlink passed."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "link").symlink_to(root / "a")
    (root / "loop").symlink_to(root / "loop")
    roots = [str(root)]
    cases = [
        (["/proc/1/root:/x"], 0, ""),
        ([f"{root}/a:/a", f"{root}/missing:/m"], 1, "does not exist"),
        ([f"{root}/loop:/l"], 0, "cannot be resolved"),
        ([f"{root}/a:/a", f"{root}/link:/b"], 1, "is the directory of components[0].volumes[0]"),
    ]
    for volumes, index, words in cases:
        with pytest.raises(HostPathError) as err:
            check_volume_roots(defn(volumes), roots)
        assert err.value.field == f"components[0].volumes[{index}]", volumes
        assert words in str(err.value)
    check_volume_roots(defn([f"{root}/link:/b"]), roots)


def test_resolve_volumes_gives_the_resolved_paths(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    vols = resolve_volumes(parse_volumes([f"{tmp_path}/link:/d:ro"]), [str(tmp_path)])
    assert [(v.host, v.guest, v.options) for v in vols] == [
        (str(tmp_path / "real"), "/d", ("ro",))]


def test_plan_holds_a_blocked_component_and_starts_nothing() -> None:
    """A held component is neither started nor counted as a restart-policy hold."""
    from mcp_node.records import ComponentRecord, ServiceRecord

    d = defn(["/srv/a:/a"])
    rec = ServiceRecord(name="v", active=True, components=[ComponentRecord(d.components[0])])
    why = "volumes[0]: host path /srv/a (resolves to /etc) is outside the volume roots"
    out = plan([rec], {}, [], lambda r, c: "x", {("v", "c"): Backoff()}, 0.0, Policy(),
               blocked={("v", "c"): why})
    assert out.actions == [] and out.held == {} and out.escaped == {("v", "c"): why}
    out = plan([rec], {}, [], lambda r, c: "x", {("v", "c"): Backoff()}, 0.0, Policy())
    assert [a.kind for a in out.actions] == ["run"]


# -- the HTTP API: each mistake a 400 naming the field, nothing changed ----------------------

def test_volume_mistakes_are_400_over_http(live_server: LiveServer, tmp_path: Path) -> None:
    root = live_server.agent.state_dir / "volumes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "link").symlink_to(root / "a")
    cases = [
        ["/proc/1/root:/x"], [f"{root}/missing:/x"], [f"{root}/a\n:/x"], [f"{root}/a:/x\n"],
        [f"{root}/a:/"], [f"{root}/a:/proc"], [f"{root}/a:/dev"], [f"{root}/a:/sys"],
        [f"{root}/a:/x:z,Z"], [f"{root}/a:/x", f"{root}/b://x"],
        [f"{root}/a:/x", f"{root}/link:/y"], ["/etc:/x"],
    ]
    for volumes in cases:
        body = json.dumps({"name": "vol", "components": [
            {"name": "c", "image": "localhost/mcp-hello:v1", "volumes": volumes}]}).encode()
        r = live_server.request("POST", "/v1/services", body)
        assert r.status == 400, (volumes, r.status, r.body)
        err = r.json()["error"]
        assert err["code"] == "invalid", volumes
        assert err["message"].startswith(f"components[0].volumes[{len(volumes) - 1}]: "), err
    assert live_server.agent.ps() == []
    assert podman_cli("ps", "-a", "-q", "--filter",
                      f"label=mcp.owner={live_server.agent.owner}").stdout.split() == []


# -- real podman: the symlink escape on restart -------------------------------------------

SWAP_ONCE = """
trap 'exit 0' TERM
if [ -e /app/swapped ]; then
  echo seen > /conf/seen
  /bin/busybox sleep 600 & wait
  exit 0
fi
/bin/busybox touch /app/swapped
/bin/busybox rm -rf /app/conf
/bin/busybox ln -s {outside} /app/conf
exit 0
"""


class Rounds:
    """Counts the agent's monitor rounds (its on_round hook)."""

    def __init__(self) -> None:
        self.n = 0
        self.cond = threading.Condition()

    def __call__(self) -> None:
        with self.cond:
            self.n += 1
            self.cond.notify_all()

    def wait(self, more: int) -> None:
        with self.cond:
            target = self.n + more
            assert self.cond.wait_for(lambda: self.n >= target, WAIT_S), "monitor stalled"


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    r = tmp_path / "roots"
    r.mkdir()
    return r


@pytest.fixture
def watched(podman_config: AgentConfig, podman_cleanup: Any,
            roots: Path) -> Iterator[tuple[Agent, Rounds]]:
    cfg = replace(podman_config,
                  monitor=MonitorConfig(interval_s=0.2, flap_changes=50, flap_window_s=60),
                  podman=replace(podman_config.podman, volume_roots=(str(roots),)))
    counter = Rounds()
    agent = Agent(cfg, monitor=True, on_round=counter)
    podman_cleanup.add(agent.owner)
    try:
        yield agent, counter
    finally:
        agent.close()


def _state(name: str) -> tuple[str, str]:
    out = podman_cli("inspect", "--format", "{{.State.Status}} {{.State.StartedAt}}", name)
    status, _, started = out.stdout.strip().partition(" ")
    return status, started


def test_a_symlink_swapped_in_by_the_workload_is_not_followed_on_restart(
        watched: tuple[Agent, Rounds], busybox_image: str, roots: Path,
        tmp_path: Path) -> None:
    agent, rounds = watched
    app, outside = roots / "app", tmp_path / "outside"
    (app / "conf").mkdir(parents=True)
    outside.mkdir()
    svc = f"esc{uuid.uuid4().hex[:6]}"
    agent.deploy(from_dict({"name": svc, "components": [{
        "name": "c", "image": busybox_image,
        "cmd": ["sh", "-c", SWAP_ONCE.format(outside=outside)],
        "volumes": [f"{app}:/app", f"{app}/conf:/conf"]}]}))

    def held() -> list[str]:
        return [r for r in agent.health()["reasons"] if "host path fails" in r]

    def held_not_escaped() -> list[str]:
        assert not (outside / "seen").exists(), "restarted with the outside dir on /conf"
        return held()

    reasons = wait_for("the component to be held down", held_not_escaped)
    assert (app / "conf").is_symlink() and (app / "swapped").exists()   # it did swap
    assert not (outside / "seen").exists()       # and was never started on the outside
    assert len(reasons) == 1 and f"{svc}/c" in reasons[0] and f"{app}/conf" in reasons[0]
    assert str(outside) in reasons[0]
    assert agent.health()["status"] == "degraded"
    events = [e["detail"] for e in agent.events(svc, tail=1000)
              if "not started" in e["detail"]]
    assert len(events) == 1 and f"{app}/conf" in events[0], events
    status, started = _state(f"mcp-{svc}-c")
    assert status == "exited"

    # No restart loop: rounds go by, nothing is started, no further event.
    rounds.wait(8)
    assert _state(f"mcp-{svc}-c") == (status, started)
    assert not (outside / "seen").exists()
    assert len([e for e in agent.events(svc, tail=1000) if "not started" in e["detail"]]) == 1

    # A deploy of the same definition is refused too (the deploy-time check).
    with pytest.raises(HostPathError, match="resolves to"):
        agent.deploy(agent.registry.get_service(svc).definition())

    # The operator puts the directory back: the component starts again, on the inside.
    (app / "conf").unlink()
    (app / "conf").mkdir()
    wait_for("the component to run on the directory inside the roots",
             lambda: (app / "conf" / "seen").exists())
    wait_for("the health reason to clear", lambda: not held())
    assert not (outside / "seen").exists()


def test_podman_is_given_the_resolved_path_and_start_checks_it_again(
        watched: tuple[Agent, Rounds], busybox_image: str, roots: Path,
        tmp_path: Path) -> None:
    """Passing the definition's path let a later swap of any component of it redirect the
    mount; and podman resolves a bind source again at every start of a container."""
    agent, _ = watched
    (roots / "real").mkdir()
    (roots / "link").symlink_to(roots / "real")
    outside = tmp_path / "outside"
    outside.mkdir()
    svc = f"res{uuid.uuid4().hex[:6]}"
    agent.deploy(from_dict({"name": svc, "components": [{
        "name": "c", "image": busybox_image,
        "cmd": ["sh", "-c", "trap 'exit 0' TERM; echo hi > /data/hi; "
                            "/bin/busybox sleep 600 & wait"],
        "volumes": [f"{roots}/link:/data"]}]}))
    name = f"mcp-{svc}-c"
    mounts = json.loads(podman_cli("inspect", "--format", "{{json .Mounts}}", name).stdout)
    assert [m["Source"] for m in mounts if m["Type"] == "bind"] == [str(roots / "real")]
    wait_for("the container to write", lambda: (roots / "real" / "hi").exists())

    agent.stop(svc)
    (roots / "real" / "hi").unlink()
    (roots / "real").rename(roots / "moved")
    (roots / "real").symlink_to(outside)       # the container's bind source, swapped
    (roots / "link").unlink()
    (roots / "link").symlink_to(outside)       # and the definition's path escapes too
    with pytest.raises(HostPathError, match="outside the volume roots") as err:
        agent.start(svc)
    assert err.value.field == "volumes[0]" and f"{roots}/link" in str(err.value)
    assert _state(name)[0] == "exited"
    assert list(outside.iterdir()) == []


# -- real qemu: a VM boots only on host paths that pass, at run and at every start ---------

VM_SCRIPT = """
echo up >> /data/boots
while :; do /bin/busybox sleep 1; done
"""


def test_a_vm_boots_only_on_host_paths_that_pass(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, busybox_image: str,
        vm_reaper: Any) -> None:
    from qemu_env import need_qemu, qemu_config, qemu_pids_in, qemu_runtime

    from mcp_node.runtime import WorkloadSpec

    need_qemu()
    state, data = tmp_path / "state", tmp_path / "data"   # tmp_path is the volume root
    data.mkdir()
    outside = tmp_path_factory.mktemp("outside")
    (tmp_path / "escape").symlink_to(outside)
    rt = qemu_runtime(qemu_config(state))
    spec = WorkloadSpec(service=f"vm{uuid.uuid4().hex[:6]}", component="bb",
                        image=busybox_image, cmd=("sh", "-c", VM_SCRIPT),
                        volumes=(f"{tmp_path}/escape:/data",), memory_mb=160)
    vm_reaper.add(rt, spec.service, spec.component)
    with pytest.raises(HostPathError, match="outside the volume roots"):
        rt.run(spec)
    assert rt.inspect(spec.service, spec.component) is None and qemu_pids_in(state) == []

    rt.run(replace(spec, volumes=(f"{data}:/data",)))
    wait_for("the guest to write to its volume", lambda: (data / "boots").exists())
    rt.stop(spec.service, spec.component)
    data.rename(tmp_path / "moved")
    data.symlink_to(outside)                 # the VM's volume, swapped while it was down
    with pytest.raises(HostPathError, match="outside the volume roots"):
        rt.start(spec.service, spec.component)
    assert qemu_pids_in(state) == [] and list(outside.iterdir()) == []

    data.unlink()
    (tmp_path / "moved").rename(data)
    assert rt.start(spec.service, spec.component)
    wait_for("the guest to boot again on its volume",
             lambda: (data / "boots").read_text().count("up") == 2)
    assert list(outside.iterdir()) == []


def test_the_documents_volume_pattern_states_the_same_rules() -> None:
    """Every single-item mistake above that a pattern can state is refused by the
    OpenAPI document's pattern too, and the good forms pass it (the server is stricter
    only across items, on other spellings and on the node)."""
    import re

    from mcp_node import openapi_schemas

    pattern = openapi_schemas.VOLUME_PATTERN
    bad = ["/a:/", "/a://", "/a:/proc", "/a:/proc/x", "/a://proc/", "/a:/dev", "/a:/dev/shm",
           "/a:/sys", "/a:/x:z,Z", "/a:/x:Z,ro,z", "/a:/x:ro,ro", "/a:/x:rw,ro",
           "/a:/x:Z,Z", "/a\nb:/x", "/a:/x\ny", "/a:/x\ty", "/a\x7f:/x"]
    good = ["/srv/a:/a", "/a:/b:ro,z", "/a:/devices", "/a:/x/proc", "/a:/procx",
            "/a:/x:rw,Z", "/srv/a/:/data/"]
    for b in bad:
        assert not re.search(pattern, b), repr(b)
        with pytest.raises(ValidationError):
            parse_volumes([b])
    for g in good:
        assert re.search(pattern, g), g
        parse_volumes([g])


@pytest.mark.parametrize(("guest", "words"), [
    ("/mcp", "/mcp"), ("/mcp/bin", "/mcp"), ("/etc", "/etc/acpid.conf"),
    ("/etc/acpi", "/etc/acpi"), ("/usr", "/usr/local/bin/hello"),
    ("/usr/local/bin/hello", "/usr/local/bin/hello"),
])
def test_a_linux_vm_refuses_a_volume_over_its_own_files_or_the_program(
        guest: str, words: str) -> None:
    """A volume on /mcp hid the init's busybox and modules (the guest never ran its
    program), one on /etc the power button's handler (no clean stop), one over the
    program the program."""
    from mcp_node.config import QemuConfig
    from mcp_node.initramfs import InitramfsBuilder, check_guest_volumes

    vols = parse_volumes(["/srv/ok:/data", f"/srv/x:{guest}"])
    with pytest.raises(ValidationError, match=words) as err:
        InitramfsBuilder(QemuConfig(machine="q35")).check(vols)
        check_guest_volumes(vols, "/usr/local/bin/hello")
    assert err.value.field == "volumes[1]"
    check_guest_volumes(parse_volumes(["/srv/ok:/data", "/srv/x:/etc/app"]),
                        "/usr/local/bin/hello")


# -- the window between the check and the mount -----------------------------------------

def test_a_swap_between_the_check_and_the_mount_stops_the_container_at_once(
        podman_runtime: Any, busybox_image: str, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A workload that can write a volume's parent swaps the checked directory for a
    symlink after the create and before podman's start (runc follows it): the agent
    checks the sources again right after the start, stops and removes the container and
    refuses the run. Detected, not prevented: the container ran for that moment."""
    from mcp_node.runtime import WorkloadSpec

    data, outside = tmp_path / "data", tmp_path_factory.mktemp("outside")
    data.mkdir()
    spec = WorkloadSpec(service=f"win{uuid.uuid4().hex[:6]}", component="c",
                        image=busybox_image,
                        cmd=("sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 600 & wait"),
                        volumes=(f"{data}:/data",))
    real_create = podman_runtime._create

    def create_then_swap(spec: WorkloadSpec, payload: dict[str, Any]) -> None:
        real_create(spec, payload)
        data.rename(tmp_path / "moved")
        data.symlink_to(outside)

    podman_runtime._create = create_then_swap
    with pytest.raises(HostPathError, match="not the host directory checked") as err:
        podman_runtime.run(spec)
    assert "/data in mcp-" in str(err.value) and err.value.field == "volumes"
    assert podman_runtime.inspect(spec.service, spec.component) is None

    # An existing container: the same check after podman's start.
    podman_runtime._create = real_create
    data.unlink()
    (tmp_path / "moved").rename(data)
    podman_runtime.run(spec)
    podman_runtime.stop(spec.service, spec.component, 5)
    real_request = podman_runtime._request

    def swap_before_start(method: str, path: str, what: str, **kw: Any) -> Any:
        if path.endswith("/start") and not data.is_symlink():
            data.rename(tmp_path / "moved")
            data.symlink_to(outside)
        return real_request(method, path, what, **kw)

    podman_runtime._request = swap_before_start
    with pytest.raises(HostPathError, match="not the host directory checked"):
        podman_runtime.start(spec.service, spec.component)
    podman_runtime._request = real_request
    w = podman_runtime.inspect(spec.service, spec.component)
    assert w is not None and w.state == "stopped"


def test_a_swap_while_qemu_starts_kills_the_vm_at_once(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, busybox_image: str,
        vm_reaper: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same window for a VM: the volume's directory swapped after the boot-time check
    and before qemu opened it. qemu has opened its shares when it daemonises, so the
    paths are checked again then and the VM is killed."""
    from qemu_env import need_qemu, qemu_config, qemu_pids_in, qemu_runtime

    from mcp_node import vmlaunch as qemu
    from mcp_node.runtime import WorkloadSpec

    need_qemu()
    state, data = tmp_path / "state", tmp_path / "data"
    data.mkdir()
    outside = tmp_path_factory.mktemp("outside")
    rt = qemu_runtime(qemu_config(state))
    spec = WorkloadSpec(service=f"vw{uuid.uuid4().hex[:6]}", component="bb",
                        image=busybox_image, cmd=("sh", "-c", VM_SCRIPT),
                        volumes=(f"{data}:/data",), memory_mb=160)
    vm_reaper.add(rt, spec.service, spec.component)
    real_argv = qemu.qemu_argv

    def argv_then_swap(params: Any) -> list[str]:
        argv = real_argv(params)
        if not data.is_symlink():
            data.rename(tmp_path / "moved")
            data.symlink_to(outside)
        return argv

    monkeypatch.setattr(qemu, "qemu_argv", argv_then_swap)
    with pytest.raises(HostPathError, match="changed while"):
        rt.run(spec)
    assert qemu_pids_in(state) == []
    assert list(outside.iterdir()) == []
