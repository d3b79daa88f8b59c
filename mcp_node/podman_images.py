"""Images on podman's REST API: what a reference resolves to, and removing one the
agent no longer keeps (issue 19, images that move).

A component runs the image ID its reference resolved to at deploy time
(``WorkloadSpec.image_digest``), so a later retag of the reference cannot change
what a restart runs. Every call is logged by the runtime's REST wrapper; the pulls
and removals here are logged again at info level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from .errors import ImageError, WorkloadError

log = logging.getLogger("mcp_node.podman")

Request = Callable[..., Any]   # PodmanRuntime._request(method, path, what, **kwargs)


def image_digest(image_id: str) -> str:
    """podman's image ID as the digest the agent records: ``sha256:<64 hex>``."""
    return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"


def image_path(ref: str, tail: str) -> str:
    return f"/images/{quote(ref, safe='')}/{tail}"


def present(request: Request, ref: str) -> bool:
    return bool(request("GET", image_path(ref, "exists"), f"exists {ref}").status_code == 204)


def inspect_id(request: Request, ref: str) -> str:
    """The image ID ``ref`` names now, as ``sha256:<hex>``; ImageError when none."""
    resp = request("GET", image_path(ref, "json"), f"inspect image {ref}")
    if resp.status_code >= 400:
        raise ImageError(f"image {ref} is not present after the pull "
                         f"(podman answered {resp.status_code})")
    image_id = str((resp.json() or {}).get("Id") or "")
    if not image_id:
        raise ImageError(f"podman reports no ID for image {ref}")
    return image_digest(image_id)


def gone_message(ref: str, digest: str) -> str:
    return (f"image {ref} at {digest} is no longer on this node (pruned or removed); "
            "nothing was changed. Deploy a definition without that digest, or load that "
            "image again")


def resolve(request: Request, pull: Callable[[str], None], ref: str, pinned: str,
            always: bool) -> str:
    """The digest to run: ``pinned`` if it is here (ImageError naming both otherwise),
    else what ``ref`` means after pulling it when missing or ``always``."""
    if pinned:
        if not present(request, pinned):
            raise ImageError(gone_message(ref, pinned))
        return pinned
    if always or not present(request, ref):
        pull(ref)
    return inspect_id(request, ref)


def remove(request: Request, digest: str, names: frozenset[str]) -> str:
    """Remove ``digest`` unless a name it has is not in ``names`` or a container uses it
    (podman refuses, since the removal is not forced); "" when removed, else why not."""
    try:
        resp = request("GET", image_path(digest, "json"), f"inspect image {digest}")
        if resp.status_code == 404:
            return "not present"
        if resp.status_code >= 400:
            return f"inspect answered {resp.status_code}"
        tags = set((resp.json() or {}).get("RepoTags") or [])
        foreign = sorted(tags - names)
        if foreign:
            return f"it also has the name {foreign[0]}"
        log.info("podman: remove image %s (names %s)", digest, sorted(tags))
        resp = request("DELETE", f"/images/{quote(digest, safe='')}", f"remove image {digest}",
                       params={"force": "false"})
    except (WorkloadError, ValueError) as exc:
        return str(exc)
    if resp.status_code >= 400:
        return f"podman refused ({resp.status_code}): in use or still referenced"
    return ""
