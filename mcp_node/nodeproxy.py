"""L7 node routes in Caddy: the pure plan from what Caddy holds to what should be served.

Each route port is its own Caddy server ``mcp_node_<port>`` listening on the
advertised address only, terminating TLS with certificates loaded by file
(``@id mcp-node-cert-<hostname>``; serial in the file name, as Caddy does not
reload a changed file) and proxying by Host/SNI (``@id
mcp-node-route-<port>-<hostname>``) to ``127.0.0.1:<host port>``. Several
routes share a port by hostname. ``plan`` diffs one GET of ``/config/apps``
against the wanted routes and yields only the calls that differ, each on its
own object (a PUT of one server, a POST/PATCH/DELETE by ``@id``): a route
change is one write (two when its hostname's certificate is new), never a
full config load; an empty, restarted Caddy gets everything in one PUT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .proxy import dial, dig

SERVER_PREFIX = "mcp_node_"
ROUTE_PREFIX = "mcp-node-route-"
CERT_PREFIX = "mcp-node-cert-"
TAG = "mcp-node"

Call = tuple[str, str, Any]   # method, admin path, JSON body (None for DELETE)


@dataclass(frozen=True, order=True)
class L7Route:
    port: int
    hostname: str
    host_port: int


def server_name(port: int) -> str:
    return f"{SERVER_PREFIX}{port}"


def route_id(port: int, hostname: str) -> str:
    return f"{ROUTE_PREFIX}{port}-{hostname}"


def cert_id(hostname: str) -> str:
    return CERT_PREFIX + hostname


def build_route(r: L7Route) -> dict[str, Any]:
    return {"@id": route_id(r.port, r.hostname), "match": [{"host": [r.hostname]}],
            "handle": [{"handler": "reverse_proxy",
                        "upstreams": [{"dial": f"127.0.0.1:{r.host_port}"}]}],
            "terminal": True}


def build_server(address: str, port: int, routes: Sequence[L7Route]) -> dict[str, Any]:
    """TLS from loaded files only: no automatic HTTPS, no redirect listener on :80."""
    return {"listen": [dial(address, port)], "routes": [build_route(r) for r in sorted(routes)],
            "automatic_https": {"disable": True}, "tls_connection_policies": [{}]}


def build_cert(hostname: str, cert_file: str, key_file: str) -> dict[str, Any]:
    return {"@id": cert_id(hostname), "certificate": cert_file, "key": key_file,
            "tags": [TAG]}


def _ours(items: Any, prefix: str) -> dict[str, dict[str, Any]]:
    out = {}
    for item in items if isinstance(items, list) else []:
        rid = item.get("@id") if isinstance(item, dict) else None
        if isinstance(rid, str) and rid.startswith(prefix):
            out[rid] = item
    return out


def plan(apps: Any, address: str, routes: Sequence[L7Route],
         certs: Mapping[str, tuple[str, str]]) -> list[Call]:
    """The admin calls that turn ``apps`` (Caddy's ``/config/apps``) into serving exactly
    ``routes`` with ``certs`` (hostname -> cert file, key file); [] when it already does.
    Order: certificates in, servers and routes in, routes out, servers out, certs out,
    so a route never points at a name without its certificate."""
    by_port: dict[int, list[L7Route]] = {}
    for r in routes:
        by_port.setdefault(r.port, []).append(r)
    want_servers = {server_name(p): build_server(address, p, rs) for p, rs in by_port.items()}
    want_certs = {cert_id(h): build_cert(h, c, k) for h, (c, k) in certs.items()}
    if not isinstance(apps, dict) or not apps:
        if not want_servers and not want_certs:
            return []
        return [("PUT", "/config/apps", {
            "http": {"servers": want_servers},
            "tls": {"certificates": {"load_files": list(want_certs.values())}}})]
    calls: list[Call] = []
    tls = apps.get("tls")
    files = dig(apps, "tls", "certificates", "load_files")
    have_certs = _ours(files, CERT_PREFIX)
    new_certs = [e for cid, e in want_certs.items() if cid not in have_certs]
    if new_certs:
        if not isinstance(tls, dict) or not tls:
            calls.append(("PUT", "/config/apps/tls", {"certificates": {"load_files": new_certs}}))
        elif not tls.get("certificates"):
            calls.append(("PUT", "/config/apps/tls/certificates", {"load_files": new_certs}))
        elif files is None:
            calls.append(("PUT", "/config/apps/tls/certificates/load_files", new_certs))
        else:
            calls.append(("POST", "/config/apps/tls/certificates/load_files/...", new_certs))
    calls += [("PATCH", f"/id/{cid}", e) for cid, e in want_certs.items()
              if cid in have_certs and have_certs[cid] != e]

    http = apps.get("http")
    servers = dig(apps, "http", "servers")
    have_servers = {n: s for n, s in (servers or {}).items()
                    if n.startswith(SERVER_PREFIX) and isinstance(s, dict)}
    new_servers = {n: s for n, s in want_servers.items() if n not in have_servers}
    if new_servers:
        if not isinstance(http, dict) or not http:
            calls.append(("PUT", "/config/apps/http", {"servers": new_servers}))
        elif not isinstance(servers, dict):
            calls.append(("PUT", "/config/apps/http/servers", new_servers))
        else:
            calls += [("PUT", f"/config/apps/http/servers/{n}", s)
                      for n, s in sorted(new_servers.items())]
    removals: list[Call] = []
    for name, want in sorted(want_servers.items()):
        have = have_servers.get(name)
        if have is None:
            continue
        if have.get("listen") != want["listen"]:
            calls.append(("PATCH", f"/config/apps/http/servers/{name}/listen", want["listen"]))
        have_routes = _ours(have.get("routes"), ROUTE_PREFIX)
        want_routes = {r["@id"]: r for r in want["routes"]}
        missing = [r for rid, r in want_routes.items() if rid not in have_routes]
        if len(missing) == 1:
            calls.append(("POST", f"/config/apps/http/servers/{name}/routes", missing[0]))
        elif missing:
            calls.append(("POST", f"/config/apps/http/servers/{name}/routes/...", missing))
        calls += [("PATCH", f"/id/{rid}", r) for rid, r in want_routes.items()
                  if rid in have_routes and have_routes[rid] != r]
        removals += [("DELETE", f"/id/{rid}", None) for rid in have_routes
                     if rid not in want_routes]
    calls += removals
    calls += [("DELETE", f"/config/apps/http/servers/{n}", None)
              for n in sorted(have_servers) if n not in want_servers]
    calls += [("DELETE", f"/id/{cid}", None) for cid in sorted(have_certs)
              if cid not in want_certs]
    return calls


def served(apps: Any) -> dict[tuple[int, str], int]:
    """(port, hostname) -> host port of every node route Caddy serves (for status)."""
    out: dict[tuple[int, str], int] = {}
    for name, server in (dig(apps, "http", "servers") or {}).items():
        if not name.startswith(SERVER_PREFIX) or not isinstance(server, dict):
            continue
        port = name[len(SERVER_PREFIX):]
        for rid, r in _ours(server.get("routes"), ROUTE_PREFIX).items():
            host = rid[len(ROUTE_PREFIX) + len(port) + 1:]
            upstream = str(dig(r, "handle") and r["handle"][0]["upstreams"][0]["dial"])
            hp = upstream.rpartition(":")[2]
            if port.isdigit() and hp.isdigit():
                out[(int(port), host)] = int(hp)
    return out
