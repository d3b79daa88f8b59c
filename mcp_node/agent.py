"""The node agent: service lifecycle over both runtimes, from one registry.

Order of a deploy, chosen so a failure at any point leaves no half state:
validate (already done by servicedef) -> runtimes available -> images pulled
-> capacity checked -> registry written -> workloads run. If a run fails,
the workloads started by this deploy are removed and the previous registry
record (or none) is put back. A crash after the registry write shows up as
drift on the next start, never as a lost row.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from . import preflight
from .checks import Checks
from .config import AgentConfig
from .converge import Steps, beside_components, in_parallel
from .errors import (
    ConflictError,
    MCPError,
    NotFoundError,
    RuntimeUnavailable,
    ValidationError,
)
from .files import flocked, node_id
from .images import Images
from .monitor import Monitor, View
from .operations import NOT_A_FLEET, STOP_TIMEOUT_S
from .progress import Progress
from .reconcile import Policy, Reconciler
from .records import ComponentRecord, Event, ServiceRecord
from .registry import Registry
from .rollout import Rollouts, changed_components, last_output, new_rollout, reverter
from .rounds import Rounds, prune_history
from .runtime import (
    RUNTIME_NAMES,
    TRAITS,
    Runtime,
    WorkloadSpec,
    load_runtime,
)
from .secretuse import SecretOps, open_store
from .servicedef import (
    ComponentDef,
    ServiceDef,
    check_name,
    route_env,
)
from .servicelocks import ServiceLocks
from .servicenet import ServiceNetworks
from .states import RUNNING, STOPPED, State
from .views import Views

if TYPE_CHECKING:
    from .edge import EdgeManager

log = logging.getLogger("mcp_node.agent")

MAX_STOP_TIMEOUT_S = 3600.0


class Agent(SecretOps):
    """Service lifecycle for one node: the single-node ``operations.Operations``.

    ``runtimes`` maps runtime names to implementations; by default each is
    loaded from ``runtime.RUNTIMES`` on first use. Tests pass fakes here.
    ``monitor`` starts the monitor thread; ``reconcile`` (default: the same)
    makes each monitor round drive the runtimes to the registry. ``node`` is the
    name it goes by (default: the host name). It knows nothing of a fleet: a fleet
    member wraps it (``fleetops``) and subscribes to its rounds.
    """

    write_role = "operator"

    def __init__(self, config: AgentConfig, *, monitor: bool = False,
                 runtimes: Mapping[str, type[Runtime]] | None = None,
                 reconcile: bool | None = None,
                 on_round: Callable[[], None] | None = None,
                 node: str | None = None) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir.chmod(0o700)  # an existing 0755 one too: it holds tokens and keys
        self.registry = Registry(self.state_dir / "registry.db")
        self.registry.events_per_service = config.history.max_events_per_service
        self.secrets = open_store(config, self.registry)   # sealed under the node's key
        self.node = node or socket.gethostname()
        self.owner = node_id(self.state_dir)
        self.started_at = time.monotonic()
        self._impls = dict(runtimes) if runtimes is not None else None
        self._runtimes: dict[str, Runtime] = {}
        self._rt_lock = threading.Lock()
        self.locks = ServiceLocks(self.state_dir / "locks", self._exists)
        self._names_guard = threading.Lock()
        self._edge: EdgeManager | None = None
        self._routes: Any = None   # NodeRoutes, with proxy.serve_routes (issue 11)
        self._front: Any = None    # front.Front: the one Caddy client and ACME account
        self.reconciler = Reconciler(self, Policy(config.monitor.restart_backoff_max_s,
                                                  config.monitor.restart_reset_s))
        # Only the daemon acts on what the monitor sees; ``mcp --local ps`` must not.
        self.reconciling = monitor if reconcile is None else reconcile
        self.views = Views(self)
        # Checks every running component while it runs (issue 19); the reconciler
        # restarts the unhealthy ones.
        self.checks = Checks(self)
        self.reconciler.unhealthy = self.checks.unhealthy
        self.progress = Progress()
        self.nets = ServiceNetworks(config.network, self.registry, self.state_dir,
                                    self.runtime,
                                    {name: t.joins_by for name, t in TRAITS.items()})
        # A start-first replace switches at the node proxy (where it serves routes) and,
        # in bridge mode, the component's names and address (``nets.promote_side``).
        self.steps = Steps(self.runtime, self.spec, self.registry, self.progress,
                           self._switch, self.nets)
        self.rounds = Rounds(self)
        # Health-gated rollouts (issue 19): judged after every monitor round.
        self.rollouts = Rollouts(self.registry, reverter(self), last_output(self))
        self.images = Images(self)   # resolved at each deploy; old ones pruned after it
        # Called after every monitor round with its view: the daemon's watchdog ping,
        # a fleet member's publishing.
        self.round_subscribers: list[Callable[[View], None]] = []
        if on_round is not None:
            self.round_subscribers.append(lambda view: on_round())
        self.monitor = Monitor(self.registry, self._listable, config.monitor,
                               self._after_round)
        self.monitor.digest = self.reconciler.digest   # a crash is an exit of the current spec
        self.monitor.calm_since = self.rollouts.calm_since
        if monitor:
            self.start_monitor()

    def start_monitor(self, reconcile: bool | None = None) -> None:
        """Start the monitor thread; its first round (with reconcile) is done on return.

        The daemon builds the agent without it, binds its listener, checks the registry
        against what the runtimes run, and only then starts it (and so adopts workloads).
        """
        if reconcile is not None:
            self.reconciling = reconcile
        if self.reconciling:   # the daemon: a deploy its death cut short is resumed
            self.rollouts.resume_interrupted()
        self.monitor.start()
        self.checks.start()
        if self.registry.list_edge_routes():
            self.rounds.reconcile_edge()

    def _after_round(self, view: View) -> None:
        if self.reconciling:   # bridge mode: links, resolvers and rules before restarts
            self.nets.repair(view.records)
        self.rounds.after_round(view)
        self.rollouts.round(self.views.seen)
        for subscriber in self.round_subscribers:
            subscriber(view)

    # -- runtimes -----------------------------------------------------------

    def runtime(self, name: str) -> Runtime:
        """The runtime for a component's ``runtime`` field, built on first use.

        Raises ValidationError for a name no table knows, RuntimeUnavailable
        when its module cannot be imported (e.g. podman-py missing).
        """
        with self._rt_lock:
            rt = self._runtimes.get(name)
            if rt is None:
                rt = self._impl(name)(self.config, self.state_dir, self.owner)
                rt.secret_source = self.secret_value
                self._runtimes[name] = rt
        return rt

    def _impl(self, name: str) -> type[Runtime]:
        if self._impls is not None:
            if name not in self._impls:
                raise ValidationError(f"unknown runtime {name!r}", "runtime")
            return self._impls[name]
        if name not in RUNTIME_NAMES:
            raise ValidationError(f"unknown runtime {name!r}", "runtime")
        try:
            return load_runtime(name)
        except ImportError as exc:
            raise RuntimeUnavailable(f"the {name} runtime cannot load: {exc}") from exc

    @property
    def runtime_names(self) -> tuple[str, ...]:
        return tuple(self._impls) if self._impls is not None else RUNTIME_NAMES

    def available_runtime(self, name: str) -> Runtime:
        """The runtime, or RuntimeUnavailable naming what this node lacks for it."""
        rt = self.runtime(name)
        ok, why = rt.available()
        if not ok:
            raise RuntimeUnavailable(f"the {name} runtime is not available on this node: {why}")
        return rt

    def _listable(self) -> dict[str, Runtime | str]:
        """Runtimes to list: each available one, or why it is not."""
        out: dict[str, Runtime | str] = {}
        for name in self.runtime_names:
            try:
                out[name] = self.available_runtime(name)
            except MCPError as exc:
                out[name] = str(exc)
        return out

    # -- locking ------------------------------------------------------------

    def _service_lock(self, name: str, wait: bool = True) -> AbstractContextManager[bool]:
        """Operations on one service are serialised (``servicelocks``)."""
        return self.locks.hold(name, wait)

    def _exists(self, name: str) -> bool:
        """Whether the registry has ``name``; True when it cannot say (keep the lock file)."""
        try:
            return self.registry.has_service(name)
        except MCPError:
            return True

    def _file_lock(self, key: str, wait: bool = True) -> AbstractContextManager[bool]:
        return flocked(self.state_dir / "locks" / f"{key}.lock", wait)

    # -- specs --------------------------------------------------------------

    def spec(self, service: str, comp: ComponentRecord) -> WorkloadSpec:
        """What the component runs, on its service network in bridge mode."""
        net = self.nets.attach(service, comp.defn.name, comp.defn.runtime)
        spec = self.plain_spec(service, comp)
        return replace(spec, net=net) if net is not None else spec

    @staticmethod
    def plain_spec(service: str, comp: ComponentRecord) -> WorkloadSpec:
        """The spec from the record alone (user-mode networking)."""
        d = comp.defn
        return WorkloadSpec(
            service=service, component=d.name, image=d.image, cmd=d.cmd,
            env=d.env + route_env(d, comp.host_ports), volumes=d.volumes,
            ports=tuple(comp.host_ports[r.name] for r in d.routes), restart=d.restart,
            memory_mb=d.memory_mb, vcpus=d.vcpus, binary=d.binary, image_sha256=d.image_sha256,
            image_digest=d.image_digest, secrets=d.secrets, secret_versions=d.secret_versions,
        )

    def _unallocated_spec(self, service: str, comp: ComponentDef) -> WorkloadSpec:
        """A spec before ports are allocated: enough to pull and to size a VM."""
        return self.spec(service, ComponentRecord(defn=comp, host_ports={
            r.name: 0 for r in comp.routes}))

    def _get(self, name: str) -> ServiceRecord:
        return self.registry.get_service(check_name(name, "service"))

    # -- lifecycle ----------------------------------------------------------

    def deploy(self, defn: ServiceDef, pull: bool = False) -> dict[str, Any]:
        """Deploy ``defn`` on this node, which refuses a ``node`` other than its own name."""
        preflight.check_node(self, defn)
        return self.deploy_local(defn.local_part(), pull=pull)

    def deploy_local(self, defn: ServiceDef, *, note: str = "",
                     gated: bool = True, pull: bool = False) -> dict[str, Any]:
        """Make the node run ``defn`` (validated); returns its status. A deploy that
        changes components begins a rollout (``gated``; not for a revert, whose
        ``note`` history keeps).

        Raises RuntimeUnavailable (a runtime it needs is missing), ImageError,
        ResourceError (would overcommit), ConflictError (workload names clash),
        WorkloadError (a runtime failed; the previous state is restored),
        RegistryError.
        """
        defn = preflight.rules(self, defn)   # what validate checks too; nothing changed
        with self._service_lock(defn.name), self.progress.operation(defn.name, "deploy"), \
                self.images.deploying(defn.name):
            previous = (self.registry.get_service(defn.name)
                        if self.registry.has_service(defn.name) else None)
            rts = {c.name: self.available_runtime(c.runtime) for c in defn.components}
            defn = self.images.resolve(defn, rts, pull)   # pinned to what each image is now
            preflight.check_capacity(self, defn, previous)
            before = self.registry.latest_version(defn.name) if previous else None
            changed = changed_components(
                previous.definition() if previous else None, defn,
                {c.defn.name: c.observed_state for c in previous.components} if previous
                else {})
            bridged = self.nets.has_network(defn.name)
            beside = beside_components(defn, previous, changed, bridged,
                                       self.config.proxy.serve_routes)
            # User mode: the new workloads get new host ports, the proxy held on the old
            # ones until each switch. Bridged: the same ports at another address.
            fresh = frozenset() if bridged else beside
            switched: set[str] = set()
            try:
                for c in fresh:   # its routes stay on the current workload until switched
                    assert previous is not None
                    self.node_routes.hold(defn.name, c, previous.component(c).host_ports)
                # Check and write as one step across services (and processes).
                with self._names_guard, self._file_lock("names"):
                    self.registry.check_workload_names(defn)
                    rec = self.registry.put_service(defn, fresh=fresh)
                try:
                    self.nets.prepare(rec)   # bridge mode: before any workload of it runs
                    changes = self.steps.converge(rec, previous, beside, switched)
                except BaseException:
                    self.steps.rollback(rec, previous, beside, switched)
                    raise
            finally:
                for c in fresh:
                    self.node_routes.release(defn.name, c)
            version = self.registry.record_deployment(defn, note=note)
            unchanged = changes == 0 and previous is not None and previous.definition() == defn
            if gated and defn.active and changed and not unchanged:
                self.rollouts.begin(new_rollout(defn, version, before, changed, time.time()))
            log.info("deployed service=%s components=%d version=%d%s", defn.name,
                     len(defn.components), version, " unchanged" if unchanged else "")
            # Under the lock: an undeploy queued behind us must not turn this reply into a 404.
            self.monitor.refresh_safely(defn.name)
            self._routes_after(defn.name)
            return {**self.local_status(defn.name), "unchanged": unchanged}

    def _switch(self, service: str, component: str) -> None:
        if self.config.proxy.serve_routes:
            self.node_routes.switch(service, component)

    def plan(self, defn: ServiceDef, pull: bool = False) -> dict[str, Any]:
        """What ``deploy`` would change, images resolved (images.Images.plan)."""
        return self.images.plan(self.with_secret_versions(defn.local_part()), pull)

    def validate(self, defn: ServiceDef) -> dict[str, Any]:
        """What a deploy here would refuse, changing nothing (``preflight.validate``)."""
        preflight.check_node(self, defn)
        return preflight.validate(self, defn.local_part())

    def history(self, name: str) -> list[dict[str, Any]]:
        """Each deployed version, oldest first; raises ValidationError, NotFoundError."""
        return self.views.history(check_name(name, "service"))

    def rollback(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Deploy an earlier version again (default: the one before the current).

        Raises NotFoundError (no such version), ConflictError (nothing earlier), and
        whatever ``deploy`` raises.
        """
        return self.deploy(self.rollback_definition(name, version))

    def rollback_definition(self, name: str, version: int | None = None) -> ServiceDef:
        """The definition ``rollback`` deploys; raises as ``rollback`` before deploying."""
        rows = {h["version"]: h for h in self.history(name)}
        if version is None:
            current = [v for v, h in rows.items() if h["current"]]
            earlier = [v for v in rows if not current or v < current[-1]]
            if not earlier or (current and earlier[-1] == current[-1]):
                raise ConflictError(f"service {name!r} has no version before the current one")
            version = earlier[-1]
        if version not in rows:
            raise NotFoundError(f"service {name!r} has no version {version} "
                                f"(versions: {', '.join(map(str, rows))})")
        return next(d.definition for d in self.registry.history(name) if d.version == version)

    def stop(self, name: str, component: str | None = None,
             timeout: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """Stop every component (or one) and keep it stopped; returns the status.

        ``timeout``: how long a workload may take to end itself before it is killed.
        Raises ValidationError (bad name), NotFoundError, WorkloadError, RegistryError.
        """
        return self.apply_state(name, STOPPED, component=component, timeout=timeout)

    def start(self, name: str, component: str | None = None) -> dict[str, Any]:
        """Run every component (or one) that is not running; returns the status.

        Raises ValidationError, NotFoundError, RuntimeUnavailable, WorkloadError,
        RegistryError.
        """
        return self.apply_state(name, RUNNING, component=component)

    def restart(self, name: str, component: str | None = None,
                timeout: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """Stop, then run, every component (or one); as ``start`` for errors."""
        return self.apply_state(name, RUNNING, restart=True, component=component,
                               timeout=timeout)

    def apply_state(self, name: str, desired: State, restart: bool = False,
                   component: str | None = None,
                   timeout: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """Record the desired state, then make each component (or the one) match it."""
        name = check_name(name, "service")
        if not 0 <= timeout <= MAX_STOP_TIMEOUT_S:
            raise ValidationError(f"must be 0-{MAX_STOP_TIMEOUT_S:g} seconds", "timeout")
        with self._service_lock(name), self.progress.operation(
                name, "restart" if restart else "start" if desired == RUNNING else "stop"):
            rec = self.registry.get_service(name)
            comps = ([rec.component(check_name(component, "component"))] if component
                     else rec.components)
            if desired == RUNNING:
                for comp in comps:
                    self.available_runtime(comp.defn.runtime)
            self.registry.set_desired(name, desired, component)
            in_parallel([partial(self.steps.to_state, name, comp, desired, restart, timeout)
                         for comp in comps])
            self.monitor.refresh_safely(name)
            if restart:   # running before and after: no state change would tell of it
                self._restarted(name, [c.defn.name for c in comps])
            self._routes_after(name)
            return self.local_status(name)

    def _restarted(self, name: str, components: list[str]) -> None:
        """The restart's events; best effort: the components did restart, whatever the
        registry says now."""
        try:
            rec, now = self.registry.get_service(name), time.time()
            self.registry.record_observed([
                Event(name, c, now, rec.component(c).observed_state,
                      rec.component(c).observed_state, "restarted by operator",
                      unplanned=False) for c in components])
        except MCPError as exc:
            log.warning("restart of service=%s: its events are not recorded: %s", name, exc)

    def undeploy(self, name: str) -> None:
        """Remove the service from this node (``undeploy_local``)."""
        self.undeploy_local(name)

    def undeploy_local(self, name: str) -> None:
        """Remove every component and the record.

        Raises ValidationError, NotFoundError, WorkloadError (the record stays), RegistryError.
        The intent is recorded before anything is removed (every component stopped, the
        service ``undeploying``): a registry that cannot be written fails here with
        nothing changed, and an undeploy cut short later (the agent killed, a remove or
        the delete failing) is finished by the daemon's reconcile, never left half-done.
        """
        name = check_name(name, "service")
        with self._service_lock(name), self.progress.operation(name, "undeploy"):
            rec = self.registry.get_service(name)  # under the lock: what a deploy just made
            self.registry.mark_undeploying(name)
            in_parallel([partial(self.steps.remove, rec.name, c) for c in rec.components])
            self.registry.delete_service(rec.name)
            self.nets.release(rec.name)   # a crash before it: the next round's repair
            self.rollouts.forget(rec.name)
            log.info("undeployed service=%s", rec.name)
            self._routes_after(rec.name)
        prune_history(self)
        self.monitor.refresh_safely(name)

    def events(self, service: str | None = None, tail: int = 100) -> list[dict[str, Any]]:
        """The last ``tail`` state changes (of one service, or all), oldest first.

        Raises ValidationError (bad name), NotFoundError, RegistryError.
        """
        return self.views.events(check_name(service, "service") if service else None, tail)

    def event_stream(self, service: str | None = None, tail: int = 10,
                     after: int = 0) -> Iterator[bytes]:
        """Those, then every new one as it is recorded (NDJSON); raises as ``events``.
        ``after``: instead of the tail, every event after that id (a resumed follow)."""
        return self.views.event_stream(check_name(service, "service") if service else None,
                                       tail, after)

    def logs(self, name: str, component: str | None, tail: int | None, follow: bool,
             since: str | None = None, timestamps: bool = False) -> Iterator[bytes]:
        """A component's output, or (none named) every component's, interleaved by
        time (``servicelogs``). Raises ValidationError (bad name, tail or since),
        NotFoundError, RuntimeUnavailable, WorkloadError."""
        from . import servicelogs

        return servicelogs.logs(self, name, component, tail, follow, since, timestamps)

    # -- views (read-only; see views.py) ------------------------------------

    def ps(self) -> list[dict[str, Any]]:
        """One row per component of every service; raises RegistryError."""
        return self.views.ps()

    def status(self, name: str) -> dict[str, Any]:
        """Components, drift, flapping, restarts and recent events of one service.

        Raises ValidationError, NotFoundError, RegistryError.
        """
        return self.views.status(self._get(name))

    def progress_of(self, name: str) -> dict[str, Any]:
        """What an operation in flight on ``name`` is doing per component (see
        ``progress``); a service not deployed yet may have one. Raises ValidationError."""
        return self.progress.of(check_name(name, "service"))

    def local_status(self, name: str) -> dict[str, Any]:
        """This node's status of a service it runs (what its own operations answer)."""
        return self.views.status(self._get(name))

    # -- health -------------------------------------------------------------

    @property
    def front(self) -> Any:
        """The node's one proxy client and certificate issuer (front.Front), shared by
        edge routes and component routes; loaded on first use."""
        if self._front is None:
            from .front import Front

            self._front = Front(self.config)
        return self._front

    @property
    def edge(self) -> EdgeManager:
        if self._edge is None:
            from .edge import EdgeManager

            self._edge = EdgeManager(self.config, self.registry, self.front)
        return self._edge

    @property
    def edge_loaded(self) -> bool:
        """Whether the edge modules were loaded (this node has or had edge routes)."""
        return self._edge is not None

    def loaded_runtimes(self) -> dict[str, Runtime]:
        """The runtimes built so far (health reports on these, never builds one)."""
        return dict(self._runtimes)

    @property
    def node_routes(self) -> Any:
        """Component routes on the node proxy (noderoutes), loaded on first use."""
        if self._routes is None:
            from .noderoutes import NodeRoutes

            self._routes = NodeRoutes(self.config, self.registry, f"{self.node}/{self.owner}",
                                      front=self.front)
        return self._routes

    def _routes_after(self, name: str) -> None:
        """Proxy, certificates and DNS in step after a change; RouteError names the step
        that failed while the components keep running."""
        if self.config.proxy.serve_routes:
            self.node_routes.after_change(name)

    def health(self) -> dict[str, Any]:
        """healthy | degraded with reasons, from the last monitor round; does not raise.
        ``network`` says which networking services get (issue 23)."""
        out = {**self.rounds.health(), "network": self.nets.info()}
        if self.nets.reasons():
            out["reasons"] = [*out.get("reasons", []), *self.nets.reasons()]
            out["status"] = "degraded" if out.get("status") == "healthy" else out["status"]
        return out

    # -- edge routes (edge.py) and the fleet's nodes (none here) ---------------------

    def edge_list(self) -> list[dict[str, Any]]:
        return self.edge.list()

    def edge_setup(self, hostname: str, backend_hostname: str, backend_port: int,
                   backend_tls: bool = True) -> dict[str, Any]:
        return self.edge.setup(hostname, backend_hostname, backend_port, backend_tls)

    def edge_remove(self, hostname: str) -> None:
        self.edge.remove(hostname)

    def restart_counts(self) -> dict[tuple[str, str], int]:
        return {key: b.restarts for key, b in self.reconciler.backoff.items()}

    def check_failures(self) -> dict[tuple[str, str], int]:
        return self.checks.failure_counts()

    def monitor_cost(self) -> tuple[int, float, float]:
        """Rounds, their CPU seconds, and of it the listings'."""
        m = self.monitor
        return m.rounds, m.round_cpu_s, m.listing_cpu_s

    def rollout_counts(self) -> dict[str, int]:
        return dict(self.rollouts.counts)

    def certificate_expiries(self) -> dict[str, str]:
        return {r.hostname: r.cert_expires for r in self.registry.list_edge_routes()
                if r.cert_expires}

    def nodes(self) -> list[dict[str, Any]]:
        raise NotFoundError(NOT_A_FLEET)

    def drain(self, node: str) -> dict[str, Any]:
        raise NotFoundError(NOT_A_FLEET)

    def uncordon(self, node: str) -> dict[str, Any]:
        raise NotFoundError(NOT_A_FLEET)

    def close(self) -> None:
        self.images.wait(60)
        self.checks.stop()
        self.monitor.stop()
        for rt in self._runtimes.values():
            rt.close()
        if self._front is not None:
            self._front.close()
        self.registry.close()
