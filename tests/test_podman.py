"""Podman runtime: pure builders (unit) and the real thing against podman (integration)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from podman.domain.containers_create import CreateMixin
from podman_env import (
    PodmanCleanup,
    external_states,
    free_port,
    make_storage_gone,
    make_storage_only,
    podman_cli,
    wait_http,
)

from mcp_node.config import AgentConfig, from_dict
from mcp_node.errors import (
    ConflictError,
    ImageError,
    NotFoundError,
    RuntimeUnavailable,
    ValidationError,
    WorkloadError,
)
from mcp_node.podman import PodmanRuntime, PodmanService
from mcp_node.podman_service import service_argv, service_env, socket_path, socket_url
from mcp_node.podmanargs import (
    create_kwargs,
    env_dict,
    owner_filters,
    parse_time,
    volume_binds,
    workload_from_inspect,
    workload_from_list,
)
from mcp_node.runtime import Runtime, WorkloadSpec, load_runtime
from mcp_node.states import RUNNING, STOPPED

# --------------------------------------------------------------------------- unit


def _spec(**kw: object) -> WorkloadSpec:
    base: dict[str, object] = {"service": "svc", "component": "web", "image": "localhost/x:v1"}
    base.update(kw)
    return WorkloadSpec(**base)  # type: ignore[arg-type]


def test_create_kwargs_full() -> None:
    spec = _spec(cmd=("serve", "--x"), env=("PORT=12345", "A=b=c"), ports=(12345, 12346),
                 volumes=("/srv/a:/data", "/srv/b:/ro:ro,z"), restart="unless-stopped",
                 memory_mb=64, stop_timeout_s=7.0)
    kw = create_kwargs(spec, "node-1")
    assert kw["name"] == "mcp-svc-web"
    assert kw["image"] == "localhost/x:v1"
    assert kw["labels"] == {"mcp.managed": "true", "mcp.service": "svc",
                            "mcp.component": "web", "mcp.owner": "node-1",
                            "mcp.spec": spec.digest}
    assert kw["ports"] == {"12345/tcp": ("127.0.0.1", 12345), "12346/tcp": ("127.0.0.1", 12346)}
    assert kw["environment"] == {"PORT": "12345", "A": "b=c"}
    assert kw["command"] == ["serve", "--x"]
    assert kw["volumes"] == {"/srv/a": {"bind": "/data", "extended_mode": []},
                             "/srv/b": {"bind": "/ro", "extended_mode": ["ro", "z"]}}
    assert "restart_policy" not in kw   # the agent restarts, with backoff
    assert kw["mem_limit"] == "64m"
    assert kw["stop_timeout"] == 7


def test_create_kwargs_minimal_leaves_image_defaults() -> None:
    kw = create_kwargs(_spec(), "o")
    for key in ("command", "volumes", "restart_policy", "mem_limit"):
        assert key not in kw
    assert kw["ports"] == {}
    assert kw["environment"] == {}


def test_podman_py_renders_loopback_port_mappings() -> None:
    """What podman-py actually sends for our kwargs: host_ip 127.0.0.1, p -> p."""
    kw = create_kwargs(_spec(ports=(20001,), volumes=("/srv/a:/data:ro",),
                             restart="always"), "o")
    payload = CreateMixin._render_payload(kw)
    assert payload["portmappings"] == [{"container_port": 20001, "protocol": "tcp",
                                        "host_ip": "127.0.0.1", "host_port": 20001}]
    assert payload["mounts"] == [{"destination": "/data", "options": ["ro"],
                                  "source": "/srv/a", "type": "bind"}]
    assert "restart_policy" not in payload
    assert payload["labels"]["mcp.owner"] == "o"


def test_spec_label_follows_what_the_container_is_made_of() -> None:
    base = create_kwargs(_spec(ports=(5,), env=("A=1",)), "o")["labels"]["mcp.spec"]
    assert create_kwargs(_spec(ports=(5,), env=("A=1",), restart="no"),
                         "o")["labels"]["mcp.spec"] == base   # the agent's, not podman's
    for changed in ({"ports": (6,)}, {"env": ("A=2",)}, {"image": "localhost/x:v2"}):
        kw = {"ports": (5,), "env": ("A=1",), **changed}
        assert create_kwargs(_spec(**kw), "o")["labels"]["mcp.spec"] != base, changed


def test_workload_names_we_may_clear() -> None:
    from mcp_node.podmanargs import is_workload_name
    assert is_workload_name("mcp-svc-web") and is_workload_name("mcp-a-b-c2")
    for name in ("mcp-svc", "other-svc-web", "mcp--web", "mcp-Svc-web", "mcp-s-w/x", ""):
        assert not is_workload_name(name), name


def test_env_and_volume_errors_name_the_field() -> None:
    """The runtime reads env and volumes with servicedef's grammar: same rules, same errors."""
    with pytest.raises(ValidationError, match=r"^env\[1\]: 'NOEQUALS' is not KEY=VALUE$"):
        env_dict(("A=1", "NOEQUALS"))
    with pytest.raises(ValidationError, match=r"^volumes\[0\]: 'relative:/x' is not"):
        volume_binds(("relative:/x",))
    with pytest.raises(ValidationError, match=r"^volumes\[0\]: "):
        volume_binds(("/a:/b:ro:extra",))
    with pytest.raises(ValidationError, match=r"unsupported volume option\(s\) 'exec'"):
        volume_binds(("/a:/b:exec",))
    assert env_dict(("A=1", "A=2", "B=")) == {"A": "2", "B": ""}


def test_built_from_the_runtime_table_without_touching_podman(tmp_path: Path) -> None:
    """Connecting is lazy: a node without podman still builds it (and reports why later)."""
    cls = load_runtime(PodmanRuntime.name)
    assert cls is PodmanRuntime and issubclass(cls, Runtime)
    rt = cls(from_dict({}), tmp_path, "node-1")
    assert rt.graceful_stop
    rt.check_capacity(_spec(memory_mb=1 << 30), False)   # no limit of its own: no error
    assert rt.info() == {"socket": rt.service.url, "service_pid": None, "api_calls": 0,
                         "listings": 0}
    rt.close()
    assert not (tmp_path / "podman").exists()


def test_socket_url_forms() -> None:
    assert socket_url("/run/podman/podman.sock") == "unix:///run/podman/podman.sock"
    assert socket_url("unix:/run/p.sock") == "unix:///run/p.sock"
    assert socket_url("unix:///run/p.sock") == "unix:///run/p.sock"
    assert socket_url("tcp://127.0.0.1:8888") == "tcp://127.0.0.1:8888"
    assert socket_path("unix:///run/p.sock") == "/run/p.sock"
    assert socket_path("tcp://127.0.0.1:8888") is None


def test_service_argv_and_env() -> None:
    assert service_argv("podman", "unix:///s/p.sock") == [
        "podman", "system", "service", "--time=0", "unix:///s/p.sock"]
    assert service_env({"CONTAINERS_CONF": "/inherited", "X": "1"}, "/configured") == {
        "CONTAINERS_CONF": "/configured", "X": "1"}
    assert service_env({"CONTAINERS_CONF": "/inherited"}, "")["CONTAINERS_CONF"] == "/inherited"


def test_service_socket_path_fits_sun_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "podman"
    service = PodmanService(deep)
    assert len(str(service.socket)) <= 100
    assert service.url == f"unix://{service.socket}"
    assert PodmanService(deep).socket == service.socket   # stable across agent restarts
    short = PodmanService(tmp_path / "podman")
    assert short.socket == tmp_path / "podman" / "podman.sock"


def test_owner_filters() -> None:
    assert json.loads(owner_filters("n1")) == {"label": ["mcp.owner=n1"]}


def test_parse_time() -> None:
    assert parse_time(1795869503) == 1795869503.0
    assert parse_time(0) is None
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("") is None
    assert parse_time("2026-11-28T12:38:23.687379698Z") == pytest.approx(1795869503.687379)
    assert parse_time("2026-11-28T12:38:23Z") == 1795869503.0
    assert parse_time("garbage") is None


def test_workload_from_list_and_inspect() -> None:
    labels = {"mcp.managed": "true", "mcp.service": "s", "mcp.component": "c",
              "mcp.owner": "o"}
    entry = {"Id": "abc", "Image": "localhost/x:v1", "Labels": labels, "Names": ["mcp-s-c"],
             "State": "running", "StartedAt": 1795869503, "ExitCode": 0,
             "Ports": [{"host_ip": "127.0.0.1", "container_port": 5, "host_port": 5}]}
    w = workload_from_list(entry)
    assert w is not None
    assert (w.service, w.component, w.runtime, w.state, w.id) == ("s", "c", "container",
                                                                   RUNNING, "abc")
    assert w.started_at == 1795869503.0 and w.extra["host_ports"] == [5]
    assert w.exit_code is None and w.spec_digest == ""
    exited = workload_from_list({**entry, "State": "exited", "Restarts": 2, "ExitCode": 1,
                                 "Labels": {**labels, "mcp.spec": "d1"}})
    assert exited is not None and exited.state == STOPPED and exited.restart_count == 2
    assert exited.exit_code == 1 and exited.spec_digest == "d1"
    assert workload_from_list({**entry, "Labels": {"mcp.owner": "o"}}) is None
    attrs = {"Id": "abc", "ImageName": "localhost/x:v1", "Name": "mcp-s-c",
             "Config": {"Labels": labels}, "RestartCount": 3,
             "State": {"Status": "created", "StartedAt": "0001-01-01T00:00:00Z"},
             "HostConfig": {"PortBindings": {"5/tcp": [{"HostIp": "127.0.0.1",
                                                        "HostPort": "5"}]}}}
    wi = workload_from_inspect(attrs)
    assert wi is not None and wi.state == STOPPED and wi.started_at is None
    assert wi.restart_count == 3 and wi.image == "localhost/x:v1" and wi.extra["host_ports"] == [5]
    assert wi.exit_code is None   # created, never ran: no exit code
    we = workload_from_inspect({**attrs, "Config": {"Labels": {**labels, "mcp.spec": "d2"}},
                                "State": {"Status": "exited", "ExitCode": 137}})
    assert we is not None and we.exit_code == 137 and we.spec_digest == "d2"


def test_construct_never_connects_and_reports_missing_podman(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = from_dict({"podman": {"socket": f"unix://{tmp_path}/none.sock"}})
    runtime = PodmanRuntime(cfg, tmp_path / "state", "o")   # must not raise
    ok, reason = runtime.available()
    assert not ok and "podman" in reason
    with pytest.raises(RuntimeUnavailable, match="podman"):
        runtime.list()
    assert runtime.api_calls == 0
    assert not (tmp_path / "state").exists()
    runtime.close()


# --------------------------------------------------------------------------- integration


def _name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _hello(image: str, port: int, message: str = "x", **kw: object) -> WorkloadSpec:
    env = (f"PORT={port}", f"MESSAGE={message}", *kw.pop("env", ()))  # type: ignore[misc]
    return WorkloadSpec(service=_name(), component="web", image=image, ports=(port,),
                        env=env, stop_timeout_s=5, **kw)  # type: ignore[arg-type]


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return False
    except ConnectionRefusedError:
        return True


def _port_bindings(name: str) -> dict[str, list[dict[str, str]]]:
    out = podman_cli("inspect", "--format", "json", name, check=True).stdout
    bindings: dict[str, list[dict[str, str]]] = json.loads(out)[0]["HostConfig"]["PortBindings"]
    return bindings


def test_run_serves_http_on_loopback_only(podman_runtime: PodmanRuntime,
                                          hello_image: str) -> None:
    port = free_port()
    spec = _hello(hello_image, port, "loopback")
    podman_runtime.pull(spec)
    w = podman_runtime.run(spec)
    assert w.state == RUNNING and w.image == hello_image and w.id
    assert w.extra["labels"]["mcp.owner"] == podman_runtime.owner
    assert wait_http(port) == "hello from loopback\n"
    assert _port_bindings(spec.name) == {f"{port}/tcp": [{"HostIp": "127.0.0.1",
                                                          "HostPort": str(port)}]}
    # 127.0.0.2 is loopback too, but not the bound address: a 0.0.0.0 bind would accept.
    assert _refused("127.0.0.2", port)


def test_list_is_one_call_whatever_the_count(podman_runtime: PodmanRuntime,
                                             hello_image: str) -> None:
    assert podman_runtime.list() == []
    specs = [_hello(hello_image, free_port(), f"n{i}") for i in range(3)]
    calls = []
    for spec in specs:
        podman_runtime.run(spec)
        before = podman_runtime.api_calls
        listed = podman_runtime.list()
        calls.append(podman_runtime.api_calls - before)
        assert {w.service for w in listed} == {s.service for s in specs[:len(calls)]}
    assert calls == [1, 1, 1]
    before, info = podman_runtime.api_calls, podman_runtime.info()
    assert podman_runtime.available() == (True, "")   # podman just answered: no ping
    assert podman_runtime.api_calls == before == info["api_calls"]
    assert info["listings"] == 4 and info["socket"] == podman_runtime.url
    by_service = {w.service: w for w in podman_runtime.list()}
    for spec in specs:
        w = by_service[spec.service]
        assert w.component == "web" and w.state == RUNNING and w.runtime == "container"
        assert w.extra["labels"] == {"mcp.managed": "true", "mcp.service": spec.service,
                                     "mcp.component": "web", "mcp.owner": podman_runtime.owner,
                                     "mcp.spec": spec.digest}
        assert w.spec_digest == spec.digest and w.exit_code is None
        assert w.extra["host_ports"] == list(spec.ports)
        assert w.started_at is not None and w.started_at <= time.time() + 5


def test_stop_closes_port_then_remove_leaves_nothing(podman_runtime: PodmanRuntime,
                                                     hello_image: str) -> None:
    port = free_port()
    spec = _hello(hello_image, port)
    podman_runtime.run(spec)
    wait_http(port)
    podman_runtime.stop(spec.service, spec.component, timeout=5)
    assert _refused("127.0.0.1", port)
    w = podman_runtime.inspect(spec.service, spec.component)
    assert w is not None and w.state == STOPPED and w.extra["exit_code"] == 0
    assert [x.state for x in podman_runtime.list()] == [STOPPED]
    podman_runtime.stop(spec.service, spec.component)          # already stopped: fine
    assert podman_runtime.start(spec.service, spec.component) is True
    wait_http(port)
    podman_runtime.remove(spec.service, spec.component)
    assert podman_runtime.inspect(spec.service, spec.component) is None
    assert podman_runtime.list() == []
    assert podman_cli("container", "exists", spec.name).returncode == 1
    podman_runtime.remove(spec.service, spec.component)        # missing: fine
    podman_runtime.stop(spec.service, spec.component)
    assert podman_runtime.start(spec.service, spec.component) is False


def test_run_replaces_existing_container(podman_runtime: PodmanRuntime, hello_image: str,
                                         hello_image_v2: str) -> None:
    port = free_port()
    spec = _hello(hello_image, port, "one")
    first = podman_runtime.run(spec)
    wait_http(port)
    spec2 = WorkloadSpec(service=spec.service, component="web", image=hello_image_v2,
                         ports=(port,), env=(f"PORT={port}", "MESSAGE=two"))
    second = podman_runtime.run(spec2)
    assert second.id != first.id and second.image == hello_image_v2
    assert wait_http(port) == "hello from two\n"
    listed = podman_runtime.list()
    assert [(w.id, w.image) for w in listed] == [(second.id, hello_image_v2)]


def test_failed_start_leaves_no_container(podman_runtime: PodmanRuntime,
                                          hello_image: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = _hello(hello_image, port)
        with pytest.raises(WorkloadError) as err:
            podman_runtime.run(spec)
    assert spec.name in str(err.value)
    assert err.value.__cause__ is not None or "address" in str(err.value)
    assert podman_cli("container", "exists", spec.name).returncode == 1
    assert podman_runtime.list() == []


def test_logs_show_request_lines_and_follow_ends_on_stop(podman_runtime: PodmanRuntime,
                                                         hello_image: str) -> None:
    port = free_port()
    spec = _hello(hello_image, port)
    podman_runtime.run(spec)
    wait_http(port, "/first-request")
    wait_http(port, "/second-request")
    text = b"".join(podman_runtime.logs(spec.service, spec.component))
    assert b"GET /first-request" in text and b"GET /second-request" in text
    last = b"".join(podman_runtime.logs(spec.service, spec.component, tail=1))
    assert b"/second-request" in last and b"/first-request" not in last

    # A line written right after logs() returns is in the stream (no lost start).
    follow = podman_runtime.logs(spec.service, spec.component, tail=0, follow=True)
    wait_http(port, "/right-after-open")
    got: list[bytes] = [next(follow)]
    assert b"/right-after-open" in got[0]
    reader = threading.Thread(target=lambda: got.extend(follow), daemon=True)
    reader.start()
    wait_http(port, "/while-following")
    podman_runtime.stop(spec.service, spec.component, timeout=5)
    reader.join(timeout=60)            # deadline; the stream must end when the container does
    assert not reader.is_alive()
    joined = b"".join(got)
    assert b"/while-following" in joined and b"SIGTERM" in joined
    assert b"/first-request" not in joined


def test_follow_stream_closed_from_another_thread(podman_runtime: PodmanRuntime,
                                                  hello_image: str) -> None:
    """A consumer that goes away (HTTP client hung up) can end a blocked follow read."""
    port = free_port()
    spec = _hello(hello_image, port)
    podman_runtime.run(spec)
    wait_http(port, "/one")
    follow = podman_runtime.logs(spec.service, spec.component, tail=1, follow=True)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(follow), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while not got:                     # the tail line arrived: the reader now blocks in read
        assert time.monotonic() < deadline
        time.sleep(0.05)
    follow.close()  # type: ignore[attr-defined]
    reader.join(timeout=30)
    assert not reader.is_alive() and b"/one" in got[0]
    [w] = podman_runtime.list()
    assert w.state == RUNNING          # only the stream ended, not the container


def test_logs_of_missing_container(podman_runtime: PodmanRuntime) -> None:
    with pytest.raises(NotFoundError):
        podman_runtime.logs(_name(), "web")


def test_pull_present_image_is_one_call_and_missing_image_is_image_error(
        podman_runtime: PodmanRuntime, hello_image: str) -> None:
    before = podman_runtime.api_calls
    podman_runtime.pull(_hello(hello_image, 1))
    assert podman_runtime.api_calls - before == 1
    missing = f"localhost/mcp-missing-{uuid.uuid4().hex[:8]}:v1"
    with pytest.raises(ImageError, match=missing):
        podman_runtime.pull(WorkloadSpec(service="s", component="c", image=missing))
    with pytest.raises(ImageError, match=missing):
        podman_runtime.run(WorkloadSpec(service=_name(), component="c", image=missing))


def test_owners_do_not_see_or_touch_each_other(podman_runtime: PodmanRuntime,
                                               podman_config: AgentConfig,
                                               podman_cleanup: PodmanCleanup,
                                               hello_image: str) -> None:
    port = free_port()
    spec = _hello(hello_image, port)
    podman_runtime.run(spec)
    other = PodmanRuntime(podman_config, podman_config.state_dir,
                          podman_cleanup.add(f"other-{uuid.uuid4().hex[:8]}"))
    try:
        assert other.list() == []
        assert other.inspect(spec.service, spec.component) is None
        with pytest.raises(ConflictError, match=spec.name):
            other.stop(spec.service, spec.component)
        with pytest.raises(ConflictError, match=spec.name):
            other.remove(spec.service, spec.component)
        with pytest.raises(ConflictError, match=spec.name):
            other.run(spec)
    finally:
        other.close()
    [w] = podman_runtime.list()
    assert w.state == RUNNING
    assert wait_http(port) == "hello from x\n"


def test_env_cmd_volume_and_no_podman_restart(podman_runtime: PodmanRuntime,
                                              hello_image: str, tmp_path: Path) -> None:
    """A crashing container stays exited with its exit code: podman does not restart
    it behind the agent's back (the agent's reconciler does, with backoff)."""
    data = tmp_path / "vol"
    data.mkdir()
    port = free_port()
    spec = _hello(hello_image, port, env=("EXIT_AFTER=1",), volumes=(f"{data}:/data:ro",),
                  restart="always", cmd=("ignored-arg",))
    podman_runtime.run(spec)
    info = json.loads(podman_cli("inspect", "--format", "json", spec.name, check=True).stdout)[0]
    assert info["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")
    assert info["Config"]["Labels"]["mcp.spec"] == spec.digest
    assert any(m["Source"] == str(data) and m["Destination"] == "/data" and not m["RW"]
               for m in info["Mounts"])
    assert "EXIT_AFTER=1" in info["Config"]["Env"]
    assert info["Config"]["Cmd"] == ["ignored-arg"]
    deadline = time.monotonic() + 30
    while True:
        w = podman_runtime.inspect(spec.service, spec.component)
        if w is not None and w.state == STOPPED:
            break
        assert time.monotonic() < deadline, f"did not exit: {w}"
        time.sleep(0.1)
    assert w.exit_code == 1 and w.spec_digest == spec.digest
    time.sleep(1.5)   # long enough for podman's own restart, had it one
    [listed] = podman_runtime.list()
    assert listed.state == STOPPED and listed.restart_count == 0
    assert listed.exit_code == 1 and listed.spec_digest == spec.digest


def test_name_held_by_storage_only_container_is_cleared(
        podman_runtime: PodmanRuntime, hello_image: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """`podman create` killed half-way leaves a container only storage knows, holding
    the name: run() clears it by name through the CLI and goes on."""
    spec = _hello(hello_image, free_port())
    seed = make_storage_only(spec.name, hello_image)
    print(f"storage-only container made (seed {seed})")
    assert podman_runtime.inspect(spec.service, spec.component) is None
    with caplog.at_level("WARNING", logger="mcp_node.podman"):
        podman_runtime.run(spec)
    assert f"rm --force --storage {spec.name}" in caplog.text
    assert wait_http(spec.ports[0]) == "hello from x\n"
    assert external_states(spec.name) == ["running"]
    podman_runtime.remove(spec.service, spec.component)
    assert external_states(spec.name) == []


def test_created_container_with_storage_gone_is_cleared(
        podman_runtime: PodmanRuntime, podman_owner: str, hello_image: str) -> None:
    """`podman rm -f` racing a create leaves a `Created` container whose storage is gone
    (inspect and start fail): inspect, remove and run get past it."""
    spec = _hello(hello_image, free_port())
    labels = {"mcp.managed": "true", "mcp.service": spec.service,
              "mcp.component": spec.component, "mcp.owner": podman_owner}
    seed = make_storage_gone(spec.name, hello_image, labels)
    print(f"created container without storage made (seed {seed})")
    [listed] = podman_runtime.list()   # the listing still shows it, as ours
    assert listed.component == spec.component and listed.state == STOPPED
    assert podman_runtime.inspect(spec.service, spec.component) is None   # cleared
    assert external_states(spec.name) == []
    seed = make_storage_gone(spec.name, hello_image, labels)
    print(f"and again (seed {seed}), now cleared by run()")
    podman_runtime.run(spec)
    assert wait_http(spec.ports[0]) == "hello from x\n"
    seed = make_storage_gone(f"{spec.name}x", hello_image, {**labels, "mcp.component":
                                                            f"{spec.component}x"})
    print(f"and once more (seed {seed}), cleared by remove()")
    podman_runtime.remove(spec.service, f"{spec.component}x")
    assert external_states(f"{spec.name}x") == []


def test_storage_gone_container_of_another_owner_is_left_alone(
        podman_runtime: PodmanRuntime, podman_cleanup: PodmanCleanup,
        hello_image: str) -> None:
    spec = _hello(hello_image, free_port())
    other = podman_cleanup.add(f"other-{uuid.uuid4().hex[:8]}")
    labels = {"mcp.managed": "true", "mcp.service": spec.service,
              "mcp.component": spec.component, "mcp.owner": other}
    seed = make_storage_gone(spec.name, hello_image, labels)
    print(f"foreign created container without storage made (seed {seed})")
    with pytest.raises(WorkloadError, match="inspect"):
        podman_runtime.inspect(spec.service, spec.component)
    assert external_states(spec.name) == ["created"]   # not ours: not touched
    podman_cli("rm", "-f", spec.name)


def test_agent_started_service_reused_and_stopped_by_pid(
        tmp_path: Path, podman_cleanup: PodmanCleanup, hello_image: str) -> None:
    """No socket configured (or one that does not answer): the runtime runs its own."""
    state = tmp_path / "st"
    conf = os.environ["CONTAINERS_CONF"]
    cfg = from_dict({"podman": {"socket": f"unix://{tmp_path}/absent.sock",
                                "containers_conf": conf}})
    owner = podman_cleanup.add(f"svc-{uuid.uuid4().hex[:8]}")
    first = PodmanRuntime(cfg, state, owner)
    assert first.service.pid is None           # lazy: nothing started yet
    assert first.health_reasons() == []        # not connected yet: nothing to say
    assert first.available() == (True, "")
    pid = first.service.pid
    assert pid is not None and Path(f"/proc/{pid}").exists()
    assert first.url == f"unix://{state}/podman/podman.sock"
    assert (state / "podman" / "podman.sock").is_socket()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"CONTAINERS_CONF={conf}".encode() in environ
    port = free_port()
    spec = _hello(hello_image, port)
    first.run(spec)
    wait_http(port)

    # The configured socket did not answer: the fallback is a health reason.
    [reason] = first.health_reasons()
    assert "absent.sock does not answer" in reason and first.url in reason

    # An agent restart (here: a second runtime on the same state dir) reuses and adopts it.
    second = PodmanRuntime(from_dict({}), state, owner)
    try:
        assert [w.service for w in second.list()] == [spec.service]
        assert second.service.pid == pid
        assert second.health_reasons() == []   # no socket configured: no fallback
    finally:
        first.service.pid = None   # hand ownership to `second` alone
        first.close()
        assert Path(f"/proc/{pid}").exists()
        second.close()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and b"Z" not in _proc_state(pid):
        assert time.monotonic() < deadline, "podman service still running after close()"
        time.sleep(0.05)
    # Stopping the service does not stop the containers it started.
    assert wait_http(port) == "hello from x\n"


def test_own_service_restarted_after_it_died(tmp_path: Path, podman_binary: None) -> None:
    runtime = PodmanRuntime(from_dict({}), tmp_path / "st", f"dead-{uuid.uuid4().hex[:8]}")
    try:
        assert runtime.list() == []
        pid = runtime.service.pid
        assert pid is not None
        os.kill(pid, 9)                 # the service we started, by its pid
        with pytest.raises(WorkloadError, match="list containers"):
            runtime.list()              # the failure is reported, the dead client dropped
        assert runtime.list() == []     # and the next call starts a new service
        assert runtime.service.pid not in (None, pid)
    finally:
        runtime.close()


def _proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1][:3]
    except OSError:
        return b"Z"


def test_service_start_failure_is_runtime_unavailable(tmp_path: Path,
                                                      podman_binary: None) -> None:
    """A podman that cannot serve: clear error, nothing left running."""
    service = PodmanService(tmp_path / "p")
    service.url = "unix:///proc/forbidden/podman.sock"   # podman cannot create it
    with pytest.raises(RuntimeUnavailable, match="podman system service"):
        service.ensure(timeout=20)
    assert service.pid is None



@pytest.mark.parametrize(("state", "raises"), [("exited", False), ("running", True)])
def test_stop_judges_a_lagging_exit_file_by_the_state(tmp_path: Path, state: str,
                                                      raises: bool) -> None:
    """podman may answer 500 'timed out waiting for file .../exits/...' although the
    container ended (seen under load in CI): stopped is stopped, running is an error."""
    rt = PodmanRuntime(from_dict({}), tmp_path / "st", "o")

    class Resp:
        status_code = 500
        text = '{"cause": "x", "message": "timed out waiting for file /run/libpod/exits/ab"}'

        def json(self) -> dict[str, str]:
            return {"message": "timed out waiting for file /run/libpod/exits/ab"}

    rt._request = lambda *a, **k: Resp()  # type: ignore[method-assign]
    rt._inspect_raw = lambda name: {"State": {"Status": state}}  # type: ignore[method-assign]
    if raises:
        with pytest.raises(WorkloadError, match="timed out waiting for file"):
            rt._stop("mcp-s-web", 1)
    else:
        rt._stop("mcp-s-web", 1)
