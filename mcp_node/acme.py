"""ACME (RFC 8555) client: the platform CA speaks it, with External Account Binding.

Only what an edge node needs: one account (ES256 key kept 0600 in the state
directory), orders for a single DNS name, HTTP-01 answered by a small
responder, finalize with a CSR made from a key generated here (the private
key never leaves the node), and the PEM chain back. HTTPS goes through
urllib with a configurable CA bundle so a private CA (or Pebble) can be
trusted without touching the system store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .errors import IssuerError
from .files import atomic_write

log = logging.getLogger(__name__)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


# -- encoding and keys --------------------------------------------------------

def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """RFC 7518 JWK of a P-256 key, members in the lexicographic order RFC 7638 wants."""
    nums = public_key.public_numbers()
    return {"crv": "P-256", "kty": "EC",
            "x": b64u(nums.x.to_bytes(32, "big")), "y": b64u(nums.y.to_bytes(32, "big"))}


def jwk_thumbprint(key_jwk: dict[str, str]) -> str:
    canon = json.dumps({k: key_jwk[k] for k in ("crv", "kty", "x", "y")},
                       separators=(",", ":"), sort_keys=True)
    return b64u(hashlib.sha256(canon.encode()).digest())


def sign_es256(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """JWS wants r||s (64 bytes), cryptography gives DER."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def jws(key: ec.EllipticCurvePrivateKey, protected: dict[str, Any],
        payload: dict[str, Any] | None) -> dict[str, str]:
    """Flattened JWS; ``payload=None`` is POST-as-GET (empty payload)."""
    prot = b64u(json.dumps(protected, separators=(",", ":")).encode())
    body = "" if payload is None else b64u(json.dumps(payload, separators=(",", ":")).encode())
    sig = sign_es256(key, f"{prot}.{body}".encode())
    return {"protected": prot, "payload": body, "signature": b64u(sig)}


def eab_binding(account_jwk: dict[str, str], kid: str, hmac_key_b64u: str,
                url: str) -> dict[str, str]:
    """RFC 8555 §7.3.4: the account key signed (HS256) with the CA-issued MAC key."""
    try:
        mac_key = b64u_decode(hmac_key_b64u.strip())
    except ValueError as exc:
        raise IssuerError("acme.eab_hmac_key is not base64url") from exc
    prot = b64u(json.dumps({"alg": "HS256", "kid": kid, "url": url},
                           separators=(",", ":")).encode())
    body = b64u(json.dumps(account_jwk, separators=(",", ":")).encode())
    sig = hmac.new(mac_key, f"{prot}.{body}".encode(), hashlib.sha256).digest()
    return {"protected": prot, "payload": body, "signature": b64u(sig)}


def make_csr(key: ec.EllipticCurvePrivateKey, hostname: str) -> bytes:
    """DER CSR for exactly one DNS name (CN and SAN)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


def key_authorization(token: str, account_jwk: dict[str, str]) -> str:
    return f"{token}.{jwk_thumbprint(account_jwk)}"


@dataclass(frozen=True)
class CertInfo:
    serial: str          # lowercase hex, no prefix
    not_after: datetime  # UTC

    @property
    def expires(self) -> str:
        return self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")


def cert_info(chain_pem: bytes) -> CertInfo:
    """Serial and expiry of the leaf (first certificate of the chain)."""
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except (ValueError, IndexError) as exc:
        raise IssuerError(f"CA returned no usable certificate: {exc}") from exc
    return CertInfo(format(leaf.serial_number, "x"), leaf.not_valid_after_utc.astimezone(UTC))


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The account key: made once, kept 0600; a key of another type is refused."""
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, OSError) as exc:
            raise IssuerError(f"cannot load ACME account key {path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise IssuerError(f"ACME account key {path} is not an ECDSA P-256 key")
        return key
    key = new_key()
    atomic_write(path, key_pem(key), 0o600)
    log.info("created ACME account key %s", path)
    return key


# -- HTTP-01 -------------------------------------------------------------------

class Solver(Protocol):
    def present(self, token: str, key_auth: str) -> None: ...
    def cleanup(self, token: str) -> None: ...


class Http01Responder:
    """Answers /.well-known/acme-challenge/<token> while an order is in flight.

    Started on the first challenge and stopped by ``close``, so the port is
    only held during issuance.
    """

    def __init__(self, port: int, host: str = "") -> None:
        self.port, self.host = port, host
        self.tokens: dict[str, str] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def present(self, token: str, key_auth: str) -> None:
        self.tokens[token] = key_auth
        if self._server is None:
            self._start()

    def cleanup(self, token: str) -> None:
        self.tokens.pop(token, None)

    def _start(self) -> None:
        tokens = self.tokens

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                token = self.path[len(CHALLENGE_PREFIX):] if self.path.startswith(
                    CHALLENGE_PREFIX) else ""
                answer = tokens.get(token)
                body = (answer or "not found").encode()
                self.send_response(200 if answer else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http01 %s %s", self.address_string(), format % args)

        try:
            self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            raise IssuerError(f"cannot listen for HTTP-01 on port {self.port}: {exc}") from exc
        self._server.daemon_threads = True
        server = self._server
        # short poll: close() (shutdown) waits up to one poll interval
        self._thread = threading.Thread(target=lambda: server.serve_forever(poll_interval=0.02),
                                        name="http01", daemon=True)
        self._thread.start()
        log.info("HTTP-01 responder listening on port %d", self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def issue_files(client: AcmeClient, hostname: str, responder: Http01Responder,
                paths: Callable[[str], tuple[Path, Path]]) -> tuple[Path, Path, CertInfo]:
    """A key made here, its certificate, both written under the serial-bearing names
    ``paths(serial)`` gives (key 0600); the responder is closed after the order. Shared by
    edge routes and node routes, so both issue and store certificates the same way."""
    key = new_key()
    try:
        chain = client.issue(hostname, key, responder)
    finally:
        responder.close()
    info = cert_info(chain)
    cert_file, key_file = paths(info.serial)
    try:
        atomic_write(key_file, key_pem(key), 0o600)
        atomic_write(cert_file, chain, 0o644)
    except OSError as exc:
        for f in (cert_file, key_file):
            f.unlink(missing_ok=True)
        raise IssuerError(f"cannot write certificate files: {exc}") from exc
    return cert_file, key_file, info


# -- the client ----------------------------------------------------------------

@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise IssuerError(f"ACME server sent invalid JSON: {exc}") from exc


class AcmeClient:
    """One account on one ACME directory; ``issue`` returns the PEM chain."""

    def __init__(self, directory_url: str, account_key_path: Path, *, ca_bundle: str = "",
                 eab_kid: str = "", eab_hmac_key: str = "", timeout: float = 30.0,
                 poll_timeout: float = 120.0) -> None:
        if not directory_url:
            raise IssuerError("no ACME directory configured (acme.directory)")
        self.directory_url = directory_url
        self.account_key_path = account_key_path
        self.ca_bundle = ca_bundle
        self.eab_kid, self.eab_hmac_key = eab_kid, eab_hmac_key
        self.timeout, self.poll_timeout = timeout, poll_timeout
        try:
            self._ctx = ssl.create_default_context(cafile=ca_bundle or None)
        except (OSError, ssl.SSLError) as exc:
            raise IssuerError(f"cannot load acme.ca_bundle {ca_bundle!r}: {exc}") from exc
        self._dir: dict[str, Any] | None = None
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._kid: str | None = None
        self._nonce: str | None = None
        self.requests = 0

    # transport
    def _http(self, method: str, url: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> _Response:
        if not url.startswith(("https://", "http://")):
            raise IssuerError(f"ACME URL {url!r} is not http(s)")
        req = urllib.request.Request(url, data=body, method=method,  # noqa: S310 - checked
                                     headers=headers or {})
        self.requests += 1
        log.debug("acme %s %s", method, url)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ctx) as resp:  # noqa: S310
                out = _Response(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as exc:
            out = _Response(exc.code, dict(exc.headers.items()), exc.read())
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", exc)
            raise IssuerError(f"ACME server {url} unreachable: {reason}") from exc
        nonce = out.headers.get("Replay-Nonce")
        if nonce:
            self._nonce = nonce
        return out

    def directory(self) -> dict[str, Any]:
        if self._dir is None:
            resp = self._http("GET", self.directory_url)
            if resp.status != 200:
                raise IssuerError(f"ACME directory {self.directory_url}: HTTP {resp.status}")
            found = resp.json()
            need = ("newNonce", "newAccount", "newOrder")
            if not isinstance(found, dict) or \
                    not all(isinstance(found.get(k), str) for k in need):
                raise IssuerError(f"ACME directory {self.directory_url} lacks "
                                  f"{', '.join(need)}: not an ACME server?")
            self._dir = found
        return self._dir

    def ping(self) -> None:
        """Reachability for health: a fresh GET of the directory."""
        resp = self._http("GET", self.directory_url)
        if resp.status != 200:
            raise IssuerError(f"ACME directory {self.directory_url}: HTTP {resp.status}")

    def _new_nonce(self) -> str:
        resp = self._http("HEAD", self.directory()["newNonce"])
        if not self._nonce:
            raise IssuerError(f"ACME newNonce gave no nonce (HTTP {resp.status})")
        return self._nonce

    def _post(self, url: str, payload: dict[str, Any] | None, *, use_jwk: bool = False,
              accept: str = "") -> _Response:
        """Signed POST; a badNonce is retried with the nonce the error carried."""
        key = self._account_key()
        reregistered = False
        for _attempt in range(8):
            nonce = self._nonce or self._new_nonce()
            self._nonce = None
            prot: dict[str, Any] = {"alg": "ES256", "nonce": nonce, "url": url}
            if use_jwk:
                prot["jwk"] = jwk(key.public_key())
            else:
                prot["kid"] = self._account()
            body = json.dumps(jws(key, prot, payload)).encode()
            headers = {"Content-Type": "application/jose+json"}
            if accept:
                headers["Accept"] = accept
            resp = self._http("POST", url, body, headers)
            if resp.status < 400:
                return resp
            problem = _problem(resp)
            if problem.get("type") == "urn:ietf:params:acme:error:badNonce":
                continue
            if problem.get("type") == "urn:ietf:params:acme:error:accountDoesNotExist" \
                    and not use_jwk and not reregistered:
                # The CA lost our account (reset, deactivated): register the key again
                # once, rather than failing every renewal until the agent restarts.
                log.warning("ACME account %s unknown to the CA; registering again", self._kid)
                self._kid, reregistered = None, True
                continue
            raise IssuerError(
                f"ACME {url}: HTTP {resp.status} {problem.get('type', '')}: "
                f"{problem.get('detail', resp.body[:200].decode(errors='replace'))}")
        raise IssuerError(f"ACME {url}: too many badNonce errors")

    def _account_key(self) -> ec.EllipticCurvePrivateKey:
        if self._key is None:
            self._key = load_or_create_key(self.account_key_path)
        return self._key

    def _account(self) -> str:
        """The account URL (``kid``), registering (with EAB when configured) on first use."""
        if self._kid is None:
            key = self._account_key()
            url = self.directory()["newAccount"]
            payload: dict[str, Any] = {"termsOfServiceAgreed": True}
            if self.eab_kid:
                payload["externalAccountBinding"] = eab_binding(
                    jwk(key.public_key()), self.eab_kid, self.eab_hmac_key, url)
            elif self.directory().get("meta", {}).get("externalAccountRequired"):
                raise IssuerError("ACME CA requires External Account Binding; "
                                  "set acme.eab_kid and acme.eab_hmac_key")
            resp = self._post(url, payload, use_jwk=True)
            kid = resp.headers.get("Location")
            if not kid:
                raise IssuerError("ACME newAccount returned no account URL")
            self._kid = kid
            log.info("ACME account %s", kid)
        return self._kid

    def _poll(self, url: str, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.poll_timeout
        delay = 0.05
        while True:
            obj: dict[str, Any] = self._post(url, None).json()
            if obj.get("status") == "invalid":
                raise IssuerError(f"{what} is invalid: {_error_detail(obj)}")
            if done(obj):
                return obj
            if time.monotonic() > deadline:
                raise IssuerError(f"{what} still {obj.get('status')!r} after "
                                  f"{self.poll_timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def issue(self, hostname: str, key: ec.EllipticCurvePrivateKey, solver: Solver) -> bytes:
        """Order, authorize by HTTP-01, finalize with a CSR of ``key``; PEM chain."""
        try:
            return self._issue(hostname, key, solver)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            # a CA answer missing the fields RFC 8555 requires
            raise IssuerError(f"ACME order for {hostname}: unexpected response from the CA "
                              f"({type(exc).__name__}: {exc})") from exc

    def _issue(self, hostname: str, key: ec.EllipticCurvePrivateKey, solver: Solver) -> bytes:
        thumb_jwk = jwk(self._account_key().public_key())
        resp = self._post(self.directory()["newOrder"],
                          {"identifiers": [{"type": "dns", "value": hostname}]})
        order_url = resp.headers.get("Location", "")
        order: dict[str, Any] = resp.json()
        if not order_url:
            raise IssuerError("ACME newOrder returned no order URL")
        for authz_url in order.get("authorizations", []):
            self._authorize(authz_url, thumb_jwk, solver)
        order = self._poll(order_url, lambda o: o.get("status") in ("ready", "valid"),
                           f"order for {hostname}")
        if order.get("status") == "ready":
            self._post(order["finalize"], {"csr": b64u(make_csr(key, hostname))})
            order = self._poll(order_url, lambda o: o.get("status") == "valid",
                               f"order for {hostname}")
        cert_url = order.get("certificate")
        if not cert_url:
            raise IssuerError(f"order for {hostname} is valid but has no certificate URL")
        chain = self._post(cert_url, None, accept="application/pem-certificate-chain").body
        leaf = x509.load_pem_x509_certificates(chain)[0] if b"BEGIN CERT" in chain else None
        if leaf is None or _spki(leaf.public_key()) != _spki(key.public_key()):
            raise IssuerError(f"CA returned a certificate that does not match our key for "
                              f"{hostname}")
        return chain

    def _authorize(self, authz_url: str, account_jwk: dict[str, str], solver: Solver) -> None:
        authz: dict[str, Any] = self._post(authz_url, None).json()
        name = authz.get("identifier", {}).get("value", "?")
        if authz.get("status") == "valid":
            return
        chall = next((c for c in authz.get("challenges", []) if c.get("type") == "http-01"), None)
        if chall is None:
            raise IssuerError(f"ACME CA offers no http-01 challenge for {name}")
        token = chall["token"]
        solver.present(token, key_authorization(token, account_jwk))
        try:
            self._post(chall["url"], {})
            self._poll(authz_url, lambda a: a.get("status") == "valid",
                       f"authorization of {name}")
        finally:
            solver.cleanup(token)


def _spki(pub: Any) -> bytes:
    return bytes(pub.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _problem(resp: _Response) -> dict[str, Any]:
    try:
        obj = json.loads(resp.body)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _error_detail(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("detail") or err.get("type"))
    for ch in obj.get("challenges", []):
        if isinstance(ch, dict) and isinstance(ch.get("error"), dict):
            return str(ch["error"].get("detail") or ch["error"].get("type"))
    return "no detail"
