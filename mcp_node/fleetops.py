"""A fleet member's ``operations.Operations``: it wraps the node's own ``Agent``.

Writes are placed through etcd (``fleetnode.Fleet``), refused at once while etcd is
lost; reads of services come from etcd, and while etcd is lost from the node's own
record, marked ``stale``. What is the node's own (logs, history, progress, edge
routes, event streams) is the wrapped agent's. The agent never learns it is wrapped:
the fleet hears of its rounds as one of its round subscribers.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from . import fleetrollout, fleetviews, preflight
from .agent import Agent
from .errors import FleetUnavailable, NotFoundError, ValidationError
from .fleetnode import Fleet
from .operations import STOP_TIMEOUT_S
from .plan import carried, plan, plan_dict
from .servicedef import check_name, from_dict
from .states import RUNNING, STOPPED

if TYPE_CHECKING:
    from .servicedef import ServiceDef


class FleetOperations:
    write_role = "master"   # a fleet write changes every node's view, not one node's

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.fleet = Fleet(agent)
        agent.round_subscribers.append(lambda view: self.fleet.after_round())

    @property
    def local(self) -> Agent:
        """The node's own agent (what tests and the daemon look at beneath the fleet)."""
        return self._agent

    @property
    def node(self) -> str:
        return self.fleet.name

    def _writable(self) -> None:
        """Fleet writes need etcd: refused at once, with nothing changed, while it is lost."""
        if not self.fleet.reachable and self.fleet.last_error:
            raise FleetUnavailable(self.fleet.last_error)

    # -- service lifecycle: placed through etcd ------------------------------------------

    def deploy(self, defn: ServiceDef, pull: bool = False) -> dict[str, Any]:
        if pull:   # the placed node resolves as each component's ``pull`` says
            raise ValidationError("--pull is not supported in fleet mode yet; set pull = "
                                  "\"always\" on the components instead", "pull")
        self._writable()
        return fleetrollout.answer(self.fleet.deploy(defn))   # unchanged, as on one node

    def plan(self, defn: ServiceDef, pull: bool = False) -> dict[str, Any]:
        """Against the fleet's record, images not resolved (the placed node does that):
        a moved tag shows only once deployed."""
        if pull:
            raise ValidationError("--pull is not supported in fleet mode yet", "pull")
        try:
            st: dict[str, Any] | None = self.status(defn.name)
        except NotFoundError:
            st = None
        deployed = from_dict(st["definition"]) if st else None
        states = {c["component"]: c["state"] for c in st["components"]} if st else {}
        new, _ = self.fleet.secrets.pin(carried(deployed, defn))   # a new version: a change
        return plan_dict(plan(deployed, new, states))

    def validate(self, defn: ServiceDef) -> dict[str, Any]:
        """This node's checks (secrets the fleet's): the placed node runs them again at
        deploy, and one chosen later may lack a host path or room this one has."""
        out = preflight.validate(self._agent, defn.local_part())
        if defn.node != self.node:
            out["warnings"].append(
                f"checked on {self.node} only: the fleet may place it on "
                f"{repr(defn.node) if defn.node else 'another node'}, whose host paths "
                "and capacity were not checked")
        return out

    def stop(self, name: str, component: str | None = None,
             timeout: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        self._writable()
        return self.fleet.set_state(check_name(name, "service"), STOPPED, component)

    def start(self, name: str, component: str | None = None) -> dict[str, Any]:
        self._writable()
        return self.fleet.set_state(check_name(name, "service"), RUNNING, component)

    def restart(self, name: str, component: str | None = None,
                timeout: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        self._writable()
        return self.fleet.set_state(check_name(name, "service"), RUNNING, component,
                                    restart=True)

    def undeploy(self, name: str) -> None:
        self._writable()
        self.fleet.undeploy(check_name(name, "service"))

    def rollback(self, name: str, version: int | None = None) -> dict[str, Any]:
        """An earlier version from this node's history, placed again through etcd."""
        return self.deploy(self._agent.rollback_definition(name, version))

    # -- reads: from etcd, or this node's own while it is lost --------------------------------

    def ps(self) -> list[dict[str, Any]]:
        return self.fleet.read_or_stale(partial(fleetviews.ps, self.fleet), self._agent.ps)

    def status(self, name: str) -> dict[str, Any]:
        name = check_name(name, "service")
        return self.fleet.read_or_stale(partial(self.fleet.status, name),
                                        partial(self._agent.status, name))

    def events(self, service: str | None = None, tail: int = 100) -> list[dict[str, Any]]:
        """Every node's state changes, from etcd (this node's, stale, while it is lost)."""
        name = check_name(service, "service") if service else None
        return self.fleet.read_or_stale(lambda: fleetviews.events(self.fleet, name, tail),
                                        lambda: self._agent.events(name, tail))

    def health(self) -> dict[str, Any]:
        out = self._agent.health()
        out["fleet"] = self.fleet.health()
        if out["fleet"]["etcd"] != "reachable" and self._agent.monitor.running:
            out["status"] = "degraded"
            out["reasons"] = [*out["reasons"], "fleet: etcd unreachable or without quorum; "
                              "running on the local record"]
        return out

    def nodes(self) -> list[dict[str, Any]]:
        return self.fleet.nodes()

    def drain(self, node: str) -> dict[str, Any]:
        self._writable()
        return self.fleet.drain(check_name(node, "node"))

    def uncordon(self, node: str) -> dict[str, Any]:
        self._writable()
        return self.fleet.uncordon(check_name(node, "node"))

    # -- the node's own -----------------------------------------------------------------

    def history(self, name: str) -> list[dict[str, Any]]:
        return self._agent.history(name)

    def progress_of(self, name: str) -> dict[str, Any]:
        return self._agent.progress_of(name)

    def event_stream(self, service: str | None = None, tail: int = 10,
                     after: int = 0) -> Iterator[bytes]:
        return self._agent.event_stream(service, tail, after)

    def logs(self, name: str, component: str | None, tail: int | None,
             follow: bool, since: str | None = None,
             timestamps: bool = False) -> Iterator[bytes]:
        return self._agent.logs(name, component, tail, follow, since, timestamps)

    def restart_counts(self) -> dict[tuple[str, str], int]:
        return self._agent.restart_counts()

    def check_failures(self) -> dict[tuple[str, str], int]:
        return self._agent.check_failures()

    def monitor_cost(self) -> tuple[int, float, float]:
        return self._agent.monitor_cost()

    def rollout_counts(self) -> dict[str, int]:
        return self._agent.rollout_counts()

    def certificate_expiries(self) -> dict[str, str]:
        return self._agent.certificate_expiries()

    # -- secrets: in etcd, sealed under the fleet key (fleetsecrets) --------------------

    def secret_set(self, name: str, value: bytes | None = None) -> dict[str, Any]:
        if value is None:
            raise ValidationError("is required", "value")
        self._writable()
        return self.fleet.secrets.set(name, value)

    def secret_list(self) -> list[dict[str, Any]]:
        return self.fleet.secrets.list()

    def secret_remove(self, name: str) -> None:
        self._writable()
        self.fleet.secrets.remove(name)

    def edge_list(self) -> list[dict[str, Any]]:
        return self._agent.edge_list()

    def edge_setup(self, hostname: str, backend_hostname: str, backend_port: int,
                   backend_tls: bool = True) -> dict[str, Any]:
        return self._agent.edge_setup(hostname, backend_hostname, backend_port, backend_tls)

    def edge_remove(self, hostname: str) -> None:
        self._agent.edge_remove(hostname)

    # -- life -----------------------------------------------------------------------------

    def start_monitor(self, reconcile: bool | None = None) -> None:
        """Join the fleet and converge to etcd, then the node's first round."""
        self.fleet.start()
        self._agent.start_monitor(reconcile)

    def close(self, revoke: bool = True) -> None:
        """Leave the fleet (``revoke=False``: as a crash does, the lease just expires),
        then stop the node's agent; its workloads keep running."""
        self.fleet.close(revoke)
        self._agent.close()
