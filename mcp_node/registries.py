"""Private registries (issue 20): the login and the CA every pull of the agent uses.

``[registries."HOST[:PORT]"]`` (config.RegistryConfig) names, per registry, an auth file
in the containers-auth.json format podman and skopeo write, or a user with a password
file, and a CA bundle. The files are read at each pull, so a changed password or CA
needs no restart. How each pull gets them, measured on podman 4.3:

- The login: a container's pull (the libpod REST API) carries it in the
  ``X-Registry-Auth`` header; the podman CLI (a unikernel's ELF comes out of an image)
  reads an auth file from a memfd, ``--authfile /proc/self/fd/N``, so no credential is
  on any disk the agent writes or on any command line, and none is ever logged:
  ``Credential``'s repr leaves the secret out.
- The CA: podman 4.3 has no setting for a certs.d of one's own, but containers/image
  looks for ``$HOME/.config/containers/certs.d/HOST:PORT/ca.crt`` at every pull, as root
  too. The podman service the agent starts runs with ``HOME`` at ``<state>/registries/home``,
  where each configured CA is copied (at each pull, so a changed file is seen at once)
  beside links to what the real home holds there (its certs.d hosts, registries.conf,
  policy.json, auth.json, ``.docker``), so nothing the service read before is lost; the
  CLI gets that host's directory as ``--cert-dir``. Nothing under /etc is written.

A refused pull is told apart by podman's words (``classify``): an unknown authority, a
refused (or missing) login and a missing image each become an ``ImageError`` naming the
registry, the image and the key to set; the deploy or plan it belongs to has changed
nothing by then.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import RegistriesConfig, RegistryConfig, registry_key
from .errors import ImageError, ValidationError

DEFAULT_REGISTRY = "docker.io"
HOME_LINKS = (".docker", ".dockercfg")     # what containers/image reads under $HOME
CONTAINERS_DIR = Path(".config") / "containers"


def registry_of(image: str) -> str:
    """The registry a reference pulls from: its first component when that is a host
    (has a dot or a port, or is ``localhost``), else Docker Hub (as podman resolves a
    fully qualified name; a short name is refused by podman's short-name rules)."""
    first, sep, _rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        return first
    return DEFAULT_REGISTRY


def repository_of(image: str) -> str:
    """``host/path`` without the tag or digest."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


@dataclass(frozen=True)
class Credential:
    """A login for one registry. ``repr`` and ``str`` never show the secret."""

    username: str
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""             # the config key it came from, for errors

    def header(self) -> str:
        """The libpod pull API's ``X-Registry-Auth``: base64url of a docker AuthConfig."""
        body = ({"identitytoken": self.identity_token} if self.identity_token
                else {"username": self.username, "password": self.password})
        return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()

    def auth_json(self, host: str) -> bytes:
        """A containers-auth.json holding this login alone, for the podman CLI."""
        if self.identity_token:
            entry = {"identitytoken": self.identity_token}
        else:
            entry = {"auth": base64.b64encode(
                f"{self.username}:{self.password}".encode()).decode()}
        return json.dumps({"auths": {host: entry}}).encode()


def _private_text(path: Path, key: str) -> str:
    """A file only its owner can read (0600 or stricter): ImageError naming ``key``."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{key}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ImageError(f"{key}: {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                             "it must be 0600 (readable by its owner alone)")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ImageError(f"{key}: {path} is not UTF-8 text") from exc


def _normal_key(key: str) -> str:
    """An auth.json key as ``host[/path]``: a scheme and docker's ``/v1/``, ``/v2/`` go."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
    key = key.rstrip("/")
    host, sep, path = key.partition("/")
    return host if sep and path in ("v1", "v2") else key


def from_auth_json(text: str, image: str, key: str) -> Credential:
    """The login ``text`` (a containers-auth.json) holds for ``image``: its most specific
    entry (``host/ns/repo``, then ``host/ns``, then ``host``), as podman picks it."""
    try:
        auths = json.loads(text).get("auths")
    except (ValueError, AttributeError) as exc:
        raise ImageError(f"{key}: not a containers-auth.json file (JSON with \"auths\")"
                         ) from exc
    if not isinstance(auths, dict):
        raise ImageError(f"{key}: not a containers-auth.json file (no \"auths\" table)")
    entries = {_normal_key(str(k)): v for k, v in auths.items()}
    host = registry_of(image)
    repo = repository_of(image)
    scopes = [repo[:i] for i in range(len(repo), len(host), -1)
              if i == len(repo) or repo[i] == "/"] + [host]
    for scope in scopes:
        entry = entries.get(scope)
        if not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            return Credential("", identity_token=str(entry["identitytoken"]), source=key)
        try:
            user, sep, password = base64.b64decode(
                str(entry.get("auth", "")), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageError(f"{key}: the entry for {scope} has no valid \"auth\" "
                             "(base64 of user:password)") from exc
        if not sep or not user:
            raise ImageError(f"{key}: the entry for {scope} has no valid \"auth\" "
                             "(base64 of user:password)")
        return Credential(user, password, source=key)
    raise ImageError(f"{key}: no entry for {host} (nor for {repo})")


def read_password(text: str, key: str) -> str:
    """A password file's content: one line, its line end dropped."""
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    if not password or "\n" in password:
        raise ImageError(f"{key}: the file must hold the password alone, on one line")
    return password


def credential(reg: RegistryConfig, image: str) -> Credential | None:
    """The login ``reg`` gives for ``image`` (files read now), None when it gives none."""
    if reg.auth_file:
        key = registry_key(reg.host, "auth_file")
        return from_auth_json(_private_text(Path(reg.auth_file), key), image, key)
    if reg.username:
        key = registry_key(reg.host, "password_file")
        return Credential(reg.username,
                          read_password(_private_text(Path(reg.password_file), key), key),
                          source=key)
    return None


def read_ca(reg: RegistryConfig) -> bytes:
    """The CA bundle's PEM, checked to hold at least one certificate."""
    from cryptography import x509

    key = registry_key(reg.host, "ca_file")
    try:
        data = Path(reg.ca_file).read_bytes()
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate")
    except OSError as exc:
        raise ImageError(f"{key}: cannot read {reg.ca_file}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ImageError(f"{key}: {reg.ca_file} holds no PEM certificate") from exc
    return data


def check_files(cfg: RegistriesConfig) -> list[ValidationError]:
    """For ``mcp-agent check-config``: each registry's files exist, parse, and the login
    files are 0600. An auth file must hold an entry for its own registry."""
    errors = []
    for reg in cfg.hosts:
        try:
            credential(reg, f"{reg.host}/x")
        except ImageError as exc:
            errors.append(ValidationError(str(exc)))
        if reg.ca_file:
            try:
                read_ca(reg)
            except ImageError as exc:
                errors.append(ValidationError(str(exc)))
    return errors


@dataclass(frozen=True)
class PullAuth:
    """What one pull is given: the registry's config (None: not configured), its login
    and the directory of its CA (``--cert-dir``; None: the system's trust)."""

    image: str
    host: str
    reg: RegistryConfig | None
    cred: Credential | None
    cert_dir: Path | None


class Registries:
    """The node's registries config and the HOME its podman service runs with."""

    def __init__(self, cfg: RegistriesConfig, state_dir: Path,
                 real_home: Path | None = None) -> None:
        self.cfg = cfg
        self.home = Path(state_dir).absolute() / "registries" / "home"
        self.real_home = real_home if real_home is not None else _real_home(self.home)

    @property
    def certs_d(self) -> Path:
        return self.home / CONTAINERS_DIR / "certs.d"

    def for_image(self, image: str) -> PullAuth:
        """Read what a pull of ``image`` needs (ImageError naming the key when a file is
        unreadable, not 0600 or holds nothing usable), its CA put in place."""
        host = registry_of(image)
        reg = self.cfg.get(host)
        if reg is None:
            return PullAuth(image, host, None, None, None)
        cred = credential(reg, image)
        cert_dir = None
        if reg.ca_file:
            cert_dir = self.certs_d / host
            self._put(cert_dir / "ca.crt", read_ca(reg))
        return PullAuth(image, host, reg, cred, cert_dir)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        """``data`` at ``path`` (atomically), never through a link into the real home."""
        for p in (path.parent, path):
            if p.is_symlink():
                p.unlink()
        with contextlib.suppress(OSError):
            if path.read_bytes() == data:
                return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def prepare_home(self) -> Path:
        """The podman service's HOME: each configured CA in its certs.d, and links to what
        the real home holds for containers/image (module doc). Made again at each service
        start; a link of ours that now points nowhere goes."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.certs_d.mkdir(parents=True, exist_ok=True)
        real = self.real_home
        ours = {r.host for r in self.cfg.hosts if r.ca_file}
        for entry in _entries(self.certs_d):
            if entry.is_symlink() and (entry.name in ours or not entry.exists()):
                entry.unlink()
            elif not entry.is_symlink() and entry.name not in ours:
                shutil.rmtree(entry, ignore_errors=True)   # a CA no longer configured
        if real.resolve() != self.home.resolve():
            for name in HOME_LINKS:
                self._link(real / name, self.home / name)
            real_containers = real / CONTAINERS_DIR
            for entry in _entries(real_containers):
                if entry.name != "certs.d":
                    self._link(entry, self.home / CONTAINERS_DIR / entry.name)
            for entry in _entries(real_containers / "certs.d"):
                if entry.name not in ours:
                    self._link(entry, self.certs_d / entry.name)
        for reg in self.cfg.hosts:
            if reg.ca_file:
                with contextlib.suppress(ImageError):   # the pull names the key
                    self._put(self.certs_d / reg.host / "ca.crt", read_ca(reg))
        return self.home

    @staticmethod
    def _link(target: Path, link: Path) -> None:
        if not (target.exists() or target.is_symlink()):
            return
        with contextlib.suppress(OSError):
            if link.is_symlink() and Path(os.readlink(link)) == target:
                return
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                return   # ours (a configured CA's directory)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)


def _real_home(fallback: Path) -> Path:
    """The home podman would use without us (``$HOME``, else the password database)."""
    try:
        return Path.home()
    except (KeyError, RuntimeError):
        return fallback   # none at all: nothing to link


def _entries(directory: Path) -> Iterator[Path]:
    try:
        yield from sorted(directory.iterdir())
    except OSError:
        return


# -- what podman's refusal means --------------------------------------------------------

UNKNOWN_CA = ("cannot pull image {image}: the TLS certificate of registry {host} is signed "
              "by an unknown authority; set {key} to the CA bundle that signed it. Nothing "
              "was changed")
NOT_OURS = (" ({key} is set, but the podman service at {socket} was not started by the "
            "agent and cannot be given it: put the CA in /etc/containers/certs.d/{host}/"
            "ca.crt, or leave podman.socket empty)")
REFUSED = ("cannot pull image {image}: registry {host} refused the login of {user} from "
           "{key}; set it to a login the registry accepts. Nothing was changed")
NO_LOGIN = ("cannot pull image {image}: registry {host} asks for a login; set {key} (or "
            "{alt}). Nothing was changed")
MISSING = ("cannot pull image {image}: registry {host} has no such image (manifest unknown); "
           "set the image of component {component} to one it has. Nothing was changed")

_CA_WORDS = ("x509: certificate signed by unknown authority", "certificate signed by unknown")
_AUTH_WORDS = ("unauthorized", "authentication required", "denied")
_MISSING_WORDS = ("manifest unknown", "name unknown")


def classify(pull: PullAuth, message: str, component: str, socket: str = "") -> ImageError:
    """podman's refusal of ``pull`` as an ImageError naming the registry, the image and
    the key to set; anything else as ``cannot pull image IMAGE: MESSAGE``. ``socket``: a
    podman service the agent did not start (so a configured CA could not be given)."""
    low = message.lower()
    host, image = pull.host, pull.image
    if any(w in low for w in _CA_WORDS):
        key = registry_key(host, "ca_file")
        text = UNKNOWN_CA.format(image=image, host=host, key=key)
        if socket and pull.reg is not None and pull.reg.ca_file:
            text += NOT_OURS.format(key=key, socket=socket, host=host)
        return ImageError(text)
    if any(w in low for w in _AUTH_WORDS):
        if pull.cred is not None:
            user = pull.cred.username or "the identity token"
            return ImageError(REFUSED.format(image=image, host=host, user=user,
                                             key=pull.cred.source))
        return ImageError(NO_LOGIN.format(
            image=image, host=host, key=registry_key(host, "auth_file"),
            alt=f"{registry_key(host, 'username')} and password_file"))
    if any(w in low for w in _MISSING_WORDS):
        return ImageError(MISSING.format(image=image, host=host, component=component))
    return ImageError(f"cannot pull image {image}: {message}")
