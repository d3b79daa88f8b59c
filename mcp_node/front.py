"""The node's TLS front: one proxy client and one certificate issuer for the node.

Edge routes (``edge``) and component routes (``noderoutes``) both put hostnames
on the same Caddy and get their certificates from the same CA. They share one
``Front``, so the node has one ACME account (``<state>/edge/acme/account.key``),
one admin client, and one certificate order at a time: an order holds the
HTTP-01 port while it runs, and two at once would fight over it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from .acme import AcmeClient, CertInfo, Http01Responder, issue_files
from .config import AgentConfig
from .proxy import CaddyRouter, make_router


class Front:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # Absolute paths only reach Caddy: it resolves relative ones against its own cwd.
        self.edge_dir = config.state_dir.absolute() / "edge"
        backend_ca = config.edge.backend_ca
        # Its cert_path/key_path are the edge routes' (edge/certs); component routes keep
        # theirs under routes/certs, whose orphans the edge's collection never sees.
        self.router: CaddyRouter = make_router(
            config.proxy.backend, config.proxy.admin, config.proxy.https_port,
            self.edge_dir / "certs",
            str(Path(backend_ca).expanduser().absolute()) if backend_ca else "")
        self._issuer: AcmeClient | None = None
        self._issuer_lock = threading.Lock()
        self._order_lock = threading.Lock()

    @property
    def issuer(self) -> AcmeClient:
        """The platform CA with the node's one account (built on first use)."""
        with self._issuer_lock:
            if self._issuer is None:
                acme = self.config.acme
                self._issuer = AcmeClient(
                    acme.directory, self.edge_dir / "acme" / "account.key",
                    ca_bundle=acme.ca_bundle, eab_kid=acme.eab_kid,
                    eab_hmac_key=acme.eab_hmac_key)
            return self._issuer

    def issue(self, hostname: str, paths: Callable[[str], tuple[Path, Path]],
              listen_host: str = "") -> tuple[Path, Path, CertInfo]:
        """A new key and certificate for ``hostname`` written at ``paths(serial)`` (key
        0600); one order at a time on this node."""
        with self._order_lock:
            return issue_files(self.issuer, hostname,
                               Http01Responder(self.config.acme.http01_port, listen_host), paths)

    def close(self) -> None:
        """Forget the issuer (its nonce and account URL); the next use builds it again."""
        with self._issuer_lock:
            self._issuer = None
