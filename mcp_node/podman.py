"""Container runtime: podman-py against podman's REST socket.

The agent talks to the socket named in ``[podman] socket``; when none is set
or it does not answer, it starts ``podman system service`` on a socket in its
own state directory (``PodmanService``). Connecting is lazy, so an agent can be
built on a node without podman and report why in ``available()``.

Every container is named ``workload_name(service, component)`` and labelled
``mcp.managed``, ``mcp.service``, ``mcp.component``, ``mcp.owner`` and
``mcp.spec`` (the ``WorkloadSpec.digest`` it was made from, so spec drift is
seen from one listing); the runtime only lists, replaces, stops or removes
containers carrying its own owner label, so a user's container of the same
name is never touched. Containers get no podman restart policy: the agent's
reconciler restarts them with backoff, so a crash loop is seen, not hidden.

Two kinds of podman breakage would otherwise block a name for good: a
storage-only container (the service killed mid-create: only ``podman ps
--external`` shows it) and a ``Created`` container whose storage is gone
(``podman rm -f`` racing a create: inspect answers 500). Both are cleared by
name through the podman CLI (logged), for our own workload names only.

``list()`` is one ``containers/json`` request whatever the number of
containers (podman-py's ``containers.list`` is not used, since a non-sparse
listing inspects each container); ``api_calls`` counts every REST request so a
benchmark can show it.

``close()`` stops the podman service only if this runtime started (or adopted,
after an agent restart) it for its state directory; a configured socket is
left alone. Containers survive either way: conmon, not the service, owns them.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from podman import PodmanClient
from podman.errors import PodmanError

from . import podman_images, podman_networks
from .config import AgentConfig
from .errors import (
    ConflictError,
    HostPathError,
    ImageError,
    NotFoundError,
    RuntimeUnavailable,
    WorkloadError,
)
from .grammar import Volume, parse_volumes, resolve_volumes, volume_roots
from .mounts import Ident, mounted_ident, moved_source, path_ident
from .netplan import ServiceNet
from .podman_leftovers import Leftovers, conmons
from .podman_logread import ContainerLog
from .podman_repair import clear_storage_gone, clear_storage_only, reap_secret_dirs
from .podman_service import (
    PodmanService,
    run_cli,
    socket_answers,
    socket_path,
    socket_url,
)
from .podmanargs import (
    RUNTIME_NAME,
    bind_mounts,
    client_mistake,
    create_kwargs,
    create_payload,
    error_message,
    is_workload_name,
    owner_filters,
    response_message,
    workload_from_inspect,
    workload_from_list,
)
from .registries import Registries, classify
from .runtime import (
    LABEL_OWNER,
    NEXT,
    OLD,
    Runtime,
    Workload,
    WorkloadSpec,
    side_key,
    workload_name,
)
from .runtimenames import CONTAINER
from .secretfiles import SecretDirs, file_values, resolved_env, uses_secrets

__all__ = ["PodmanRuntime", "PodmanService"]

log = logging.getLogger("mcp_node.podman")

REQUEST_TIMEOUT_S = 120.0        # any single REST call; stop adds its own grace time
AVAILABLE_CACHE_S = 10.0         # a call that succeeded this recently proves podman is up
# podman's words for a name held by a storage-only container, and for a container whose
# storage is gone (podman 4.3; matched loosely, the checks around them are strict).
EXIT_FILE_WAIT = "timed out waiting for file"   # podman's words when conmon's exit file lags
NAME_IN_USE = ("already in use", "is in use")   # podman words it both ways
STORAGE_GONE = ("container not known", "no such file or directory", "getting container from store")
REMOVED_MEANWHILE = "does not exist in database: no such container"


class PodmanRuntime(Runtime):
    """Containers under podman, each one a workload (see mcp_node.runtime.Runtime)."""

    traits = CONTAINER
    name = RUNTIME_NAME

    def __init__(self, config: AgentConfig, state_dir: Path, owner: str) -> None:
        if not owner:
            raise ValueError("owner must not be empty")
        self.config = config
        self.owner = owner
        self.configured_url = socket_url(config.podman.socket) if config.podman.socket else ""
        self.registries = Registries(config.registries, state_dir)
        self.service = PodmanService(
            state_dir / "podman",
            config.podman.containers_conf or os.environ.get("CONTAINERS_CONF", ""),
            home=self.registries.prepare_home)
        self.volume_roots = volume_roots(config.podman.volume_roots, state_dir)
        self.secret_dirs = SecretDirs(config.secrets, owner)   # secret files, on a tmpfs
        self.url = ""
        self._client: PodmanClient | None = None
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._api_calls = 0
        self._listings = 0
        self._last_ok = float("-inf")
        # After every (re)connect: leftovers of a service killed mid-create/start.
        self.leftovers = Leftovers(self.service.directory / "made.ids")
        self._sweep_due = False

    # -- connection

    @property
    def api_calls(self) -> int:
        """REST requests made so far (every one, including pings and streams)."""
        return self._api_calls

    def _count(self) -> None:
        with self._count_lock:
            self._api_calls += 1

    def _client_or_connect(self) -> PodmanClient:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> PodmanClient:
        if self.configured_url and socket_answers(self.configured_url):
            url = self.configured_url
            log.info("podman: using configured socket %s", url)
        else:
            if self.configured_url:
                log.warning("podman: configured socket %s does not answer; starting our own",
                            self.configured_url)
            self.service.ensure()
            url = self.service.url
        try:
            client = PodmanClient(base_url=url, timeout=REQUEST_TIMEOUT_S)
        except (ValueError, PodmanError) as exc:
            raise RuntimeUnavailable(f"podman socket {url}: {exc}") from exc
        original = client.api.request

        def counted(method: str, url_: str, *args: Any, **kwargs: Any) -> Any:
            self._count()
            log.debug("podman REST %s %s %s", method, url_, kwargs.get("params") or "")
            return original(method, url_, *args, **kwargs)

        setattr(client.api, "request", counted)  # noqa: B010 - instance-level wrapper
        self.url = url
        self._sweep_due = True
        return client

    def _drop_client(self) -> None:
        """After a transport failure: reconnect on the next call (restarting our own
        service if it died; a configured socket is pinged again first)."""
        with self._lock:
            if self._client is not None:
                self._client.close()  # type: ignore[no-untyped-call]
            self._client = None
            self._last_ok = float("-inf")

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        """One REST call; transport failures become WorkloadError naming ``what``."""
        client = self._client_or_connect()
        try:
            resp = getattr(client.api, method.lower())(path, **kwargs)
        except (OSError, PodmanError) as exc:
            self._drop_client()
            raise WorkloadError(f"podman {what}: {error_message(exc)}") from exc
        self._last_ok = time.monotonic()
        return resp

    def available(self) -> tuple[bool, str]:
        """Answered from the last successful call when recent, else by one ``/_ping``."""
        if self._client is not None and time.monotonic() - self._last_ok < AVAILABLE_CACHE_S:
            return True, ""
        if shutil.which(self.service.podman) is None and not (
                self.configured_url and socket_answers(self.configured_url)):
            return False, f"podman binary {self.service.podman!r} not found on PATH"
        try:
            resp = self._request("GET", "/_ping", "ping", timeout=5)
        except (RuntimeUnavailable, WorkloadError) as exc:
            return False, str(exc)
        if resp.status_code != 200:
            return False, f"podman ping answered {resp.status_code}"
        return True, ""

    def health_reasons(self) -> builtins.list[str]:
        """A configured socket that did not answer: we run on a fallback service."""
        if self.configured_url and self.url and self.url != self.configured_url:
            return [f"podman: configured socket {self.configured_url} does not answer; "
                    f"using the agent's own podman service on {self.url}",
                    *self.leftovers.reasons()]
        return self.leftovers.reasons()

    def info(self) -> dict[str, Any]:
        """For the agent's health: where podman is, and the REST calls made so far."""
        return {
            "socket": self.url or self.configured_url or self.service.url,
            "service_pid": self.service.pid,
            "api_calls": self._api_calls,
            "listings": self._listings,
        }

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()  # type: ignore[no-untyped-call]
            self._client = None
        self.service.stop()

    # -- containers

    def _inspect_raw(self, name: str) -> dict[str, Any] | None:
        resp = self._request("GET", f"/containers/{name}/json", f"inspect {name}")
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            message = response_message(resp)
            if REMOVED_MEANWHILE in message:   # removed between podman's lookup and read
                return None
            if any(w in message for w in STORAGE_GONE) and self._clear_storage_gone(
                    name, message):
                return None
            raise WorkloadError(f"podman inspect {name}: {message}")
        data: dict[str, Any] = resp.json()
        return data

    def _cli(self, *args: str) -> None:
        """One podman CLI call (logged); a failure is a WorkloadError with its stderr."""
        proc = run_cli(self.service.podman, self.service.containers_conf, *args)
        if proc.returncode != 0:
            raise WorkloadError(f"podman {' '.join(args)}: {proc.stderr.strip()[-500:]}")

    def _clear_storage_gone(self, name: str, why: str) -> bool:
        cleared = clear_storage_gone(self._request, self._cli, self.owner, name, why)
        self._sweep_due = self._sweep_due or cleared
        return cleared

    def _clear_storage_only(self, name: str) -> bool:
        cleared = clear_storage_only(self._inspect_raw, self._cli, name)
        self._sweep_due = self._sweep_due or cleared
        return cleared

    def _owned(self, name: str) -> dict[str, Any] | None:
        """The container's inspect data if it is ours; None if missing; Conflict if foreign."""
        attrs = self._inspect_raw(name)
        if attrs is None:
            return None
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_OWNER) != self.owner:
            raise ConflictError(
                f"container {name} exists but is not managed by this agent "
                f"(mcp.owner={labels.get(LABEL_OWNER)!r}); remove or rename it")
        return attrs

    def _stop(self, name: str, timeout: float) -> None:
        log.info("podman: stop %s (timeout %gs)", name, timeout)
        resp = self._request("POST", f"/containers/{name}/stop", f"stop {name}",
                             params={"timeout": max(0, int(round(timeout)))},
                             timeout=timeout + 60)
        if resp.status_code in (204, 304, 404):
            return
        message = response_message(resp)
        # Under load podman may time out waiting for conmon's exit file after the process
        # has ended: what counts is whether the container still runs.
        attrs = self._inspect_raw(name) if EXIT_FILE_WAIT in message else None
        state = str(((attrs or {}).get("State") or {}).get("Status", ""))
        if attrs is not None and state not in ("running", "stopping"):
            log.warning("podman: stop %s reported %r; it is %s, so stopped", name, message, state)
            return
        raise WorkloadError(f"podman stop {name}: {message}")

    def _delete(self, name: str, cid: str = "") -> None:
        """Remove ours; then end a conmon + ``runc init`` of its id that podman's remove
        missed (its service was killed while it started it: podman_leftovers)."""
        log.info("podman: remove %s", name)
        resp = self._request("DELETE", f"/containers/{name}", f"remove {name}",
                             params={"force": "true", "v": "true"})
        if resp.status_code not in (200, 204, 404):
            self._sweep_due = True   # whatever removes it later: look again then
            raise WorkloadError(f"podman remove {name}: {response_message(resp)}")
        self.leftovers.removed(name, cid)

    def _sweep(self) -> None:
        """Conmons under our workload names, and containers we made, that podman does
        not know. Listed after the scan, so a container made meanwhile is known."""
        self._sweep_due = False
        found = [c for c in conmons() if is_workload_name(c.name)]
        resp = self._request("GET", "/containers/json", "list all containers",
                             params={"all": "true"})
        self._sweep_due = resp.status_code >= 400
        if not self._sweep_due:
            entries = resp.json() or []
            self.leftovers.settle(found, {str(e.get("Id")) for e in entries})
            reap_secret_dirs(self.secret_dirs, entries, self.owner, self._inspect_raw)

    def pull(self, spec: WorkloadSpec) -> None:
        if podman_images.present(self._request, spec.image):
            log.debug("podman: image %s present", spec.image)
            return
        self._pull_ref(spec.image, spec.component)

    def resolve(self, spec: WorkloadSpec, always: bool = False) -> str:
        """The image ID to run (podman_images.resolve)."""
        return podman_images.resolve(self._request,
                                     lambda ref: self._pull_ref(ref, spec.component),
                                     spec.image, spec.image_digest, always)

    def remove_image(self, digest: str, names: frozenset[str]) -> str:
        return podman_images.remove(self._request, digest, names)

    def _pull_ref(self, ref: str, component: str) -> None:
        """The registry's login goes in X-Registry-Auth, never in a log line
        (mcp_node.registries); a refusal names the registry, the image and the key."""
        auth = self.registries.for_image(ref)
        log.info("podman: pull %s%s", ref, f" (login from {auth.cred.source})" if auth.cred
                 else "")
        headers = {"X-Registry-Auth": auth.cred.header()} if auth.cred else None
        resp = self._request("POST", "/images/pull", f"pull {ref}", headers=headers,
                             params={"reference": ref, "quiet": "true"}, stream=True)
        foreign = self.url if self.url == self.configured_url else ""
        try:
            if resp.status_code >= 400:
                message = response_message(resp)
                raise (client_mistake(message, component)
                       or classify(auth, message, component, foreign))
            errors: list[str] = []
            for line in resp.iter_lines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and obj.get("error"):
                    errors.append(str(obj["error"]))
        except OSError as exc:
            raise ImageError(f"cannot pull image {ref}: {exc}") from exc
        finally:
            resp.close()
        if errors:
            raise (client_mistake(errors[-1], component)
                   or classify(auth, errors[-1], component, foreign))

    def run(self, spec: WorkloadSpec) -> Workload:
        """Create and start; a container of that name of ours is replaced. The create is
        tried first, so a new container costs three calls (create, start, inspect).

        The volumes' host paths are resolved and checked against the roots now, and
        podman is given the resolved paths (HostPathError, with nothing changed, when
        one is missing or escapes); they are checked again once it started."""
        name = spec.name
        volumes = resolve_volumes(parse_volumes(spec.volumes), self.volume_roots)
        checked = [(v.guest, path_ident(v.host)) for v in volumes]
        payload, made = self._secret_payload(spec, volumes)
        try:
            try:
                self._create(spec, payload)
            except WorkloadError as exc:
                if not any(words in str(exc) for words in NAME_IN_USE):
                    raise
                if (old := self._owned(name)) is not None:   # ours: replace it
                    self._stop(name, spec.stop_timeout_s)
                    self._delete(name, str(old.get("Id") or ""))
                    self.secret_dirs.release(h for h, _ in bind_mounts(old))
                elif not self._clear_storage_only(name):   # a foreign container: leave it
                    raise
                self._create(spec, payload)                # once: the name is free now
        except BaseException:
            self.secret_dirs.release(made)
            raise
        log.info("podman: start %s", name)
        resp = self._request("POST", f"/containers/{name}/start", f"start {name}")
        if resp.status_code not in (204, 304):
            message = response_message(resp)
            with contextlib.suppress(WorkloadError):
                self._delete(name)   # no half state: a created but unstartable container
            raise WorkloadError(f"podman start {name}: {message}")
        attrs = self._inspect_raw(name)
        if attrs is not None and checked:
            self._check_started(name, attrs, checked, remove=True)
        workload = workload_from_inspect(attrs) if attrs else None
        if workload is None:
            raise WorkloadError(f"podman: container {name} vanished right after start")
        return workload

    def _secret_payload(self, spec: WorkloadSpec, volumes: tuple[Volume, ...]
                        ) -> tuple[dict[str, Any], list[str]]:
        """The create body, with the spec's secrets (issue 20): files written to a new
        tmpfs directory (returned, to release on failure), env values put in. Nothing
        here is logged; podman keeps the env values in the container's config."""
        if not uses_secrets(spec):
            return create_payload(create_kwargs(spec, self.owner, volumes)), []
        files = file_values(spec, self.secret_source)
        env = resolved_env(spec, self.secret_source)
        if not files:
            return create_payload(create_kwargs(spec, self.owner, volumes, env=env)), []
        d = self.secret_dirs.write(spec.name, files)
        return create_payload(create_kwargs(spec, self.owner, volumes, env=env, secret_files={
            n: str(d / n) for n in files})), [str(d)]

    def _create(self, spec: WorkloadSpec, payload: dict[str, Any]) -> None:
        log.info("podman: create %s image=%s ports=%s cmd=%s spec=%s", spec.name, spec.image,
                 list(spec.ports), list(spec.cmd), spec.digest)
        resp = self._request("POST", "/containers/create", f"create {spec.name}",
                             data=json.dumps(payload),
                             headers={"content-type": "application/json"})
        if resp.status_code < 400:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.leftovers.record(spec.name, str(resp.json()["Id"]))
            return
        message = response_message(resp)
        if resp.status_code == 404 or "image not known" in message:
            raise ImageError(f"image {spec.image} {spec.image_digest} is not present: "
                             f"{message}")
        mistake = client_mistake(message, spec.component)
        if mistake is not None:
            raise mistake
        raise WorkloadError(f"podman create {spec.name}: {message}")

    def ensure_network(self, net: ServiceNet, clear: Callable[[], None]) -> None:
        podman_networks.ensure(self._request, net, clear)

    def remove_network(self, service: str) -> None:
        podman_networks.remove(self._request, service)

    def network_names(self) -> set[str]:
        return podman_networks.names(self._request)

    def promote(self, service: str, component: str) -> None:
        """Two renames (podman renames a running container in place): the current one
        to its ``OLD`` name, the ``NEXT`` one to the component's own."""
        own = workload_name(service, component)
        nxt, old = (workload_name(service, side_key(component, s)) for s in (NEXT, OLD))
        if self._owned(nxt) is None:
            raise WorkloadError(f"podman: no {nxt} to promote")
        self.remove(service, side_key(component, OLD))
        if self._owned(own) is not None:
            self._rename(own, old)
        self._rename(nxt, own)

    def _rename(self, name: str, new: str) -> None:
        log.info("podman: rename %s %s", name, new)
        resp = self._request("POST", f"/containers/{name}/rename", f"rename {name}",
                             params={"name": new})
        if resp.status_code >= 400:
            raise WorkloadError(f"podman rename {name} {new}: {response_message(resp)}")

    def stop(self, service: str, component: str, timeout: float = 10.0) -> None:
        name = workload_name(service, component)
        if self._owned(name) is not None:
            self._stop(name, timeout)

    def start(self, service: str, component: str) -> bool:
        """Start the existing container as it is (its log kept); False if there is none,
        or if one of its bind sources no longer is what it was made with (the caller
        then runs it anew, which checks the definition's paths again)."""
        name = workload_name(service, component)
        attrs = self._owned(name)
        if attrs is None or not self._mounts_hold(name, attrs):
            return False
        checked = [(guest, path_ident(host)) for host, guest in bind_mounts(attrs)]
        log.info("podman: start %s", name)
        resp = self._request("POST", f"/containers/{name}/start", f"start {name}")
        if resp.status_code not in (204, 304):
            raise WorkloadError(f"podman start {name}: {response_message(resp)}")
        started = self._inspect_raw(name) if checked else None
        if started is not None:
            self._check_started(name, started, checked, remove=False)
        return True

    def _mounts_hold(self, name: str, attrs: dict[str, Any]) -> bool:
        """podman resolves a bind source again at every start, so a container whose
        source has moved must not be started as it is."""
        hosts = [host for host, _ in bind_mounts(attrs)]
        if any(self.secret_dirs.owns(h) and not os.path.exists(h) for h in hosts):
            log.info("podman: %s: its secret files are gone (a reboot); making it anew", name)
            return False
        moved = moved_source((h for h in hosts if not self.secret_dirs.owns(h)),
                             self.volume_roots)
        if moved:
            log.warning("podman: %s: bind source %s; not starting it as it is", name, moved)
        return not moved

    def _check_started(self, name: str, attrs: dict[str, Any],
                       checked: builtins.list[tuple[str, Ident | None]], remove: bool) -> None:
        """Right after the start, what the container has on each guest path must be the
        directory checked before it: runc follows a directory on the path swapped for a
        symlink in between. Then the container is stopped (a new one removed) at once:
        detected, not prevented, it ran for that moment. A container that has exited, or
        a guest path through a symlink in the image, cannot be looked at and passes."""
        pid = int((attrs.get("State") or {}).get("Pid") or 0)
        for guest, want in checked:
            got = mounted_ident(pid, guest) if pid and want else None
            if got is None or got == want:
                continue
            log.error("podman: %s: %s is not the directory checked before the start; "
                      "stopping it", name, guest)
            with contextlib.suppress(WorkloadError):
                self._stop(name, 0)
                if remove:
                    self._delete(name)
            raise HostPathError(f"{guest} in {name} is not the host directory checked before "
                                "the start (a directory on its host path was swapped while "
                                "it started); stopped it", "volumes")

    def remove(self, service: str, component: str, timeout: float = 10.0) -> None:
        name = workload_name(service, component)
        attrs = self._owned(name)
        if attrs is None:
            return
        if (attrs.get("State") or {}).get("Running"):
            self._stop(name, timeout)
        self._delete(name, str(attrs.get("Id") or ""))
        self.secret_dirs.release(h for h, _ in bind_mounts(attrs))

    def inspect(self, service: str, component: str) -> Workload | None:
        """None for a missing container, and for one that is not ours."""
        try:
            attrs = self._owned(workload_name(service, component))
        except ConflictError:
            return None
        return workload_from_inspect(attrs) if attrs is not None else None

    def list(self, service: str | None = None) -> list[Workload]:
        with self._count_lock:
            self._listings += 1
        resp = self._request("GET", "/containers/json", "list containers",
                             params={"all": "true",
                                     "filters": owner_filters(self.owner, service)})
        if resp.status_code >= 400:
            raise WorkloadError(f"podman list: {response_message(resp)}")
        out = []
        for entry in resp.json() or []:
            workload = workload_from_list(entry)
            if workload is not None:
                out.append(workload)
        if self._sweep_due and service is None:
            self._sweep()
        return out

    def logs(self, service: str, component: str, tail: int | None = None,
             follow: bool = False, max_bytes: int | None = None,
             timestamps: bool = False) -> Iterator[bytes]:
        """A missing (or foreign) container fails here, before any streaming starts;
        how its log is read is ``podman_logread``'s."""
        name = workload_name(service, component)
        attrs = self._owned(name)
        if attrs is None:
            raise NotFoundError(f"no container {name}")
        return ContainerLog(
            name, attrs, request=self._request, inspect=self._inspect_raw,
            counted=self._count, timeout=REQUEST_TIMEOUT_S, socket_file=socket_path(self.url),
            path_prefix=lambda: str(self._client_or_connect().api.path_prefix),
        ).read(tail, follow, max_bytes, timestamps)
