"""Fleet mode's public routes (issue 12, part 5): every ``edge`` agent serves each
route's ``public_hostname`` as an edge route (today's steps: certificate, DNS check
of the backend's Tailnet address, proxy route) to ``<route hostname>:<route port>``
on the node the service is placed on, and moves or removes it with the placement.

The backend hostname stays the same when a service moves; what changes is the
address DNS gives for it. So the edge compares the address its route uses with the
placed node's advertised address and sets the route up again (the certificate is
kept) until DNS gives the new one. Nothing here runs while etcd is unreachable:
the edge keeps its routes (Caddy and the local registry hold them) until it is back.

The node a service moved to takes its DNS names over from the node it left:
``take_over_names`` deletes exactly the old node's records (its address and TXT
holder, from ``/mcp/members/``), with this node's own TSIG key; nothing secret is
in etcd.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import MCPError
from .servicedef import ServiceDef, from_dict

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("mcp_node.fleet")


def wanted(services: dict[str, dict[str, Any]], zone: str) -> dict[str, dict[str, Any]]:
    """public hostname -> backend hostname, port, node, service (placed, running ones)."""
    from .noderoutes import effective_hostname

    out: dict[str, dict[str, Any]] = {}
    for name, rec in sorted(services.items()):
        if not rec.get("node") or rec.get("state") != "running":
            continue
        defn = from_dict(rec["definition"])
        for c in defn.components:
            for r in c.routes:
                if r.public_hostname:
                    out[r.public_hostname] = {
                        "backend": effective_hostname(r.hostname, name, zone),
                        "port": r.port, "node": rec["node"], "service": name}
    return out


class FleetEdge:
    """The edge routes this agent made for the fleet (kept in the fleet state file)."""

    def __init__(self, agent: Agent, managed: dict[str, dict[str, Any]]) -> None:
        self.a = agent
        self.managed = managed        # public hostname -> what it was set up for
        self.errors: dict[str, str] = {}

    def sync(self, services: dict[str, dict[str, Any]],
             nodes: dict[str, dict[str, Any]]) -> bool:
        """Routes to match ``services``; True while some route still waits (for DNS to
        give a moved service's new address, or a step that failed): call again soon."""
        want = wanted(services, self.a.config.edge.internal_zone)
        pending = False
        for host, w in want.items():
            address = (nodes.get(w["node"]) or {}).get("address", "")
            row = self.a.registry.get_edge_route(host)
            fits = (row is not None and row.backend_hostname == w["backend"]
                    and row.backend_port == w["port"]
                    and (not address or row.backend_address == address))
            if fits and self.managed.get(host) == w:
                continue
            try:
                view = self.a.edge.setup(host, w["backend"], w["port"])
                self.errors.pop(host, None)
            except MCPError as exc:
                self.errors[host] = str(exc)
                log.warning("fleet edge: %s -> %s:%d (node %s): %s", host, w["backend"],
                            w["port"], w["node"], exc)
                pending = True
                continue
            if address and view.get("backend_address") != address:
                pending = True       # DNS still gives the old node: again next round
                continue
            log.info("fleet edge: %s -> %s:%d on node %s", host, w["backend"], w["port"],
                     w["node"])
            self.managed[host] = w
        for host in sorted(set(self.managed) - set(want)):
            try:
                self.a.edge.remove(host)
            except MCPError as exc:
                if getattr(exc, "status", 0) != 404:
                    self.errors[host] = str(exc)
                    pending = True
                    continue
            log.info("fleet edge: %s removed (its service went)", host)
            del self.managed[host]
            self.errors.pop(host, None)
        return pending


def take_over_names(agent: Agent, defn: ServiceDef, moved: dict[str, Any]) -> None:
    """Delete the DNS records the node ``defn`` moved from holds for its route names,
    so this node may register them (registration refuses a name held elsewhere)."""
    from . import dnsupdate
    from .noderoutes import effective_hostname

    cfg = agent.config
    if not (cfg.proxy.serve_routes and moved.get("address") and moved.get("holder")):
        return
    zone = cfg.edge.internal_zone
    updater = dnsupdate.from_config(cfg.dns, zone, moved["holder"])
    if updater is None:
        return
    for c in defn.components:
        for r in c.routes:
            host = effective_hostname(r.hostname, defn.name, zone)
            try:
                updater.unregister(host, moved["address"])
                log.info("fleet: took %s over from node %s", host, moved.get("node"))
            except MCPError as exc:
                log.warning("fleet: could not take %s over from node %s: %s", host,
                            moved.get("node"), exc)
