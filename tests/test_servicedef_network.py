"""A service's ``[network] allow_from`` (issue 23): which other services may reach it in
bridge mode. Parsed and refused naming the field; kept by the registry across a read; off
the JSON form when unset (a definition from before it keeps its digest); turned into the
directed bridge pairs the rule table accepts and the names the source resolves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mcp_node.config import NetworkConfig
from mcp_node.errors import ValidationError, ValidationErrors
from mcp_node.records import definition_digest, service_tables
from mcp_node.registry import Registry
from mcp_node.servicedef import NetworkDef, UpdateDef, from_dict, loads_toml
from mcp_node.servicenet import ServiceNetworks


def svc(name: str = "db", **top: Any) -> dict[str, Any]:
    return {"name": name, "components": [{"name": "web", "image": "localhost/x:1"}], **top}


def test_parsed_sorted_and_in_the_json_form_only_when_set() -> None:
    d = loads_toml('name = "db"\n[network]\nallow_from = ["shop", "blog"]\n'
                   '[[components]]\nname = "web"\nimage = "localhost/x:1"\n')
    assert d.network == NetworkDef(("blog", "shop"))
    assert d.to_dict()["network"] == {"allow_from": ["blog", "shop"]}
    assert from_dict(d.to_dict()) == d
    plain = from_dict(svc())
    assert plain.network == NetworkDef() and "network" not in plain.to_dict()
    assert definition_digest(from_dict(svc(network={"allow_from": []}))) == \
        definition_digest(plain)


@pytest.mark.parametrize(("network", "field", "words"), [
    ({"allow_from": ["db"]}, "network.allow_from[0]", "the service itself"),
    ({"allow_from": ["a", "a"]}, "network.allow_from[1]", "named twice"),
    ({"allow_from": ["Bad_Name"]}, "network.allow_from[0]", "not a valid name"),
    ({"allow_from": [7]}, "network.allow_from[0]", "must be a string"),
    ({"allow_from": "shop"}, "network.allow_from", "list"),
    ({"allow": ["shop"]}, "network.allow", "unknown"),
    (["shop"], "network", "must be a table"),
])
def test_bad_values_are_refused_naming_the_field(network: object, field: str,
                                                 words: str) -> None:
    with pytest.raises(ValidationError) as e:
        from_dict(svc(network=network))
    errors = e.value.errors if isinstance(e.value, ValidationErrors) else [e.value]
    assert [x.field for x in errors] == [field]
    assert words in str(errors[0])


def test_the_registry_keeps_it_beside_update(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db")
    d = from_dict(svc(network={"allow_from": ["shop"]}, update={"order": "start-first"}))
    reg.put_service(d)
    assert reg.get_service("db").definition() == d
    # What a registry written before [network] holds reads as no allowance.
    assert service_tables(json.dumps({"drain_s": 1})) == (UpdateDef(drain_s=1), NetworkDef())
    reg.put_service(from_dict(svc()))
    assert reg.get_service("db").network == NetworkDef()
    reg.close()


def test_pairs_are_directed_and_need_both_networks_here(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db")
    for d in (svc("db", network={"allow_from": ["shop", "gone", "blog"]}),
              svc("shop"), svc("blog", network={"allow_from": ["shop"]}), svc("nonet")):
        reg.put_service(from_dict(d))
    for name in ("db", "shop", "blog"):
        reg.allocate_network(name, ["web"], 256)
    nets = ServiceNetworks(NetworkConfig("bridge", "10.89.0.0/16"), reg, tmp_path,
                           lambda name: None, {})  # type: ignore[arg-type,return-value]
    records = reg.list_services()
    # db lets shop and blog in; blog lets shop in; "gone" has no network here
    assert sorted(nets.pairs(records)) == [("blog", "db"), ("shop", "blog"), ("shop", "db")]
    reg.close()
