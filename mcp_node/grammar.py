"""The grammars of the definition's small strings, each parsed in one place.

``KEY=VALUE`` env items, ``/host:/guest[:opt,opt]`` volumes and OCI image
references are checked by servicedef (errors name the field) and taken apart
again by the runtimes and VM builders with the same functions, so no two
readers disagree. The regular expressions are exported so the OpenAPI
document states exactly the rules enforced here.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from .errors import HostPathError, ValidationError

MAX_STR = 4096
# A lone UTF-16 surrogate (JSON "\ud800") cannot be encoded: podman's client raised
# UnicodeEncodeError (a 500) on it, or it silently became U+FFFD in the container.
BAD_CHARS_RE = re.compile("[\x00\ud800-\udfff]")
# For the OpenAPI document: JSON Schema validators (Rust's regex among them) cannot name
# surrogates in a pattern, and valid Unicode text holds none, so only NUL is spelled out.
TEXT_PATTERN = "^[^\\u0000]*$"

ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# $PORT and $PORT_<NAME> are the agent's (route_env): a definition setting one would
# be overridden silently, so they are refused whether or not a route uses them now.
RESERVED_ENV_RE = re.compile(r"PORT(_[A-Za-z0-9_]*)?")
ENV_PATTERN = "^(?!PORT(?:=|_[A-Za-z0-9_]*=))[A-Za-z_][A-Za-z0-9_]*=[^\\u0000]*$"

# A secret's name (issue 20): a file name under /run/secrets/, and what an env value
# ``secret:NAME`` refers to.
SECRET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
SECRET_NAME_PATTERN = "^[a-z0-9][a-z0-9_.-]{0,62}$"  # noqa: S105 - a name's syntax
SECRET_PREFIX = "secret:"  # noqa: S105 - the env value prefix

VOLUME_OPTIONS = ("ro", "rw", "z", "Z")
# podman takes one option of each family ("can only specify 1 'rw' or 'ro' option", and
# of 'z', 'Z'): two came through as a 502 at create.
VOLUME_OPTION_FAMILIES = (("ro", "rw"), ("z", "Z"))
# Guest paths the kernel and the runtime mount themselves: a bind on / or on /proc (or
# below it) fails at start, one on /dev leaves no /dev/null, one on /sys hides sysfs; a
# Linux VM's init mounts the same three.
RESERVED_GUEST = ("/proc", "/sys", "/dev")
# Control characters would reach podman's and qemu's argument parsers and a VM's init.
CONTROL_RE = re.compile("[\x01-\x1f\x7f]")
VOLUME_PATTERN = ("^/[^:,\\u0000]*:/[^:,\\u0000]*"
                  "(?::(?:ro|rw|z|Z)(?:,(?:ro|rw|z|Z))*)?$")

# distribution/reference (the grammar podman's containers/image parses), regexp.go.
_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = f"{_ALNUM}(?:{_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_NAME = f"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
# go-digest accepts only the algorithms it knows, each with its exact lowercase length.
_DIGEST = r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}"
IMAGE_RE = re.compile(f"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?")
IMAGE_PATTERN = f"^{_NAME}(?::{_TAG}|@(?:{_DIGEST}))?$"
# podman reads a bare hex string of 1 to 64 characters as an image ID or a prefix of one,
# whatever image that is; a tag, a domain, a path or a digest (or more than 64) makes a name.
# The OpenAPI document says so in words: as a lookahead in IMAGE_PATTERN, or as a "not"
# beside it, schemathesis's coverage phase for Deploy ran past 600 s (254 s without).
IMAGE_ID_PATTERN = "^[a-f0-9]{1,64}$"
_IMAGE_ID_RE = re.compile(IMAGE_ID_PATTERN[1:-1])
# distribution caps the name at 255 (NameTotalLengthMax); capping the whole reference
# there is a little stricter and states the same rule in one JSON Schema maxLength.
MAX_IMAGE = 255


def check_text(value: object, field: str, *, max_len: int = MAX_STR,
               allow_empty: bool = True) -> str:
    """A string that can reach argv, labels, files and JSON: bounded, no NUL or lone
    surrogate (neither survives encoding to UTF-8 unchanged)."""
    if not isinstance(value, str):
        raise ValidationError("must be a string", field)
    if not value and not allow_empty:
        raise ValidationError("must not be empty", field)
    if len(value) > max_len:
        raise ValidationError(f"longer than {max_len} characters", field)
    bad = BAD_CHARS_RE.search(value)
    if bad:
        what = "NUL" if bad.group() == "\x00" else f"a lone surrogate U+{ord(bad.group()):04X}"
        raise ValidationError(f"contains {what} at offset {bad.start()}", field)
    return value


def check_image(value: object, field: str = "image") -> str:
    """An OCI image reference as distribution/reference parses it: ``[domain/]path[:tag]``
    or ``...@sha256:<64 hex>``, at most 255 characters. podman would refuse anything
    else only after the deploy started (a 502 for a client mistake)."""
    text = check_text(value, field, max_len=MAX_IMAGE, allow_empty=False)
    m = IMAGE_RE.fullmatch(text)
    if m is None:
        raise ValidationError(
            f"{text[:80]!r} is not an image reference ([domain[:port]/]path[:tag] or "
            "...@sha256:<64 hex>; path components lowercase)", field)
    if m.group(2) and m.group(3):
        raise ValidationError(f"{text[:80]!r} has both a tag and a digest; give one", field)
    if _IMAGE_ID_RE.fullmatch(text):
        raise ValidationError(
            f"{text[:80]!r} would be read as an image ID (or a prefix of one), running "
            f"whichever local image has it; name the image, e.g. {text[:80]}:latest or "
            f"docker.io/library/{text[:80]}", field)
    return text


def check_secret_name(value: object, field: str = "name") -> str:
    if not isinstance(value, str):
        raise ValidationError("must be a string", field)
    if not SECRET_NAME_RE.fullmatch(value):
        raise ValidationError(f"{value[:80]!r} is not a valid secret name "
                              "([a-z0-9][a-z0-9_.-]{0,62})", field)
    return value


def secret_ref(value: str) -> str | None:
    """The secret an env value ``secret:NAME`` names, else None (a plain value)."""
    return value[len(SECRET_PREFIX):] if value.startswith(SECRET_PREFIX) else None


def secret_refs(env: Iterable[str]) -> list[str]:
    """The secrets ``env``'s values name, in order (each once)."""
    out: list[str] = []
    for item in env:
        name = secret_ref(item.partition("=")[2])
        if name is not None and name not in out:
            out.append(name)
    return out


def parse_env_item(item: str, field: str = "env") -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not ENV_KEY_RE.fullmatch(key):
        raise ValidationError(f"{item[:80]!r} is not KEY=VALUE", field)
    return key, value


def parse_env(items: Iterable[str], field: str = "env") -> list[tuple[str, str]]:
    """``KEY=VALUE`` items as pairs, in order; an error names ``field[i]``."""
    return [parse_env_item(item, f"{field}[{i}]") for i, item in enumerate(items)]


def check_env(items: Sequence[str], field: str = "env") -> list[tuple[str, str]]:
    """A definition's env: well-formed, no key the agent sets itself, no key twice."""
    pairs = parse_env(items, field)
    seen: dict[str, int] = {}
    for i, (key, _) in enumerate(pairs):
        if RESERVED_ENV_RE.fullmatch(key):
            raise ValidationError(f"{key} is set by the agent (PORT, PORT_<ROUTE>); "
                                  "rename it", f"{field}[{i}]")
        if key in seen:
            raise ValidationError(f"{key} is set twice (also {field}[{seen[key]}])",
                                  f"{field}[{i}]")
        seen[key] = i
        ref = secret_ref(pairs[i][1])
        if ref is not None:
            check_secret_name(ref, f"{field}[{i}]")
    return pairs


@dataclass(frozen=True)
class Volume:
    host: str
    guest: str
    options: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def canonical_path(path: str) -> str:
    """One spelling per absolute path: ``//x``, ``/x/``, ``/./x`` are ``/x`` (posixpath
    keeps a leading ``//``, and podman took ``/x`` and ``//x`` for two mounts)."""
    return posixpath.normpath("/" + path.lstrip("/"))


def parse_volume(text: str, field: str = "volumes") -> Volume:
    """``/host:/guest[:opt,...]`` with both paths canonical, or a ValidationError saying
    what podman or qemu would have refused later (a 502 after the deploy started)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2]):
        raise ValidationError(f"{text[:80]!r} is not /host/path:/guest/path[:opts]", field)
    if any(".." in PurePosixPath(p).parts or "," in p for p in parts[:2]):
        raise ValidationError(f"{text[:80]!r} has '..' or ','", field)
    ctrl = CONTROL_RE.search(text)
    if ctrl:
        raise ValidationError(f"{text[:80]!r} contains a control character "
                              f"(U+{ord(ctrl.group()):04X})", field)
    host, guest = canonical_path(parts[0]), canonical_path(parts[1])
    if guest == "/":
        raise ValidationError(f"{text[:80]!r} mounts on the guest's /; name a directory", field)
    for reserved in RESERVED_GUEST:
        if guest == reserved or guest.startswith(reserved + "/"):
            raise ValidationError(
                f"{text[:80]!r}: {reserved} is the kernel's in the guest "
                f"({', '.join(RESERVED_GUEST)} are not volume targets)", field)
    opts = tuple(parts[2].split(",")) if len(parts) == 3 else ()
    bad = [o for o in opts if o not in VOLUME_OPTIONS]
    if bad:
        raise ValidationError(
            f"unsupported volume option(s) {', '.join(repr(o) for o in bad)} in {text[:80]!r}; "
            f"allowed: {', '.join(VOLUME_OPTIONS)}", field)
    for family in VOLUME_OPTION_FAMILIES:
        given = [o for o in opts if o in family]
        if len(given) > 1:
            raise ValidationError(f"{text[:80]!r} has {','.join(given)}: at most one of "
                                  f"{' or '.join(family)}", field)
    return Volume(host=host, guest=guest, options=opts)


def parse_volumes(items: Iterable[str], field: str = "volumes") -> tuple[Volume, ...]:
    """Each volume, and no host or guest path twice: podman kept only the last mount of
    a guest path, and two mounts of one host path are one volume the definition hides."""
    vols = tuple(parse_volume(v, f"{field}[{i}]") for i, v in enumerate(items))
    hosts: dict[str, int] = {}
    guests: dict[str, int] = {}
    for i, v in enumerate(vols):
        for what, path, seen in (("host", v.host, hosts), ("guest", v.guest, guests)):
            if path in seen:
                raise ValidationError(f"{what} path {path!r} is also in {field}[{seen[path]}]",
                                      f"{field}[{i}]")
            seen[path] = i
    return vols


def default_volume_roots(state_dir: os.PathLike[str] | str) -> tuple[str, ...]:
    return (os.path.join(os.fspath(state_dir), "volumes"), "/srv")


def volume_roots(configured: Sequence[str],
                 state_dir: os.PathLike[str] | str) -> tuple[str, ...]:
    """``[podman] volume_roots``, or the defaults when it is empty."""
    return tuple(configured) or default_volume_roots(state_dir)


def _real_root(root: str) -> str:
    try:
        return os.path.realpath(root)
    except OSError:   # a root that cannot be resolved admits nothing beyond its own text
        return os.path.normpath(root)


def within_roots(real: str, roots: Sequence[str]) -> bool:
    """Whether a resolved path is one of the (resolved) roots or below one."""
    return any(real == r or real.startswith(r.rstrip("/") + "/")
               for r in (_real_root(root) for root in roots))


def resolve_host(path: str, field: str) -> str:
    """The host path with every symlink resolved now; HostPathError if it is missing or
    cannot be resolved (``/proc/1/root`` raised PermissionError: a 500)."""
    try:
        return os.path.realpath(path, strict=True)
    except FileNotFoundError:
        raise HostPathError(f"host path {path} does not exist on this node; create it "
                            "first", field) from None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise HostPathError(f"host path {path} cannot be resolved: {why}", field) from None


def resolve_volumes(volumes: Iterable[Volume], roots: Sequence[str],
                    field: str = "volumes") -> tuple[Volume, ...]:
    """Each volume with its host path resolved now, checked to lie under a resolved root
    and to be no other volume's directory; else a HostPathError naming ``field[j]``.

    Called at deploy and again right before every container create or start and VM
    boot, and the resolved path is what podman or qemu is given, so what is mounted is
    the directory checked, whatever the definition's symlinks point at later; only a
    swap of a directory on the resolved path itself between this check and the mount
    is not seen (podman's next start checks its bind sources again). A root token would
    otherwise mount ``/`` or ``/etc`` read-write into a container running as root."""
    seen: dict[str, int] = {}
    out = []
    for j, v in enumerate(volumes):
        where = f"{field}[{j}]"
        real = resolve_host(v.host, where)
        shown = v.host if real == v.host else f"{v.host} (resolves to {real})"
        if not within_roots(real, roots):
            raise HostPathError(
                f"host path {shown} is outside the volume roots ({', '.join(roots)}); "
                "widen [podman] volume_roots to allow it", where)
        if real in seen:
            raise HostPathError(f"host path {shown} is the directory of {field}[{seen[real]}] "
                                "too", where)
        seen[real] = j
        out.append(replace(v, host=real))
    return tuple(out)


def check_volume_roots(volumes: Iterable[Volume], roots: Sequence[str], field: str) -> None:
    """``resolve_volumes`` for its errors only (the deploy-time check)."""
    resolve_volumes(volumes, roots, field)


NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
MAX_LIST = 256


def check_name(value: object, field_name: str) -> str:
    """Service and component names: they reach paths, labels and argv."""
    if not isinstance(value, str):
        raise ValidationError("must be a string", field_name)
    if not NAME_RE.fullmatch(value):
        raise ValidationError(
            f"{value[:80]!r} is not a valid name ([a-z0-9][a-z0-9-]{{0,62}})", field_name
        )
    return value


def check_seconds(value: object, field_name: str, low: float, high: float) -> float:
    """A number of seconds in [low, high] (an int or a float; not a bool, NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValidationError("must be a number of seconds", field_name)
    if not low <= value <= high:
        raise ValidationError(f"must be {low:g}-{high:g} (is {value!r:.40})", field_name)
    return float(value)
