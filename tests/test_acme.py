"""ACME client: JWS/EAB/CSR pieces as unit tests, issuance against real Pebble."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from edge_env import EAB_KEY, EAB_KID, Pebble
from hypothesis import given
from hypothesis import strategies as st

from mcp_node.acme import (
    AcmeClient,
    Http01Responder,
    b64u,
    b64u_decode,
    cert_info,
    eab_binding,
    jwk,
    jwk_thumbprint,
    jws,
    key_authorization,
    load_or_create_key,
    make_csr,
    new_key,
)
from mcp_node.errors import IssuerError
from mcp_node.files import atomic_write


def _dec(part: str) -> dict[str, object]:
    return json.loads(b64u_decode(part))


@given(st.binary(max_size=200))
def test_b64u_roundtrip_unpadded(data: bytes) -> None:
    text = b64u(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64u_decode(text) == data


def test_jwk_and_thumbprint_match_rfc7638_recipe() -> None:
    key = new_key()
    j = jwk(key.public_key())
    assert list(j) == ["crv", "kty", "x", "y"] and j["kty"] == "EC" and j["crv"] == "P-256"
    nums = key.public_key().public_numbers()
    assert int.from_bytes(b64u_decode(j["x"]), "big") == nums.x
    assert len(b64u_decode(j["y"])) == 32
    canon = ('{"crv":"P-256","kty":"EC","x":"' + j["x"] + '","y":"' + j["y"] + '"}').encode()
    assert jwk_thumbprint(j) == b64u(hashlib.sha256(canon).digest())
    assert key_authorization("tok", j) == "tok." + jwk_thumbprint(j)


def test_jws_es256_verifies_and_post_as_get_has_empty_payload() -> None:
    key = new_key()
    msg = jws(key, {"alg": "ES256", "nonce": "n1", "url": "https://ca/x", "kid": "k"}, {"a": 1})
    assert _dec(msg["protected"]) == {"alg": "ES256", "nonce": "n1", "url": "https://ca/x",
                                      "kid": "k"}
    assert _dec(msg["payload"]) == {"a": 1}
    sig = b64u_decode(msg["signature"])
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.public_key().verify(der, f"{msg['protected']}.{msg['payload']}".encode(),
                            ec.ECDSA(hashes.SHA256()))
    get = jws(key, {"alg": "ES256"}, None)
    assert get["payload"] == ""


def test_eab_binding_is_hs256_over_account_jwk() -> None:
    acct = jwk(new_key().public_key())
    b = eab_binding(acct, EAB_KID, EAB_KEY, "https://ca/new-account")
    assert _dec(b["protected"]) == {"alg": "HS256", "kid": EAB_KID,
                                    "url": "https://ca/new-account"}
    assert _dec(b["payload"]) == acct
    mac = hmac.new(base64.urlsafe_b64decode(EAB_KEY + "=" * (-len(EAB_KEY) % 4)),
                   f"{b['protected']}.{b['payload']}".encode(), hashlib.sha256).digest()
    assert b64u_decode(b["signature"]) == mac


def test_eab_bad_key_is_issuer_error() -> None:
    with pytest.raises(IssuerError, match="eab_hmac_key"):
        eab_binding(jwk(new_key().public_key()), "kid", "not!base64", "https://ca/a")


def test_csr_names_only_the_hostname() -> None:
    key = new_key()
    csr = x509.load_der_x509_csr(make_csr(key, "www.example.net"))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.net"]
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()


def test_account_key_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "acme" / "account.key"
    k1 = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k2 = load_or_create_key(path)
    assert k1.private_numbers() == k2.private_numbers()


def test_account_key_of_wrong_type_refused(tmp_path: Path) -> None:
    path = tmp_path / "account.key"
    other = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(IssuerError, match="P-256"):
        load_or_create_key(path)


def test_atomic_write_mode_and_no_temp_left(tmp_path: Path) -> None:
    target = tmp_path / "d" / "k.pem"
    atomic_write(target, b"one", 0o600)
    atomic_write(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["k.pem"]


def test_cert_info_rejects_garbage() -> None:
    with pytest.raises(IssuerError):
        cert_info(b"not a certificate")


def test_client_needs_directory(tmp_path: Path) -> None:
    with pytest.raises(IssuerError, match="acme.directory"):
        AcmeClient("", tmp_path / "k")


# -- against real Pebble --------------------------------------------------------------

def _client(pebble: Pebble, tmp_path: Path, **kw: str) -> AcmeClient:
    return AcmeClient(pebble.directory_url, tmp_path / "account.key",
                      ca_bundle=str(pebble.ca_bundle), **kw)


def test_issue_with_real_http01(pebble: Pebble, tmp_path: Path) -> None:
    client = _client(pebble, tmp_path)
    key = new_key()
    responder = Http01Responder(pebble.http01_port)
    try:
        chain = client.issue("acme-test.example.net", key, responder)
    finally:
        responder.close()
    certs = x509.load_pem_x509_certificates(chain)
    assert len(certs) >= 2  # leaf + intermediate
    leaf = certs[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["acme-test.example.net"]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    info = cert_info(chain)
    assert info.serial == format(leaf.serial_number, "x")
    assert info.expires.endswith("Z")
    # the issued leaf chains to Pebble's root
    root = x509.load_pem_x509_certificate(pebble.root_pem())
    assert certs[-1].issuer == root.subject
    # the account key survives for the next client
    again = _client(pebble, tmp_path)
    assert again._account() == client._account()


class _Silent:
    """A solver that serves nothing: real validation must then fail."""

    def present(self, token: str, key_auth: str) -> None:
        pass

    def cleanup(self, token: str) -> None:
        pass


def test_failed_http01_validation_is_issuer_error(pebble: Pebble, tmp_path: Path) -> None:
    client = _client(pebble, tmp_path)
    client.poll_timeout = 60
    with pytest.raises(IssuerError, match="invalid"):
        client.issue("nobody-answers.example.net", new_key(), _Silent())


def test_eab_required_and_honoured(pebble_factory: Callable[..., Pebble],
                                   tmp_path: Path) -> None:
    peb = pebble_factory(eab=True, always_valid=True)
    with pytest.raises(IssuerError, match="External Account Binding"):
        _client(peb, tmp_path / "a")._account()
    wrong = _client(peb, tmp_path / "b", eab_kid=EAB_KID,
                    eab_hmac_key=b64u(b"x" * 32))
    with pytest.raises(IssuerError):
        wrong._account()
    good = _client(peb, tmp_path / "c", eab_kid=EAB_KID, eab_hmac_key=EAB_KEY)
    responder = Http01Responder(peb.http01_port)
    try:
        chain = good.issue("eab.example.net", new_key(), responder)
    finally:
        responder.close()
    assert b"BEGIN CERTIFICATE" in chain


def test_stopped_ca_is_issuer_error(pebble_factory: Callable[..., Pebble],
                                    tmp_path: Path) -> None:
    peb = pebble_factory(always_valid=True)
    client = _client(peb, tmp_path)
    client.ping()
    peb.stop()
    with pytest.raises(IssuerError, match="unreachable"):
        client.ping()


def test_untrusted_ca_bundle_is_issuer_error(pebble: Pebble, tmp_path: Path) -> None:
    client = AcmeClient(pebble.directory_url, tmp_path / "k")  # system trust: Pebble unknown
    with pytest.raises(IssuerError, match="unreachable"):
        client.ping()


def test_account_the_ca_forgot_is_registered_again(pebble_factory: Callable[..., Pebble],
                                                   tmp_path: Path) -> None:
    """The agent keeps one client for its lifetime; a CA that lost the account (Pebble
    restarted, an account deactivated) must not fail every later renewal."""
    peb = pebble_factory(always_valid=True)
    client = _client(peb, tmp_path)
    client._account()
    peb.stop()
    peb.start()     # same ports, no accounts
    responder = Http01Responder(peb.http01_port)
    try:
        chain = client.issue("again.example.net", new_key(), responder)
    finally:
        responder.close()
    assert b"BEGIN CERTIFICATE" in chain and client._kid is not None


def test_malformed_directory_is_issuer_error(tmp_path: Path) -> None:
    """A CA (or something else at the URL) answering JSON without the ACME resources is an
    IssuerError naming what is missing, not a KeyError/AttributeError (an HTTP 500)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = iter([b"{}", b"[1, 2]"])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            body = next(bodies, b"{}")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for _ in range(2):
            client = AcmeClient(f"http://127.0.0.1:{srv.server_address[1]}/dir",
                                tmp_path / "account.key")
            with pytest.raises(IssuerError, match="directory"):
                client.issue("x.example.net", new_key(), _Silent())
    finally:
        srv.shutdown()
        srv.server_close()
