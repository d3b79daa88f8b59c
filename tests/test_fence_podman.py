"""The fence's stopping against real podman (issue 18): it kills the running
containers of the node's owner id whose service is not exempt, through podman's API,
and through the CLI when that API does not answer; exempt services (from before
fleet mode, ``failover = "overlap"``) and other owners' containers keep running."""

from __future__ import annotations

from pathlib import Path

from podman_env import PodmanCleanup, containers_conf, podman_cli

from mcp_node import fence
from mcp_node.runtime import LABEL_COMPONENT, LABEL_OWNER, LABEL_SERVICE


def _run(owner: str, service: str, image: str) -> str:
    out = podman_cli("run", "-d", "--name", f"{owner}-{service}", "--label",
                     f"{LABEL_OWNER}={owner}", "--label", f"{LABEL_SERVICE}={service}",
                     "--label", f"{LABEL_COMPONENT}=web", image, check=True)
    return out.stdout.strip()


def _state(cid: str) -> str:
    return podman_cli("inspect", "--format", "{{.State.Status}}", cid, check=True
                      ).stdout.strip()


def test_fence_kills_fleet_placed_containers_only(podman_socket: str, podman_owner: str,
                                                  podman_cleanup: PodmanCleanup,
                                                  hello_image: str, tmp_path: Path) -> None:
    other = podman_cleanup.add(podman_owner + "x")
    fenced = _run(podman_owner, "moved", hello_image)
    kept = _run(podman_owner, "keep", hello_image)
    foreign = _run(other, "moved", hello_image)
    beat = fence.Beat(deadline=0.0, owner=podman_owner, ttl=2, podman=podman_socket,
                      exempt=["keep"])
    assert fence.enforce(tmp_path, beat) == 1
    assert _state(fenced) in ("exited", "stopped")
    assert _state(kept) == "running" and _state(foreign) == "running"
    assert fence.enforce(tmp_path, beat) == 0          # nothing left to kill
    # podman's API gone: the CLI does it
    podman_cli("start", fenced, check=True)
    gone = fence.Beat(deadline=0.0, owner=podman_owner, ttl=2,
                      podman=f"unix://{tmp_path}/no-such.sock",
                      containers_conf=containers_conf(), exempt=["keep"])
    assert fence.enforce(tmp_path, gone) == 1
    assert _state(fenced) in ("exited", "stopped") and _state(kept) == "running"
