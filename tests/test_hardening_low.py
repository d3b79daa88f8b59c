"""Issue 16's low items of the agent, each reproduced first: the token cache race, lock
files of missing names, image references podman reads as image IDs, an event for
``restart``, and route hostnames checked against the internal zone whatever
``proxy.serve_routes`` says. (Nesting depth, duplicate JSON keys and control
characters: test_untrusted_text.)"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld
from podman_env import podman_cli

from mcp_node import auth, openapi
from mcp_node.agent import Agent
from mcp_node.auth import TokenStore
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import NotFoundError, RegistryError, ValidationError
from mcp_node.files import flocked
from mcp_node.grammar import IMAGE_ID_PATTERN, check_image
from mcp_node.servicedef import from_dict


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


def make_agent(world: FakeWorld, tmp_path: Path, **cfg: Any) -> Agent:
    return Agent(config_from_dict({"state": {"dir": str(tmp_path / "state")}, **cfg}),
                 runtimes=world.runtimes())


@pytest.fixture
def agent(world: FakeWorld, tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(world, tmp_path)
    try:
        yield a
    finally:
        a.close()


# -- the token cache ------------------------------------------------------------------


def test_a_lookup_racing_a_reload_does_not_keep_a_removed_token_valid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TokenStore(tmp_path / "tokens.toml")
    token = store.add("ci", "operator")
    real = auth.hmac.compare_digest
    removed: list[bool] = []

    def compare(a: str, b: str) -> bool:
        if not removed:   # the reload lands while this lookup compares hashes
            removed.append(True)
            store.remove("ci")
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    assert store.lookup(token) is not None   # started before the removal
    monkeypatch.undo()
    assert removed and store.tokens == []
    assert store.lookup(token) is None


# -- lock files -------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["stop", "start", "restart", "undeploy"])
def test_an_operation_on_a_missing_name_leaves_no_lock_file(agent: Agent, op: str) -> None:
    for i in range(3):
        with pytest.raises(NotFoundError):
            getattr(agent, op)(f"ghost-{i}")
    assert sorted(p.name for p in (agent.state_dir / "locks").glob("*")) == []
    assert len(agent.locks) == 0


def test_undeploy_takes_the_lock_file_with_the_service(agent: Agent) -> None:
    locks = agent.state_dir / "locks"
    agent.deploy(from_dict({"name": "shop", "components": [{"name": "web", "image": "i:1"}]}))
    assert (locks / "service-shop.lock").exists()
    agent.undeploy("shop")
    assert not (locks / "service-shop.lock").exists()
    assert len(agent.locks) == 0


def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(tmp_path: Path) -> None:
    """Removing a held lock file must not let two holders in: one that waited on the old
    file and one that opens the new one."""
    path = tmp_path / "locks" / "service-x.lock"
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def waiter() -> None:
        with flocked(path) as got:
            assert got
            holding.set()
            release.wait(10)
        done.set()

    with flocked(path):
        t = threading.Thread(target=waiter)
        t.start()
        path.unlink()   # as a holder does when its name is gone, then releases
    assert holding.wait(10)
    with flocked(path, wait=False) as got:
        assert got is False   # the waiter holds the file that is there now
    release.set()
    assert done.wait(10)
    t.join(10)


# -- image references read as image IDs -------------------------------------------------


@pytest.mark.parametrize("ref", ["04dcc82d", "b", "cafe", "0" * 12, "a" * 64])
def test_a_bare_hex_image_name_is_refused(ref: str) -> None:
    with pytest.raises(ValidationError) as err:
        check_image(ref, "components[0].image")
    assert err.value.field == "components[0].image"
    assert "image ID" in str(err.value)


@pytest.mark.parametrize("ref", ["04dcc82d:v1", "localhost/04dcc82d", "cafe/beef",
                                 "docker.io/library/cafe", "cafe" + "@sha256:" + "1" * 64,
                                 "cafebabe-x", "deadbeefg", "f" * 65])
def test_hex_with_a_tag_domain_path_or_digest_is_a_name(ref: str) -> None:
    assert check_image(ref) == ref


def test_the_openapi_document_states_the_image_id_rule() -> None:
    defn = openapi.document()["components"]["schemas"]["ServiceDefinition"]
    image = defn["properties"]["components"]["items"]["properties"]["image"]
    assert image["description"].endswith("; not 1-64 bare hex digits, which podman reads "
                                          "as an image ID")
    for ref in ("04dcc82d", "a" * 64, "04dcc82d:v1", "cafe/beef", "f" * 65):
        by_rule = bool(re.search(image["pattern"], ref)) and not re.search(IMAGE_ID_PATTERN, ref)
        try:
            by_check = check_image(ref) == ref
        except ValidationError:
            by_check = False
        assert by_rule == by_check, ref


def test_podman_reads_exactly_the_refused_references_as_image_ids(
        podman_binary: None, hello_image: str) -> None:
    full = podman_cli("image", "inspect", "--format", "{{.Id}}", hello_image,
                      check=True).stdout.strip()
    for ref in (full[:12], full):
        assert podman_cli("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip() == full
        with pytest.raises(ValidationError, match="image ID"):
            check_image(ref)
    for ref in (f"{full[:12]}:latest", f"localhost/{full[:12]}", full + "0"):
        check_image(ref)
        proc = podman_cli("image", "inspect", "--format", "{{.Id}}", ref)
        assert proc.returncode != 0 and "image not known" in proc.stderr


# -- restart records an event -----------------------------------------------------------


def test_restart_records_an_event_per_component(agent: Agent) -> None:
    agent.deploy(from_dict({"name": "shop", "components": [
        {"name": "web", "image": "i:1"}, {"name": "db", "image": "i:1"}]}))
    before = len(agent.events("shop"))
    agent.restart("shop")
    new = agent.events("shop")[before:]
    assert sorted((e["component"], e["detail"]) for e in new) == [
        ("db", "restarted by operator"), ("web", "restarted by operator")]
    agent.restart("shop", "web")
    assert [(e["component"], e["detail"]) for e in agent.events("shop")[before + 2:]] == [
        ("web", "restarted by operator")]


def test_a_restart_whose_event_cannot_be_written_still_answers(
        agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    agent.deploy(from_dict({"name": "shop", "components": [{"name": "web", "image": "i:1"}]}))

    def full_disk(events: Any) -> None:
        raise RegistryError("database or disk is full")

    monkeypatch.setattr(agent.registry, "record_observed", full_disk)
    assert agent.restart("shop")["service"] == "shop"


# -- route hostnames --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example.com", "svc.mcp.example.net"])
def test_a_route_hostname_outside_the_zone_is_refused_with_routes_off(
        world: FakeWorld, tmp_path: Path, host: str) -> None:
    a = make_agent(world, tmp_path)
    assert not a.config.proxy.serve_routes
    defn = from_dict({"name": "shop", "components": [{"name": "web", "image": "i:1", "routes": [
        {"name": "a", "port": 8080}, {"name": "b", "port": 8081, "hostname": host}]}]})
    try:
        with pytest.raises(ValidationError) as err:
            a.deploy(defn)
        assert err.value.field == "components[0].routes[1].hostname"
        assert str(err.value).endswith(f"{host} is not inside the internal zone "
                                       "svc.mcp.example.net")
        assert not a.registry.has_service("shop") and world.ops() == []
        ok = from_dict({"name": "shop", "components": [{"name": "web", "image": "i:1",
                        "routes": [{"port": 8080, "hostname": "a.svc.mcp.example.net"}]}]})
        assert a.deploy(ok)["service"] == "shop"
    finally:
        a.close()
