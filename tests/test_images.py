"""Images that move (issue 19, item 4), without podman: the pure parts (the digest in
the definition, the plan diff, which images a prune may remove, the pull flag's
decoding) and the agent's deploy / plan / history / rollback against fake runtimes
whose tags can be moved. tests/test_images_podman.py does the same with real podman."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.clictx import LocalBackend
from mcp_node.config import from_dict as config_from_dict
from mcp_node.config import parse as config_parse
from mcp_node.errors import ImageError, ValidationError
from mcp_node.images import Candidate, pinned, prune_candidates, wants_pull
from mcp_node.opdecode import decode
from mcp_node.optable import BY_CLI
from mcp_node.plan import carried, plan, plan_dict, plan_text
from mcp_node.registry import Registry, _statements, migrations
from mcp_node.runtime import DEFAULT_RUNTIME, WorkloadSpec
from mcp_node.servicedef import ServiceDef, from_dict

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


def svc(image: str = "localhost/x:t", digest: str = "", **more: Any) -> ServiceDef:
    comp: dict[str, Any] = {"name": "web", "image": image, **more}
    if digest:
        comp["image_digest"] = digest
    return from_dict({"name": "shop", "components": [comp]})


# -- the definition and the spec ---------------------------------------------------------

def test_the_digest_round_trips_and_is_left_out_when_unset() -> None:
    assert "image_digest" not in svc().to_dict()["components"][0]
    d = svc(digest=A)
    assert d.components[0].image_digest == A
    assert from_dict(d.to_dict()) == d


@pytest.mark.parametrize("bad", ["sha256:" + "A" * 64, "a" * 64, "sha256:abc", 5, None])
def test_a_malformed_digest_is_refused_naming_the_field(bad: Any) -> None:
    with pytest.raises(ValidationError) as err:
        from_dict({"name": "shop", "components": [
            {"name": "web", "image": "x:1", "image_digest": bad}]})
    assert err.value.field == "components[0].image_digest"


def test_the_spec_runs_the_digest_and_keeps_its_old_digest_without_one() -> None:
    plain = WorkloadSpec("shop", "web", "localhost/x:t")
    assert plain.run_image == "localhost/x:t"
    # the digest of a spec from before image_digest existed (an upgrade replaces nothing)
    before = [plain.service, plain.component, plain.image, plain.cmd, plain.env,
              plain.volumes, plain.ports, plain.memory_mb, plain.vcpus, plain.binary,
              plain.image_sha256]
    assert plain.digest == hashlib.sha256(json.dumps(before).encode()).hexdigest()[:16]
    same = replace(plain, image_digest="")
    assert same.digest == plain.digest
    moved = replace(plain, image_digest=A)
    assert moved.run_image == A and moved.digest != plain.digest
    assert replace(plain, image_digest=B).digest != moved.digest


def test_pinned_and_wants_pull() -> None:
    d = pinned(svc(), {"web": A})
    assert d.components[0].image_digest == A
    assert pinned(d, {}).components[0].image_digest == A
    c = svc().components[0]
    assert not wants_pull(c, False) and wants_pull(c, True)
    assert wants_pull(replace(c, pull="always"), False)


# -- the plan --------------------------------------------------------------------------

def test_a_moved_tag_is_a_replace_naming_the_digests() -> None:
    p = plan(svc(digest=A), svc(digest=B))
    [ch] = p.changes
    assert (ch.action, ch.fields) == ("replace", (("image_digest", A, B),))
    assert f"image_digest: '{A}' -> '{B}'" in plan_text(plan_dict(p))
    assert plan(svc(digest=A), svc(digest=A)).changes == []


def test_pull_is_how_an_image_is_resolved_not_what_runs() -> None:
    assert plan(svc(digest=A), svc(digest=A, pull="always")).changes == []


def test_carried_keeps_the_deployed_digest_for_an_unchanged_reference() -> None:
    deployed = svc(digest=A)
    assert plan(deployed, carried(deployed, svc())).changes == []
    [ch] = plan(deployed, carried(deployed, svc("localhost/x:u"))).changes
    assert [f[0] for f in ch.fields] == ["image", "image_digest"]
    assert carried(None, svc()) == svc()


# -- which images a prune may remove ----------------------------------------------------

def test_prune_removes_only_what_no_kept_version_records() -> None:
    versions = [svc(digest=A), svc(digest=B), svc("localhost/y:1", digest=C),
                svc(digest=B)]
    # keep 2: B and C are kept, A only is older
    assert prune_candidates({"shop": versions}, [], 2) == [
        Candidate(A, DEFAULT_RUNTIME, frozenset({"localhost/x:t"}))]
    assert prune_candidates({"shop": versions}, [], 4) == []
    # another service's kept version, or what runs now, keeps it too
    other = [svc(digest=A)]
    assert prune_candidates({"shop": versions, "other": other}, [], 2) == []
    assert prune_candidates({"shop": versions}, [svc(digest=A)], 2) == []
    # a version without a digest (from before) records nothing
    assert prune_candidates({"shop": [svc(), svc(digest=B)]}, [], 1) == []


def test_prune_names_are_every_reference_recorded_for_the_digest() -> None:
    versions = [svc(digest=A), svc("localhost/x:old", digest=A), svc(digest=B)]
    [cand] = prune_candidates({"shop": versions}, [], 1)
    assert cand.names == frozenset({"localhost/x:t", "localhost/x:old"})


# -- the pull flag through the operation table ------------------------------------------

def test_pull_is_a_query_flag_of_deploy_and_plan() -> None:
    body = json.dumps(svc().to_dict()).encode()
    for name in ("deploy", "plan"):
        op = BY_CLI[name]
        assert decode(op, {}, {"pull": "true"}, body)["pull"] is True
        assert "pull" not in decode(op, {}, {}, body)
        with pytest.raises(ValidationError) as err:
            decode(op, {}, {"pull": "maybe"}, body)
        assert err.value.field == "pull"


def test_keep_versions_is_checked() -> None:
    assert config_from_dict({}).images.keep_versions == 3
    assert config_from_dict({"images": {"keep_versions": 5}}).images.keep_versions == 5
    for bad in (0, 21):
        _cfg, errors = config_parse({"images": {"keep_versions": bad}})
        assert [e.field for e in errors] == ["images.keep_versions"]


# -- the agent, with tags that move -----------------------------------------------------

class Tags:
    """What each reference names on the fake node, and which images are there."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.present: set[str] = set()
        self.pulls: list[tuple[str, bool]] = []
        self.unpullable: set[str] = set()
        self.removed: list[str] = []

    def resolve(self, spec: WorkloadSpec, always: bool = False) -> str:
        if spec.image_digest:
            if spec.image_digest not in self.present:
                raise ImageError(f"image {spec.image} at {spec.image_digest} is gone")
            return spec.image_digest
        self.pulls.append((spec.image, always))
        if spec.image in self.unpullable and (always or spec.image not in self.tags):
            raise ImageError(f"cannot pull image {spec.image}: connection refused")
        return self.tags[spec.image]

    def remove_image(self, digest: str, names: frozenset[str]) -> str:
        if digest not in self.present:
            return "not present"
        if any(d == digest and ref not in names for ref, d in self.tags.items()):
            return "has another name"
        self.present.discard(digest)
        self.removed.append(digest)
        return ""


@pytest.fixture
def moving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Agent, FakeWorld,
                                                                              Tags]]:
    world, tags = FakeWorld(), Tags()
    runtimes = world.runtimes()
    for cls in runtimes.values():
        monkeypatch.setattr(cls, "resolve", lambda self, spec, always=False:
                            tags.resolve(spec, always), raising=False)
        monkeypatch.setattr(cls, "remove_image", lambda self, d, names:
                            tags.remove_image(d, names), raising=False)
    agent = Agent(config_from_dict({"state": {"dir": str(tmp_path / "st")},
                                    "images": {"keep_versions": 2}}), runtimes=runtimes)
    yield agent, world, tags
    agent.close()


def move(tags: Tags, ref: str, digest: str) -> None:
    tags.tags[ref] = digest
    tags.present.add(digest)


def test_a_moved_tag_is_planned_deployed_recorded_and_rolled_back_by_digest(
        moving: tuple[Agent, FakeWorld, Tags]) -> None:
    agent, world, tags = moving
    move(tags, "localhost/x:t", A)
    agent.deploy(svc())
    assert world.workloads[("shop", "web")].spec.run_image == A
    assert agent.plan(svc())["changed"] is False
    again = agent.deploy(svc())
    assert again["unchanged"] is True

    move(tags, "localhost/x:t", B)
    p = agent.plan(svc())
    assert [(c["action"], c["fields"]) for c in p["changes"]] == [
        ("replace", [{"field": "image_digest", "from": A, "to": B}])]
    world.reset_calls()
    agent.deploy(svc())
    assert ("run", "web") in world.ops("run")
    assert world.workloads[("shop", "web")].spec.run_image == B
    hist = agent.history("shop")
    assert [h["image_digests"] for h in hist] == [[A], [B]]

    agent.rollback("shop")   # the tag still names B
    assert world.workloads[("shop", "web")].spec.run_image == A
    assert agent.registry.get_service("shop").components[0].defn.image_digest == A
    assert [h["image_digests"] for h in agent.history("shop")][-1] == [A]


def test_a_rollback_to_an_image_that_is_gone_changes_nothing(
        moving: tuple[Agent, FakeWorld, Tags]) -> None:
    agent, world, tags = moving
    move(tags, "localhost/x:t", A)
    agent.deploy(svc())
    move(tags, "localhost/x:t", B)
    agent.deploy(svc())
    tags.present.discard(A)
    before = (agent.registry.get_service("shop"), len(agent.history("shop")))
    world.reset_calls()
    with pytest.raises(ImageError, match=f"localhost/x:t at {A}"):
        agent.rollback("shop")
    assert (agent.registry.get_service("shop"), len(agent.history("shop"))) == before
    assert world.ops("run", "stop", "remove") == []
    assert world.workloads[("shop", "web")].spec.run_image == B


def test_pull_always_and_the_pull_flag_pull_and_a_failed_pull_changes_nothing(
        moving: tuple[Agent, FakeWorld, Tags]) -> None:
    agent, world, tags = moving
    move(tags, "localhost/x:t", A)
    agent.deploy(svc())
    assert tags.pulls[-1] == ("localhost/x:t", False)
    agent.deploy(svc(pull="always"))
    assert tags.pulls[-1] == ("localhost/x:t", True)
    LocalBackend(agent).call("deploy", svc().to_dict(), True)
    assert tags.pulls[-1] == ("localhost/x:t", True)

    tags.unpullable.add("localhost/x:t")
    before = agent.registry.get_service("shop")
    world.reset_calls()
    for call in (lambda: agent.deploy(svc(), pull=True),
                 lambda: agent.deploy(svc(pull="always")),
                 lambda: agent.plan(svc(), pull=True)):
        with pytest.raises(ImageError, match="cannot pull image localhost/x:t"):
            call()
    assert agent.registry.get_service("shop") == before
    assert world.ops("run", "stop", "remove") == []
    agent.deploy(svc())   # "missing": present, so not pulled
    assert tags.pulls[-1] == ("localhost/x:t", False)


def test_images_of_versions_beyond_keep_versions_are_pruned(
        moving: tuple[Agent, FakeWorld, Tags]) -> None:
    agent, _world, tags = moving
    move(tags, "localhost/mine:1", "sha256:" + "9" * 64)   # never deployed: never touched
    for digest in (A, B, C):
        move(tags, "localhost/x:t", digest)
        agent.deploy(svc())
        agent.images.wait(30)
    assert tags.removed == [A]
    assert tags.present == {B, C, "sha256:" + "9" * 64}


def test_an_older_registry_migrates_to_digests(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    old = Registry(path, migrate_to=13)
    old._db.execute("INSERT INTO services (name, active, created_at, updated_at) "
                    "VALUES ('shop', 1, 'then', 'then')")
    old._db.execute("INSERT INTO components (service, name, image, updated_at, runtime) "
                    "VALUES ('shop', 'web', 'localhost/x:t', 'then', 'podman')")
    old.close()
    reg = Registry(path)
    try:
        [comp] = reg.get_service("shop").components
        assert comp.defn.image_digest == ""
        reg.put_service(svc(digest=A))
        assert reg.get_service("shop").components[0].defn.image_digest == A
        reg.record_deployment(svc(digest=A))
        reg.record_deployment(svc(digest=B))   # same definition, moved tag: a new version
        assert [d.definition.components[0].image_digest for d in reg.history("shop")] == [A, B]
    finally:
        reg.close()
    versions = sqlite3.connect(path).execute(
        "SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert (14,) in versions


def test_a_registry_that_has_015_but_not_014_gets_014(tmp_path: Path) -> None:
    """015 was released before 014: a registry made then is migrated all the same."""
    path = tmp_path / "r.db"
    Registry(path, migrate_to=13).close()
    db = sqlite3.connect(path)
    sql = next(s for v, _n, s in migrations() if v == 15)
    with db:
        for stmt in _statements(sql):
            db.execute(stmt)
        db.execute("INSERT INTO schema_migrations (version, name, applied_at) "
                   "VALUES (15, 'definition_settings', 'then')")
    db.close()
    reg = Registry(path)
    try:
        reg.put_service(svc(digest=A))
        assert reg.get_service("shop").components[0].defn.image_digest == A
    finally:
        reg.close()


# -- the argument builders and the runtimes' image calls, against fakes ------------------

def test_the_container_is_created_from_the_resolved_image() -> None:
    from mcp_node.podmanargs import create_kwargs

    spec = WorkloadSpec("shop", "web", "localhost/x:t")
    assert create_kwargs(spec, "o")["image"] == "localhost/x:t"
    pinned_spec = replace(spec, image_digest=A)
    kw = create_kwargs(pinned_spec, "o")
    assert kw["image"] == A and kw["labels"]["mcp.spec"] == pinned_spec.digest


class Resp:
    def __init__(self, status: int, body: Any = None) -> None:
        self.status_code, self._body = status, body

    def json(self) -> Any:
        return self._body


class FakeREST:
    """podman's image endpoints as podman_images calls them; every call recorded."""

    def __init__(self, images: dict[str, list[str]], used: set[str] = frozenset()) -> None:
        self.images = images            # id -> names
        self.used = set(used)
        self.calls: list[tuple[str, str]] = []

    def _find(self, ref: str) -> str | None:
        return next((i for i, names in self.images.items() if ref == i or ref in names), None)

    def __call__(self, method: str, path: str, what: str, **kw: Any) -> Resp:
        from urllib.parse import unquote

        self.calls.append((method, unquote(path)))
        ref = unquote(path.split("/")[2])
        found = self._find(ref)
        if method == "DELETE":
            if found in self.used:
                return Resp(409)
            self.images.pop(found or "", None)
            return Resp(200)
        if path.endswith("/exists"):
            return Resp(204 if found else 404)
        if found is None:
            return Resp(404)
        return Resp(200, {"Id": found.removeprefix("sha256:"), "RepoTags": self.images[found]})


def test_resolve_pulls_as_the_policy_says_and_pins() -> None:
    from mcp_node import podman_images

    rest, pulls = FakeREST({A: ["localhost/x:t"]}), []
    resolve = podman_images.resolve
    assert resolve(rest, pulls.append, "localhost/x:t", "", False) == A and pulls == []
    assert resolve(rest, pulls.append, "localhost/x:t", "", True) == A
    assert pulls == ["localhost/x:t"]
    assert resolve(rest, pulls.append, "localhost/x:t", A, True) == A   # pinned: no pull
    assert pulls == ["localhost/x:t"]
    with pytest.raises(ImageError, match=f"image localhost/x:t at {B} is no longer"):
        resolve(rest, pulls.append, "localhost/x:t", B, False)

    def unpullable(ref: str) -> None:
        raise ImageError(f"cannot pull image {ref}: refused")

    with pytest.raises(ImageError, match="cannot pull image localhost/y:1"):
        resolve(rest, unpullable, "localhost/y:1", "", False)


def test_remove_refuses_a_foreign_name_and_an_image_in_use() -> None:
    from mcp_node import podman_images

    rest = FakeREST({A: ["localhost/x:t", "localhost/mine:1"], B: [], C: ["localhost/x:u"]},
                    used={C})
    names = frozenset({"localhost/x:t", "localhost/x:u"})
    assert podman_images.remove(rest, A, names) == "it also has the name localhost/mine:1"
    assert ("DELETE", f"/images/{A}") not in rest.calls
    assert "in use" in podman_images.remove(rest, C, names)
    assert podman_images.remove(rest, B, names) == ""
    assert podman_images.remove(rest, B, names) == "not present"
    assert set(rest.images) == {A, C}


class FakeCLI:
    """vmpull.Podman's ``run`` over a dict of images."""

    registries = None   # no [registries]: a plain pull

    def __init__(self, images: dict[str, list[str]], pull_ok: bool = True) -> None:
        self.images, self.pull_ok = images, pull_ok
        self.argvs: list[tuple[str, ...]] = []

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            pass_fds: tuple[int, ...] = ()) -> Any:
        import subprocess

        self.argvs.append(args)
        ok, out = True, b""
        if args[0] == "pull":
            ok = self.pull_ok
        elif args[:2] == ("image", "inspect"):
            ok = args[-1] in self.images
            out = json.dumps([{"RepoTags": self.images.get(args[-1], [])}]).encode()
        elif args[0] == "rmi":
            ok = self.images.pop(args[1], None) is not None
        return subprocess.CompletedProcess(args, 0 if ok else 125, out,
                                           b"" if ok else b"Error: connection refused")


def test_the_vm_runtimes_image_calls_are_argv_lists() -> None:
    from mcp_node.vmpull import pull_image, remove_image

    cli: Any = FakeCLI({A: ["localhost/x:t"], B: ["localhost/mine:1"]}, pull_ok=False)
    with pytest.raises(ImageError, match="cannot pull image localhost/x:t: Error: connection"):
        pull_image(cli, "localhost/x:t")
    assert remove_image(cli, B, frozenset({"localhost/x:t"})).startswith("it also has")
    assert remove_image(cli, A, frozenset({"localhost/x:t"})) == ""
    assert remove_image(cli, A, frozenset({"localhost/x:t"})) == "not present"
    assert ("rmi", A) in cli.argvs and ("pull", "localhost/x:t") in cli.argvs


# -- mcp deploy --pull and mcp plan, over HTTP and --local -----------------------------

@pytest.fixture
def moving_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Tags]]:
    from fake_runtime import DummyRuntime
    from live_server import fake_live

    tags = Tags()
    monkeypatch.setattr(DummyRuntime, "resolve", lambda self, spec, always=False:
                        tags.resolve(spec, always), raising=False)
    with fake_live(tmp_path) as live:
        yield live, tags


def test_deploy_pull_and_plan_through_the_api_and_the_cli(
        moving_live: tuple[Any, Tags], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mcp_node.cli import cli
    from mcp_node.clictx import RemoteBackend

    live, tags = moving_live
    move(tags, "localhost/x:t", A)
    token = tmp_path / "tok"
    token.write_text(live.operator_token)
    token.chmod(0o600)
    f = tmp_path / "shop.toml"
    f.write_text('name = "shop"\n[[components]]\nname = "web"\nimage = "localhost/x:t"\n')

    def mcp(*args: str) -> Any:
        return CliRunner().invoke(cli, ["--agent", live.url, "--token-file", str(token),
                                        *args])

    res = mcp("deploy", str(f))
    assert res.exit_code == 0 and tags.pulls[-1] == ("localhost/x:t", False), res.output
    res = mcp("deploy", "--pull", str(f))
    assert res.exit_code == 0 and tags.pulls[-1] == ("localhost/x:t", True), res.output
    res = mcp("plan", str(f))
    assert (res.exit_code, res.stdout) == (0, "shop: no changes\n")
    move(tags, "localhost/x:t", B)
    res = mcp("plan", str(f))
    assert res.exit_code == 3
    assert res.stdout == (f"shop: 1 change(s)\n  replace web (definition differs)\n"
                          f"      image_digest: '{A}' -> '{B}'\n")
    res = mcp("history", "shop")
    assert f"localhost/x:t@{'a' * 12}" in res.stdout
    b = RemoteBackend(live.url, live.operator_token)
    assert b.call("plan", svc().to_dict(), True)["changed"] is True
    assert tags.pulls[-1] == ("localhost/x:t", True)
    tags.unpullable.add("localhost/x:t")
    res = mcp("deploy", "--pull", str(f))
    assert res.exit_code == 1 and "cannot pull image localhost/x:t" in res.output
    assert live.agent.registry.get_service("shop").components[0].defn.image_digest == A


def test_a_moved_tag_begins_a_rollout_and_its_revert_returns_to_the_digest(
        moving: tuple[Agent, FakeWorld, Tags]) -> None:
    from mcp_node.rollout import reverter

    agent, world, tags = moving
    move(tags, "localhost/x:t", A)
    agent.deploy(svc())
    move(tags, "localhost/x:t", B)
    st = agent.deploy(svc())
    r = agent.rollouts.of("shop")
    assert r is not None and r.components == ("web",) and st["rollout"]["version"] == 2
    reverter(agent)("shop", 1, "web failed")   # what a failed rollout's revert does
    assert world.workloads[("shop", "web")].spec.run_image == A
    assert agent.history("shop")[-1]["image_digests"] == [A]
