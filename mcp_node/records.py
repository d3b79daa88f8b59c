"""The registry's records: what a row of services/components/events/edge_routes/
deployments means to the rest of the agent, without the SQL."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import NotFoundError
from .servicedef import COMPONENT_DEFAULTS, ComponentDef, NetworkDef, ServiceDef, UpdateDef
from .states import RUNNING, UNKNOWN, State


@dataclass
class ComponentRecord:
    defn: ComponentDef
    desired_state: State = RUNNING
    observed_state: State = UNKNOWN
    host_ports: dict[str, int] = field(default_factory=dict)
    updated_at: str = ""


@dataclass
class ServiceRecord:
    name: str
    active: bool
    components: list[ComponentRecord]
    created_at: str = ""
    updated_at: str = ""
    undeploying: bool = False   # an undeploy began (and was interrupted): reconcile ends it
    update: UpdateDef = UpdateDef()
    network: NetworkDef = NetworkDef()

    def definition(self) -> ServiceDef:
        return ServiceDef(
            name=self.name, active=self.active, components=tuple(c.defn for c in self.components),
            update=self.update, network=self.network,
        )

    def component(self, name: str) -> ComponentRecord:
        for c in self.components:
            if c.defn.name == name:
                return c
        names = ", ".join(c.defn.name for c in self.components)
        raise NotFoundError(f"service {self.name!r} has no component {name!r} "
                            f"(components: {names})")


@dataclass
class Event:
    service: str
    component: str
    time: float
    prev_state: str      # a State for a component's change; a rollout's for the service's
    new_state: str
    detail: str = ""
    unplanned: bool = True
    id: int = 0          # its row id once stored: streams resume after the last one seen


@dataclass
class EdgeRouteRecord:
    hostname: str
    backend_hostname: str
    backend_port: int
    backend_address: str
    cert_path: str
    key_path: str
    cert_serial: str = ""
    cert_expires: str = ""
    backend_tls: bool = True
    created_at: str = ""
    updated_at: str = ""


@dataclass
class HostRecord:
    """A component route's hostname on this node (migration 010): its certificate and
    the address its DNS record was registered with."""
    hostname: str
    cert_path: str = ""
    key_path: str = ""
    cert_serial: str = ""
    cert_expires: str = ""
    dns_address: str = ""


@dataclass(frozen=True)
class Deployment:
    service: str
    version: int
    time: float
    digest: str
    definition: ServiceDef
    note: str = ""       # why the agent itself made it (a revert), else ""


SETTINGS = ("check_interval_s", "check_timeout_s", "check_failures", "pull")


def component_settings(c: ComponentDef) -> str:
    """The registry's ``settings`` of a component: its keys of SETTINGS off the default,
    and the secrets it uses (issue 20) where it uses any."""
    out: dict[str, Any] = {k: getattr(c, k) for k in SETTINGS
                           if getattr(c, k) != COMPONENT_DEFAULTS[k]}
    if c.secrets:
        out["secrets"] = list(c.secrets)
    if c.secret_versions:
        out["secret_versions"] = dict(c.secret_versions)
    return json.dumps(out, sort_keys=True)


def settings_values(text: str) -> dict[str, Any]:
    """``component_settings`` read back as ComponentDef's fields."""
    out: dict[str, Any] = json.loads(text)
    if "secrets" in out:
        out["secrets"] = tuple(out["secrets"])
    if "secret_versions" in out:
        out["secret_versions"] = tuple(sorted((str(k), int(v))
                                              for k, v in out["secret_versions"].items()))
    return out


def service_settings(svc: ServiceDef) -> str:
    """The registry's ``settings`` of a service: its [update] keys off the default (at
    the top, as before [network]) and its [network] table where set."""
    d = UpdateDef()
    out: dict[str, Any] = {k: v for k, v in asdict(svc.update).items() if v != getattr(d, k)}
    if svc.network != NetworkDef():
        out["network"] = {"allow_from": list(svc.network.allow_from)}
    return json.dumps(out, sort_keys=True)


def service_tables(text: str) -> tuple[UpdateDef, NetworkDef]:
    """``service_settings`` read back."""
    out: dict[str, Any] = json.loads(text)
    net = out.pop("network", {})
    return UpdateDef(**out), NetworkDef(tuple(net.get("allow_from", ())))


def definition_digest(svc: ServiceDef) -> str:
    return hashlib.sha256(json.dumps(svc.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
