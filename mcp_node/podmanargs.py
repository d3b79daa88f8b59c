"""What podman is told and how its answers are read: pure functions, unit-tested
without podman (the podman-compose way: argument builders apart from the calls).

``create_kwargs`` builds podman-py's create arguments for one WorkloadSpec;
``workload_from_list`` / ``workload_from_inspect`` read podman's JSON back
into ``Workload`` records; the rest names what is ours and what went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from podman.errors import APIError

from .causes import transport_cause
from .errors import ValidationError
from .grammar import Volume, parse_env, parse_volumes
from .runtime import (
    LABEL_COMPONENT,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_SERVICE,
    Workload,
    WorkloadSpec,
    key_from_name,
)
from .runtimenames import CONTAINER
from .states import RUNNING, STOPPED, State

RUNTIME_NAME = CONTAINER.name    # this runtime's key in runtime.RUNTIMES
LOOPBACK = "127.0.0.1"
LABEL_SPEC = "mcp.spec"          # WorkloadSpec.digest of what the container was made from
EXITED = ("exited", "stopped")   # podman states in which ExitCode means something


def owner_labels(spec: WorkloadSpec, owner: str) -> dict[str, str]:
    return {
        LABEL_MANAGED: "true",
        LABEL_SERVICE: spec.service,
        LABEL_COMPONENT: spec.component,
        LABEL_OWNER: owner,
        LABEL_SPEC: spec.digest,
    }


def env_dict(env: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` items to the mapping podman-py sends (a later key wins, as in a shell)."""
    return dict(parse_env(env))


def volume_binds(volumes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``/host:/guest[:opt,opt]`` items to podman-py's bind-mount form."""
    return binds(parse_volumes(volumes))


def binds(volumes: tuple[Volume, ...]) -> dict[str, dict[str, Any]]:
    return {v.host: {"bind": v.guest, "extended_mode": list(v.options)} for v in volumes}


def bind_mounts(attrs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(host path, guest path) of a container's bind mounts, from its inspect data."""
    return [(str(m.get("Source", "")), str(m.get("Destination", "")))
            for m in attrs.get("Mounts") or []
            if isinstance(m, Mapping) and m.get("Type") == "bind"]


def create_kwargs(spec: WorkloadSpec, owner: str,
                  volumes: tuple[Volume, ...] | None = None, *,
                  env: tuple[str, ...] | None = None,
                  secret_files: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``podman_client.containers.create`` for one component.

    Ports are published on 127.0.0.1 only, host port p to container port p,
    because the component listens on the $PORT it was given; on a service network the
    host port is a DNAT rule to its address instead (as a bridged VM's), so a start-first
    replace's new workload listens on the same port at its own address and the switch
    moves the rule. No restart policy:
    podman restarting a crashing container itself would hide the crash loop
    from the agent, which applies ``spec.restart`` with backoff instead.
    ``volumes``: the spec's volumes with their host paths resolved just now
    (grammar.resolve_volumes); the runtime always passes them, so podman is given
    the path that was checked, not one a symlink could redirect. ``env``: the spec's
    env with its ``secret:NAME`` values put in (secretfiles.resolved_env);
    ``secret_files``: name -> host file, each bound read-only at /run/secrets/<name>.
    """
    kwargs: dict[str, Any] = {
        "image": spec.run_image,
        "name": spec.name,
        "labels": owner_labels(spec, owner),
        "environment": env_dict(spec.env if env is None else env),
        # bridge mode: the agent's DNAT rule (nftrules), which a start-first switch moves
        "ports": {} if spec.net is not None else {f"{p}/tcp": (LOOPBACK, p)
                                                 for p in spec.ports},
        "stop_timeout": max(0, int(round(spec.stop_timeout_s))),
    }
    if spec.cmd:
        kwargs["command"] = list(spec.cmd)
    vols = volumes if volumes is not None else parse_volumes(spec.volumes)
    if vols or secret_files:
        kwargs["volumes"] = {**binds(vols), **{
            host: {"bind": f"/run/secrets/{name}", "extended_mode": ["ro"]}
            for name, host in (secret_files or {}).items()}}
    if spec.memory_mb:
        kwargs["mem_limit"] = f"{spec.memory_mb}m"
    if spec.net is not None:   # bridge mode: its service's network, a fixed address
        kwargs.update(network_mode="bridge",
                      networks={spec.net.network: {"static_ips": [spec.net.address]}},
                      dns=[spec.net.gateway], dns_search=[spec.net.search])
    return kwargs


def create_payload(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The libpod create body for ``create_kwargs``, rendered the way podman-py renders
    it (its ``_render_payload``), so the agent can POST it itself: podman-py's
    ``containers.create`` inspects the new container again, a call that costs ~100 ms
    while podman holds its lock, and the agent inspects once after start anyway."""
    from podman.domain.containers_create import CreateMixin

    payload: dict[str, Any] = CreateMixin._render_payload(dict(kwargs))
    if payload.get("cni_networks") == [None]:
        # podman-py renders no ``network`` as [None]: a network named "", which podman
        # 4.3 looks up as an ID prefix, ambiguous ("more than one result for network
        # ID") as soon as the host has a second network.
        del payload["cni_networks"]
    return payload


def owner_filters(owner: str, service: str | None = None) -> str:
    """The ``filters`` query value selecting one owner's containers (of one service)."""
    labels = [f"{LABEL_OWNER}={owner}"]
    return json.dumps({"label": labels if service is None else
                       [*labels, f"{LABEL_SERVICE}={service}"]})


def parse_time(value: Any) -> float | None:
    """Unix time from podman's ints or RFC 3339 strings with nanoseconds; None if unset."""
    if isinstance(value, int | float):
        return float(value) if value > 0 else None
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    text = value.replace("Z", "+00:00")
    if "." in text:   # Python parses at most microseconds
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _state(raw: str) -> State:
    """podman's status word (running, exited, created, paused, ...) to ours."""
    return RUNNING if raw == "running" else STOPPED


def _exit_code(raw: str, value: Any) -> int | None:
    """The last exit code, only for a container that has exited (a created one has none)."""
    if raw not in EXITED or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def is_workload_name(name: str) -> bool:
    """``mcp-<service>-<component>`` with valid names: the only names we ever clear."""
    parts = name.split("-")
    return len(parts) >= 3 and parts[0] == "mcp" and all(
        p and p.isascii() and all(c.islower() or c.isdigit() for c in p) for p in parts[1:])


def workload_from_list(entry: Mapping[str, Any]) -> Workload | None:
    """One ``containers/json`` entry; None if it lacks the service/component labels."""
    labels = entry.get("Labels") or {}
    service, component = labels.get(LABEL_SERVICE), labels.get(LABEL_COMPONENT)
    if not service or not component:
        return None
    raw = str(entry.get("State", ""))
    names = entry.get("Names") or []
    return Workload(
        service=service, component=key_from_name(str(names[0]) if names else "", service,
                                                  component),
        runtime=RUNTIME_NAME, state=_state(raw),
        id=str(entry.get("Id", "")), image=str(entry.get("Image", "")),
        started_at=parse_time(entry.get("StartedAt")),
        restart_count=int(entry.get("Restarts") or 0),
        spec_digest=str(labels.get(LABEL_SPEC, "")),
        exit_code=_exit_code(raw, entry.get("ExitCode")),
        extra={
            "name": names[0] if names else "",
            "status": raw,
            "exit_code": entry.get("ExitCode"),
            "host_ports": sorted(int(p["host_port"]) for p in entry.get("Ports") or []
                                 if p.get("host_port")),
            "labels": dict(labels),
        },
    )


# podman's words for a mistake in the definition: a 400 naming the field, not a 502.
# servicedef checks these first; this is the backstop for anything it lets through.
CLIENT_MISTAKES = (
    ("invalid reference", "image"), ("invalid image name", "image"),
    ("repository name must", "image"), ("invalid option", "volumes"),
    ("invalid mount option", "volumes"), ("unrecognized mount option", "volumes"),
    ("invalid volume", "volumes"),
)


def client_mistake(message: str, component: str) -> ValidationError | None:
    low = message.lower()
    for words, field in CLIENT_MISTAKES:
        if words in low:
            return ValidationError(f"component {component}: podman refused it: {message[:300]}",
                                   field)
    return None


def workload_from_inspect(attrs: Mapping[str, Any]) -> Workload | None:
    """One ``containers/{name}/json`` answer; None if it lacks the service/component labels."""
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    service, component = labels.get(LABEL_SERVICE), labels.get(LABEL_COMPONENT)
    if not service or not component:
        return None
    st = attrs.get("State") or {}
    raw = str(st.get("Status", ""))
    bindings = (attrs.get("HostConfig") or {}).get("PortBindings") or {}
    host_ports = sorted(int(b["HostPort"]) for bs in bindings.values() for b in bs or []
                        if b.get("HostPort"))
    return Workload(
        service=service, component=key_from_name(str(attrs.get("Name", "")), service,
                                                  component),
        runtime=RUNTIME_NAME, state=_state(raw),
        id=str(attrs.get("Id", "")), image=str(attrs.get("ImageName") or attrs.get("Image", "")),
        started_at=parse_time(st.get("StartedAt")),
        restart_count=int(attrs.get("RestartCount") or 0),
        spec_digest=str(labels.get(LABEL_SPEC, "")),
        exit_code=_exit_code(raw, st.get("ExitCode")),
        extra={
            "name": str(attrs.get("Name", "")),
            "status": raw,
            "exit_code": st.get("ExitCode"),
            "host_ports": host_ports,
            "labels": dict(labels),
        },
    )


def error_message(exc: BaseException) -> str:
    """podman's own message; for a transport failure, what the socket said (in a few
    words, not podman-py's repr of the exceptions it wraps)."""
    text = str(exc.explanation) if isinstance(exc, APIError) and exc.explanation else ""
    cause = exc.__cause__
    if isinstance(exc, APIError) and exc.response is None and cause is not None:
        text = f"{text}: {transport_cause(cause)}" if text else transport_cause(cause)
    return text or str(exc) or type(exc).__name__


def response_message(resp: Any) -> str:
    try:
        body = resp.json()
        return str(body.get("message") or body.get("cause") or resp.text)
    except ValueError:
        return str(resp.text)[:500]


# --------------------------------------------------------------------------- the runtime
