"""Service definition validation: every rule of design §2, errors naming the field."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_node.errors import ValidationError
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
    assert str(err.value).startswith(field + ":")


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
