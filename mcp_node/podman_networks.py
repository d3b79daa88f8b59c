"""A service's podman network in bridge mode (issue 23): CNI's bridge plugin on the
bridge the agent made (``network_interface``), the service's /24 and gateway, and no
podman DNS (the service's own resolver answers names, for VMs too). The CNI plugin
never deletes a bridge it did not create, so the VMs' TAPs on it are safe."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .errors import WorkloadError
from .netplan import ServiceNet, network_name
from .podmanargs import response_message
from .runtime import LABEL_SERVICE

Request = Callable[..., Any]   # PodmanRuntime._request(method, path, what, **kwargs)


def create_body(net: ServiceNet) -> dict[str, Any]:
    return {"name": network_name(net.service), "driver": "bridge",
            "network_interface": net.bridge, "dns_enabled": False, "internal": False,
            "subnets": [{"subnet": net.subnet, "gateway": net.gateway}],
            "labels": {LABEL_SERVICE: net.service}}


def ensure(request: Request, net: ServiceNet, clear: Callable[[], None]) -> None:
    """Create the network unless it exists. ``clear`` runs first when it does not:
    podman refuses a subnet an interface already holds, so the bridge's address is
    taken off for the create (the caller puts it back)."""
    name = network_name(net.service)
    resp = request("GET", f"/networks/{name}/json", f"network inspect {name}")
    if resp.status_code == 200:
        return
    clear()
    resp = request("POST", "/networks/create", f"network create {name}",
                   data=json.dumps(create_body(net)),
                   headers={"content-type": "application/json"})
    if resp.status_code >= 400:
        raise WorkloadError(f"podman network create {name}: {response_message(resp)}")


def names(request: Request) -> set[str]:
    """Every service network there is, by name: one listing, whatever their number."""
    resp = request("GET", "/networks/json", "network ls",
                   params={"filters": json.dumps({"label": [LABEL_SERVICE]})})
    if resp.status_code >= 400:
        raise WorkloadError(f"podman network ls: {response_message(resp)}")
    return {str(n.get("name", "")) for n in resp.json()}


def remove(request: Request, service: str) -> None:
    name = network_name(service)
    resp = request("DELETE", f"/networks/{name}", f"network rm {name}",
                   params={"force": "true"})
    if resp.status_code not in (200, 204, 404):
        raise WorkloadError(f"podman network rm {name}: {response_message(resp)}")
