"""Images that move (issue 19, item 4) on real podman, in-process agent: a tag moved
with ``podman tag`` is an ``image_digest`` change in the plan, a deploy replaces the
container with the new image, and ``rollback`` returns to the first image by its ID
although the tag names the second; ``pull = "always"`` / ``--pull`` of a reference that
cannot be pulled (a registry on 127.0.0.1 where nothing listens) fails naming it and
changes nothing; images of versions beyond ``keep_versions`` are removed, only those.
No test reaches outside the machine (tests/egress.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from egress import no_egress
from podman_env import free_port, podman_cli

from mcp_node.agent import Agent
from mcp_node.clictx import LocalBackend
from mcp_node.config import AgentConfig, ImagesConfig
from mcp_node.errors import ImageError
from mcp_node.runtime import workload_name
from mcp_node.servicedef import ServiceDef, from_dict


def image_id(ref: str) -> str:
    proc = podman_cli("image", "inspect", "--format", "{{.Id}}", ref)
    return "sha256:" + proc.stdout.strip() if proc.returncode == 0 else ""


def container_image(service: str) -> str:
    proc = podman_cli("inspect", "--format", "{{.Image}}", workload_name(service, "web"))
    assert proc.returncode == 0, proc.stderr
    return "sha256:" + proc.stdout.strip()


def container_id(service: str) -> str:
    return podman_cli("inspect", "--format", "{{.Id}}",
                      workload_name(service, "web")).stdout.strip()


def defn(service: str, image: str, **web: Any) -> ServiceDef:
    return from_dict({"name": service, "components": [
        {"name": "web", "image": image, "check": "none", **web}]})


@pytest.fixture
def agent(podman_config: AgentConfig, podman_cleanup: Any,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    no_egress(monkeypatch)
    a = Agent(replace(podman_config, images=ImagesConfig(keep_versions=2)))
    podman_cleanup.add(a.owner)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def names() -> Iterator[list[tuple[str, str]]]:
    """(image, name) pairs a test added: only those names are removed afterwards."""
    made: list[tuple[str, str]] = []
    yield made
    for image, name in made:
        podman_cli("untag", image, name)


def tag(made: list[tuple[str, str]], source: str, name: str) -> None:
    podman_cli("tag", source, name, check=True)
    made.append((image_id(name), name))


def test_a_moved_tag_is_planned_rolled_out_and_rolled_back_by_digest(
        agent: Agent, hello_images: dict[str, str], names: list[tuple[str, str]]) -> None:
    v1, v2 = image_id(hello_images["v1"]), image_id(hello_images["v2"])
    assert v1 and v2 and v1 != v2
    service, ref = f"mv{uuid.uuid4().hex[:8]}", f"localhost/mcp-move-{uuid.uuid4().hex[:8]}:t"
    tag(names, hello_images["v1"], ref)
    agent.deploy(defn(service, ref))
    assert container_image(service) == v1
    assert agent.plan(defn(service, ref))["changed"] is False
    first = container_id(service)

    tag(names, hello_images["v2"], ref)   # the tag moves; nothing else changes
    p = LocalBackend(agent).call("plan", defn(service, ref).to_dict(), None)
    assert [(c["action"], c["fields"]) for c in p["changes"]] == [
        ("replace", [{"field": "image_digest", "from": v1, "to": v2}])]
    agent.deploy(defn(service, ref))
    assert container_image(service) == v2 and container_id(service) != first
    agent.restart(service)
    assert container_image(service) == v2
    assert [h["image_digests"] for h in agent.history(service)] == [[v1], [v2]]

    agent.rollback(service)
    assert image_id(ref) == v2                   # the tag still names v2...
    assert container_image(service) == v1        # ...and v1 runs again, by its ID
    assert agent.history(service)[-1]["image_digests"] == [v1]
    agent.restart(service)                       # a restart runs what was resolved, not
    assert container_image(service) == v1        # what the tag names now
    agent.stop(service)
    agent.start(service)
    assert container_image(service) == v1
    agent.undeploy(service)


def test_pull_always_of_an_unreachable_registry_fails_and_changes_nothing(
        agent: Agent, hello_images: dict[str, str], names: list[tuple[str, str]]) -> None:
    service = f"pl{uuid.uuid4().hex[:8]}"
    ref = f"127.0.0.1:{free_port()}/mcp-pull-{uuid.uuid4().hex[:8]}:t"   # nothing listens
    tag(names, hello_images["v1"], ref)
    agent.deploy(defn(service, ref))          # pull = "missing": present, not pulled
    before = (container_id(service), agent.registry.get_service(service),
              agent.history(service))
    backend = LocalBackend(agent)
    attempts = [lambda: agent.deploy(defn(service, ref, pull="always")),
                lambda: backend.call("deploy", defn(service, ref).to_dict(), True),
                lambda: backend.call("plan", defn(service, ref).to_dict(), True)]
    for attempt in attempts:
        with pytest.raises(ImageError, match=f"cannot pull image {ref}"):
            attempt()
    assert (container_id(service), agent.registry.get_service(service),
            agent.history(service)) == before
    assert container_image(service) == image_id(hello_images["v1"])
    agent.undeploy(service)


def test_images_beyond_keep_versions_are_pruned_and_only_those(
        agent: Agent, hello_images: dict[str, str], names: list[tuple[str, str]],
        tmp_path: Path) -> None:
    service, u = f"pr{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    ref, mine = f"localhost/mcp-prune-{u}:t", f"localhost/mcp-user-{u}:keep"
    built: list[str] = []
    try:
        for i in range(3):   # three images of their own (a label apart), the tag moved on
            (tmp_path / "Containerfile").write_text(
                f"FROM {hello_images['v1']}\nLABEL mcp.test={u}-{i}\n")
            proc = podman_cli("build", "--pull=never", "-q", "-t", ref, str(tmp_path),
                              timeout=300)
            assert proc.returncode == 0, proc.stderr
            built.append(image_id(ref))
            if i == 2:       # a name of the user's keeps the oldest image
                podman_cli("tag", built[0], mine, check=True)
            agent.deploy(defn(service, ref))
            agent.images.wait(60)
        assert all(image_id(b) for b in built)
        assert agent.images.removed == []

        podman_cli("untag", built[0], mine, check=True)
        assert agent.images.prune() == [built[0]]
        assert not image_id(built[0])
        assert image_id(built[1]) and image_id(built[2])
        assert image_id(hello_images["v1"])      # never one the agent did not record
        assert container_image(service) == built[2]
    finally:
        agent.undeploy(service)
        for b in built:
            podman_cli("rmi", b)


def test_a_vm_component_resolves_to_its_oci_images_id_and_extracts_from_it(
        hello_images: dict[str, str], names: list[tuple[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The unikernel runtime's side, without a boot: the ELF's image by ID."""
    from podman_env import containers_conf

    from mcp_node.config import from_dict as config_from_dict
    from mcp_node.qemu import QemuRuntime
    from mcp_node.runtime import WorkloadSpec

    no_egress(monkeypatch)
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "st")},
                            "podman": {"containers_conf": containers_conf()}})
    rt = QemuRuntime(cfg, cfg.state_dir, "test-owner")
    v1, v2 = image_id(hello_images["v1"]), image_id(hello_images["v2"])
    ref = f"localhost/mcp-vmmove-{uuid.uuid4().hex[:8]}:t"
    tag(names, hello_images["v1"], ref)
    spec = WorkloadSpec("vmmove", "vm", ref, memory_mb=128)
    assert rt.resolve(spec) == v1
    tag(names, hello_images["v2"], ref)
    assert rt.resolve(spec) == v2
    pulled, elf = rt._elf(replace(spec, image_digest=v1))   # what run extracts from
    assert "sha256:" + pulled.image_id == v1 and elf.is_file()
    assert rt.resolve(replace(spec, image_digest=v1)) == v1
    gone = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match=f"image {ref} at {gone} is no longer on this node"):
        rt.resolve(replace(spec, image_digest=gone))
    unpullable = f"127.0.0.1:{free_port()}/mcp-vmmove:t"
    with pytest.raises(ImageError, match=f"cannot pull image {unpullable}"):
        rt.resolve(replace(spec, image=unpullable), always=True)
