"""Service definition validation: every rule of design §2, errors naming the field."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_node.errors import ValidationError, ValidationErrors
from mcp_node.servicedef import (
    check_hostname,
    check_name,
    from_dict,
    load_file,
    loads_toml,
    route_env,
)

GOOD = """
name    = "hello"
runtime = "container"

[[components]]
name      = "web"
image     = "localhost/hello:v1.0.0"
cmd       = ["serve"]
env       = ["KEY=VALUE"]
volumes   = ["/srv/hello:/srv/hello"]
restart   = "unless-stopped"

[[components.routes]]
name     = "http"
port     = 8443
mode     = "l7"
hostname = "hello.example.net"

[[components]]
name      = "vm"
image     = "localhost/hello:v1.0.0"
runtime   = "unikernel"
memory_mb = 256
"""


def base(**comp: object) -> dict[str, object]:
    c: dict[str, object] = {"name": "web", "image": "localhost/hello:v1"}
    c.update(comp)
    return {"name": "hello", "components": [c]}


def test_full_definition_parses() -> None:
    svc = loads_toml(GOOD)
    web, vm = svc.components
    assert svc.name == "hello" and svc.active is True
    assert web.runtime == "container" and web.version == "v1.0.0"
    assert web.routes[0].name == "http" and web.routes[0].port == 8443
    assert vm.runtime == "unikernel" and vm.memory_mb == 256 and vm.vcpus == 1


def test_service_runtime_is_the_default_for_components() -> None:
    data = base(memory_mb=64)
    data["runtime"] = "unikernel"
    assert from_dict(data).components[0].runtime == "unikernel"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "Hello", "components": [{"name": "web", "image": "x"}]}, "name"),
        ({"name": "../x", "components": [{"name": "web", "image": "x"}]}, "name"),
        ({"name": "a,b", "components": [{"name": "web", "image": "x"}]}, "name"),
        ({"name": "-a", "components": [{"name": "web", "image": "x"}]}, "name"),
        ({"name": "a" * 64, "components": [{"name": "web", "image": "x"}]}, "name"),
        ({"name": "hello", "components": []}, "components"),
        ({"name": "hello", "bogus": 1, "components": [{"name": "w", "image": "x"}]}, "bogus"),
        (base(bogus=1), "components[0].bogus"),
        (base(name="a_b"), "components[0].name"),
        (base(image=""), "components[0].image"),
        (base(image="--privileged"), "components[0].image"),
        (base(runtime="vm"), "components[0].runtime"),
        (base(runtime="unikernel"), "components[0].memory_mb"),
        (base(runtime="unikernel", memory_mb=0), "components[0].memory_mb"),
        (base(runtime="unikernel", memory_mb=-5), "components[0].memory_mb"),
        (base(vcpus=0), "components[0].vcpus"),
        (base(vcpus=True), "components[0].vcpus"),
        (base(env=["NOEQUALS"]), "components[0].env[0]"),
        (base(env="A=B"), "components[0].env"),
        (base(volumes=["relative:/x"]), "components[0].volumes[0]"),
        (base(volumes=["/a/../etc:/x"]), "components[0].volumes[0]"),
        (base(restart="sometimes"), "components[0].restart"),
        (base(image_sha256="xyz"), "components[0].image_sha256"),
        (base(binary="relative/bin"), "components[0].binary"),
        (base(routes=[{"port": 0}]), "components[0].routes[0].port"),
        (base(routes=[{"port": 80, "mode": "l3"}]), "components[0].routes[0].mode"),
        (base(routes=[{"port": 80, "hostname": "*.example.net"}]),
         "components[0].routes[0].hostname"),
        (base(routes=[{"port": 80}, {"port": 81}]), "components[0].routes[0].name"),
        (base(routes=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
         "components[0].routes"),
        ({"name": "hello", "active": "yes", "components": [{"name": "w", "image": "x"}]},
         "active"),
    ],
)
def test_bad_definitions_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        from_dict(data)
    assert err.value.field == field
    # several errors (two unnamed routes are two) come at once, the first naming field
    first = err.value.errors[0] if isinstance(err.value, ValidationErrors) else err.value
    assert str(first).startswith(field + ":")


def test_duplicate_component_names() -> None:
    data = {"name": "hello", "components": [{"name": "web", "image": "x"},
                                           {"name": "web", "image": "y"}]}
    with pytest.raises(ValidationError, match="duplicate component name 'web'") as err:
        from_dict(data)
    assert err.value.field == "components[1].name"


def test_invalid_toml_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="not valid TOML"):
        loads_toml("name = ")


def test_route_env_single_unnamed_and_named() -> None:
    single = from_dict(base(routes=[{"port": 8080}])).components[0]
    assert route_env(single, {"": 12345}) == ("PORT=12345",)
    named = from_dict(base(routes=[{"name": "http", "port": 80},
                                   {"name": "admin-ui", "port": 81}])).components[0]
    assert route_env(named, {"http": 1, "admin-ui": 2}) == ("PORT_HTTP=1", "PORT_ADMIN_UI=2")



def test_route_names_that_share_a_port_variable_are_refused() -> None:
    # "admin-ui" and "admin_ui" are distinct names but both would be $PORT_ADMIN_UI, so one
    # route's allocated port would never reach the component.
    with pytest.raises(ValidationError, match="PORT_ADMIN_UI") as err:
        from_dict(base(routes=[{"name": "admin-ui", "port": 80},
                               {"name": "admin_ui", "port": 81}]))
    assert err.value.field == "components[0].routes[1].name"

def test_hostname_rules() -> None:
    assert check_hostname("Hello.Example.NET.", "h") == "hello.example.net"
    for bad in ("", "a..b", "-a.b", "a-.b", "*.x", "a b", "x" * 64 + ".net", "a." * 127 + "b"):
        with pytest.raises(ValidationError):
            check_hostname(bad, "h")


@given(st.text(max_size=80))
def test_check_name_accepts_only_safe_names(value: str) -> None:
    try:
        check_name(value, "name")
    except ValidationError:
        return
    assert value[0].isalnum() and len(value) <= 63
    assert all(c.islower() or c.isdigit() or c == "-" for c in value)
    assert "/" not in value and "," not in value and "." not in value


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
))
def test_arbitrary_input_only_raises_validation_errors(data: object) -> None:
    # Anything else (TypeError, KeyError, ...) would be a 500 over HTTP.
    with contextlib.suppress(ValidationError):
        from_dict(data)


def test_to_dict_round_trips() -> None:
    svc = loads_toml(GOOD)
    assert from_dict(svc.to_dict()) == svc


def test_load_file_reads_json_definitions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # `mcp deploy FILE` takes a path ending in .json as a file: it must parse as JSON.
    path = tmp_path / "hello.json"
    path.write_text('{"name": "hello", "components": [{"name": "web", "image": "x:v1"}]}')
    assert load_file(path).components[0].image == "x:v1"
    path.write_text('{"name": "hello", "components": [{"name": "web", "image": 1}]}')
    with pytest.raises(ValidationError) as err:
        load_file(path)
    assert err.value.field == "components[0].image"
    path.write_text("{not json")
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_file(path)



@pytest.mark.parametrize("route", [{"port": 80, "name": []}, {"port": 80, "name": 0},
                                   {"port": 80, "hostname": []}, {"port": 80, "hostname": False}])
def test_falsy_non_string_route_fields_are_refused(route: dict[str, object]) -> None:
    field = "name" if "name" in route else "hostname"
    with pytest.raises(ValidationError) as err:
        from_dict(base(routes=[route]))
    assert err.value.field == f"components[0].routes[0].{field}"


# -- issue 9: hardened inputs ------------------------------------------------------------

SUR = "\ud800"


@pytest.mark.parametrize(("comp", "field"), [
    ({"image": f"localhost/hello:v{SUR}"}, "components[0].image"),
    ({"cmd": ["serve", f"x{SUR}"]}, "components[0].cmd[1]"),
    ({"env": [f"A=v{SUR}"]}, "components[0].env[0]"),
    ({"volumes": [f"/srv/a{SUR}:/a"]}, "components[0].volumes[0]"),
    ({"binary": f"/bin/x{SUR}"}, "components[0].binary"),
    ({"cmd": ["a\x00b"]}, "components[0].cmd[0]"),
    ({"cmd": ["x" * 4097]}, "components[0].cmd[0]"),
])
def test_surrogates_nul_and_length_are_refused_naming_the_field(
        comp: dict[str, object], field: str) -> None:
    """A lone surrogate in the image was a 500 (UnicodeEncodeError); in cmd/env/volumes it
    silently became U+FFFD in the container."""
    with pytest.raises(ValidationError) as err:
        from_dict(base(**comp))
    assert err.value.field == field


@pytest.mark.parametrize("image", [
    "x", "localhost/hello:v1.0.0", "localhost:5000/a/b_c__d-e.f:T_1", "[::1]:5000/x:y",
    "Registry.Example.COM/team/app", "docker.io/library/busybox@sha256:" + "a" * 64,
    "x@sha512:" + "0" * 128, "a:" + "t" * 128, "a" * 255,
])
def test_image_references_of_the_oci_grammar_are_accepted(image: str) -> None:
    assert from_dict(base(image=image)).components[0].image == image


@pytest.mark.parametrize("image", [
    "Hello", "a b", "a//b", "a/", "/a", "a:", "a:-x", "a:" + "t" * 129, "a@sha256:abc",
    "a@sha256:" + "A" * 64, "a@md5:" + "0" * 32, "a:v1@sha256:" + "a" * 64, "a" * 256,
    "--privileged", "a..b", "a/-b", "https://x/y", "a:b:c",
])
def test_invalid_image_references_are_400_naming_the_field(image: str) -> None:
    """podman refused these only after the deploy began: a 502 for a client mistake."""
    with pytest.raises(ValidationError) as err:
        from_dict(base(image=image))
    assert err.value.field == "components[0].image"


def test_routes_and_components_are_capped() -> None:
    from mcp_node.servicedef import MAX_COMPONENTS, MAX_ROUTES

    routes = [{"name": f"r{j}", "port": 80} for j in range(MAX_ROUTES)]
    assert len(from_dict(base(routes=routes)).components[0].routes) == MAX_ROUTES
    with pytest.raises(ValidationError, match=f"at most {MAX_ROUTES} routes") as err:
        from_dict(base(routes=[*routes, {"name": "one-more", "port": 80}]))
    assert err.value.field == "components[0].routes"
    comps = [{"name": f"c{i}", "image": "x"} for i in range(MAX_COMPONENTS + 1)]
    with pytest.raises(ValidationError, match=f"at most {MAX_COMPONENTS} components") as err:
        from_dict({"name": "big", "components": comps})
    assert err.value.field == "components"


def test_vm_memory_has_a_minimum_naming_the_field() -> None:
    """memory_mb = 1 for a VM got as far as QEMU and came back a 502."""
    from mcp_node.runtimenames import MIN_VM_MEMORY_MB

    for low in (1, MIN_VM_MEMORY_MB - 1):
        with pytest.raises(ValidationError, match=f"at least {MIN_VM_MEMORY_MB}") as err:
            from_dict(base(runtime="unikernel", memory_mb=low))
        assert err.value.field == "components[0].memory_mb"
    assert from_dict(base(runtime="unikernel", memory_mb=MIN_VM_MEMORY_MB))
    assert from_dict(base(memory_mb=1)).components[0].memory_mb == 1  # a container limit


@pytest.mark.parametrize(("env", "index"), [
    (["PORT=1"], 0), (["A=1", "PORT_HTTP=2"], 1), (["PORT_=3"], 0), (["A=1", "A=2"], 1),
])
def test_env_keys_the_agent_sets_or_given_twice_are_refused(env: list[str], index: int) -> None:
    """env = ["PORT=1"] was silently overridden by the agent's own $PORT."""
    with pytest.raises(ValidationError) as err:
        from_dict(base(env=env, routes=[{"name": "http", "port": 80}]))
    assert err.value.field == f"components[0].env[{index}]"
    assert from_dict(base(env=["PORTS=1", "port=2", "XPORT=3"]))


@pytest.mark.parametrize(("volumes", "words"), [
    (["/srv/a:/a", "/srv/a:/b"], "host path"),
    (["/srv/a:/a", "/srv/a/:/b:ro"], "host path"),
    (["/srv/a:/data", "/srv/b:/data"], "guest path"),
    (["/srv/a:/a:bogus"], "unsupported volume option"),
])
def test_duplicate_volume_paths_and_bad_options_are_refused(volumes: list[str],
                                                            words: str) -> None:
    """Two volumes with one host path silently kept only the last."""
    with pytest.raises(ValidationError, match=words) as err:
        from_dict(base(volumes=volumes))
    assert err.value.field == f"components[0].volumes[{len(volumes) - 1}]"


def test_volume_roots_refuse_paths_outside_and_symlink_escapes(tmp_path: Path) -> None:
    from mcp_node.servicedef import check_volume_roots

    root, srv = tmp_path / "volumes", tmp_path / "srv"
    for d in (root / "data", srv / "x", srv / "ok", tmp_path / "volumesx" / "y",
              tmp_path / "srvx"):
        d.mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    roots = [str(root), str(srv)]
    check_volume_roots(from_dict(base(volumes=[f"{root}/data:/d", f"{srv}/x:/x", f"{root}:/r"])),
                       roots)
    for host, field in (("/", 0), ("/etc", 0), (f"{root}/escape", 0), (f"{root}x/y", 0),
                        (f"{srv}x", 0)):
        defn = from_dict(base(volumes=[f"{host}:/g"]))
        with pytest.raises(ValidationError, match="outside the volume roots") as err:
            check_volume_roots(defn, roots)
        assert err.value.field == f"components[0].volumes[{field}]"
    defn = from_dict({"name": "two", "components": [
        {"name": "a", "image": "x"}, {"name": "b", "image": "x", "volumes": [f"{srv}/ok:/o",
                                                                             "/etc:/e:ro"]}]})
    with pytest.raises(ValidationError) as err:
        check_volume_roots(defn, roots)
    assert err.value.field == "components[1].volumes[1]"
    check_volume_roots(defn, ["/"])  # an operator who widens the roots to everything


# -- on the node: the agent's volume roots, file modes, port allocation (fake runtime) --------


def _agent(tmp_path: Path, **podman: object):  # type: ignore[no-untyped-def]
    from fake_runtime import FakeWorld

    from mcp_node.agent import Agent
    from mcp_node.config import from_dict as config_from_dict

    world = FakeWorld()
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")}, "podman": podman})
    return Agent(cfg, runtimes=world.runtimes()), world


def test_agent_refuses_volumes_outside_the_roots_before_anything_changes(
        tmp_path: Path) -> None:
    """An operator token could mount / or /etc read-write into a root container."""
    agent, world = _agent(tmp_path)
    try:
        inside, hello = agent.state_dir / "volumes" / "data", agent.state_dir / "volumes" / "h"
        inside.mkdir(parents=True)
        hello.mkdir()
        for host in ("/", "/etc", "/root"):
            with pytest.raises(ValidationError, match="outside the volume roots") as err:
                agent.deploy(from_dict(base(volumes=[f"{inside}:/ok", f"{host}:/host"])))
            assert err.value.field == "components[0].volumes[1]"
        assert world.calls == [] and agent.registry.list_services() == []
        agent.deploy(from_dict(base(volumes=[f"{inside}:/ok", f"{hello}:/srv"])))
        assert agent.registry.has_service("hello")
    finally:
        agent.close()
    wide, _ = _agent(tmp_path, volume_roots=["/"])  # the operator widened them in config
    try:
        wide.deploy(from_dict(base(volumes=["/etc:/host-etc:ro"])))
    finally:
        wide.close()


def test_volume_roots_config_must_be_absolute() -> None:
    from mcp_node.config import from_dict as config_from_dict

    with pytest.raises(ValidationError) as err:
        config_from_dict({"podman": {"volume_roots": ["srv"]}})
    assert err.value.field == "podman.volume_roots"


def test_state_dir_is_0700_and_registry_0600_even_if_they_were_wider(tmp_path: Path) -> None:
    """registry.db (env values) was 0644 and the state dir 0755."""
    import os
    import stat

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / "registry.db").touch(mode=0o644)
    os.chmod(state / "registry.db", 0o644)
    agent, _ = _agent(tmp_path)
    try:
        agent.deploy(from_dict(base(env=["SECRET=hunter2"])))
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for f in state.iterdir():
            if f.name.startswith("registry.db"):
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    finally:
        agent.close()
    fresh = tmp_path / "fresh"
    from mcp_node.registry import Registry

    reg = Registry(fresh / "registry.db")
    try:
        reg.put_service(from_dict(base()))
        assert stat.S_IMODE((fresh / "registry.db").stat().st_mode) == 0o600
    finally:
        reg.close()


def test_port_allocation_never_reads_the_route_table(tmp_path: Path) -> None:
    """Allocation re-read every host port per new route: N² (8,000 routes took 34 s);
    then once per deploy, which still grew with the node (issue 21). Now each candidate
    port is one lookup on UNIQUE(host_port)."""
    from mcp_node.registry import Registry

    reg = Registry(tmp_path / "registry.db")
    try:
        reg.put_service(from_dict({"name": "other", "components": [
            {"name": "c", "image": "x", "routes": [{"name": f"r{j}", "port": 80}
                                                   for j in range(10)]}]}))
        reads: list[str] = []
        reg._db.set_trace_callback(lambda sql: reads.append(sql) if "routes" in sql and
                                   sql.startswith("SELECT") else None)
        comps = [{"name": f"c{i}", "image": "x",
                  "routes": [{"name": f"r{j}", "port": 80} for j in range(32)]}
                 for i in range(8)]
        rec = reg.put_service(from_dict({"name": "big", "components": comps}))
        reg._db.set_trace_callback(None)
        ports = [p for c in rec.components for p in c.host_ports.values()]
        others = set(reg.get_service("other").components[0].host_ports.values())
        assert len(ports) == 256 == len(set(ports)) and not others & set(ports)
        lookups = [r for r in reads if "WHERE host_port=" in r]
        assert not [r for r in reads if r not in lookups and "WHERE service=" not in r]
        assert 256 <= len(lookups) <= 300   # one per new port (and a rare random repeat)
    finally:
        reg.close()


@pytest.mark.parametrize("key,value", [("vcpus", 2), ("binary", "/bin/x"),
                                       ("image_sha256", "a" * 64)])
def test_vm_only_keys_on_a_container_are_refused(key: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        from_dict({"name": "s", "components": [{"name": "web", "image": "i:1", key: value}]})
    assert err.value.field == f"components[0].{key}"
    assert "has no effect on a container component" in str(err.value)
    from_dict({"name": "s", "components": [{"name": "vm", "image": "i:1", "runtime": "unikernel",
                                            "memory_mb": 128, key: value}]})
