"""When podman's records and its storage (or the agent's own files) disagree: what the
container runtime clears, and how it proves each thing is ours before it does.

Each function is handed the runtime's own REST request, CLI call and inspect, so the
commands it makes are logged and counted with the rest; it returns whether it
cleared something (the runtime then looks for leftovers again).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from .podmanargs import bind_mounts, is_workload_name
from .runtime import LABEL_OWNER
from .secretfiles import SecretDirs

log = logging.getLogger("mcp_node.podman")

Request = Callable[..., Any]
Cli = Callable[..., None]
Inspect = Callable[[str], "dict[str, Any] | None"]


def clear_storage_gone(request: Request, cli: Cli, owner: str, name: str, why: str) -> bool:
    """A container of ours whose storage is gone (inspect fails, start fails, REST
    remove may too): remove it by name so the name can be used again.

    Ours: an exact-name entry in our owner's listing (the listing still has its
    labels). Anything else is left alone and the error stands.
    """
    if not is_workload_name(name):
        return False
    filters = json.dumps({"label": [f"{LABEL_OWNER}={owner}"], "name": [f"^{name}$"]})
    resp = request("GET", "/containers/json", f"list {name}",
                   params={"all": "true", "filters": filters})
    entries = resp.json() if resp.status_code < 400 else []
    if not any(name in (e.get("Names") or []) for e in entries or []):
        return False
    log.warning("podman: container %s is ours but its storage is gone (%s); removing it",
                name, why)
    cli("rm", "--force", name)
    return True


def clear_storage_only(inspect: Inspect, cli: Cli, name: str) -> bool:
    """The name is held by a container only podman's storage knows (the service died
    mid-create): libpod has no such container, so it has no labels to check;
    our workload names are ours by construction."""
    if not is_workload_name(name) or inspect(name) is not None:
        return False
    log.warning("podman: name %s is held by a storage-only container; removing it", name)
    cli("rm", "--force", "--storage", name)
    return True


def reap_secret_dirs(dirs: SecretDirs, entries: list[dict[str, Any]], owner: str,
                     inspect: Inspect) -> None:
    """Secret files no container of ours mounts (a crash between writing them and the
    create), judged from a listing of every container (``entries``): removed. Only
    when there are any to judge, so the usual cost is a directory listing; a container
    whose files went is made anew at its start."""
    if not dirs.leftovers(vm=False):
        return
    mine = [str(e.get("Id")) for e in entries
            if (e.get("Labels") or {}).get(LABEL_OWNER) == owner]
    in_use = [host for cid in mine for host, _ in bind_mounts(inspect(cid) or {})]
    dirs.reap(dirs.leftovers(vm=False, in_use=in_use))
