"""Bearer tokens with roles, stored only as SHA-256 hashes.

The store is a TOML file of ``[[tokens]] name, role, sha256`` (and, for a
token rotated with a grace period, ``previous_sha256`` and ``previous_until``,
a UTC time: the replaced token works until then). It holds
credentials, so a file readable by anyone but its owner is refused rather
than silently trusted. The HTTP hot path checks a token with one SHA-256
and a constant-time comparison against every stored hash; the file is
re-read (at most once a second) when it changes, and on a miss when it is
not the file last read (one stat per miss), so a token from ``mcp-agent
token add`` works from the next request, without restarting the daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .config import AgentConfig
from .errors import AuthError, ForbiddenError, NotFoundError, TokenStoreError, ValidationError
from .files import atomic_write, flocked
from .safetext import loads_toml
from .servicedef import SHA256_RE, check_name

log = logging.getLogger(__name__)

ROLES: dict[str, int] = {"reader": 1, "operator": 2, "master": 3}
INITIAL_TOKEN_NAME = "initial"  # noqa: S105 - a name, not a secret
RELOAD_INTERVAL_S = 1.0


MAX_GRACE_S = 7 * 86400


def wall_clock() -> float:
    """Now, as a grace period's end is stored: wall-clock seconds (other processes read it)."""
    return time.time()


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    sha256: str
    # After ``token rotate --grace-s N``: the replaced token's hash, valid until then.
    previous_sha256: str = ""
    previous_until: float = 0.0

    def allows(self, least_role: str) -> bool:
        return ROLES[self.role] >= ROLES[least_role]

    def previous_live(self, now: float) -> bool:
        return bool(self.previous_sha256) and now < self.previous_until

    def current(self, now: float) -> Token:
        """This token without a previous hash whose grace ended (dropped at a rewrite)."""
        return self if self.previous_live(now) else Token(self.name, self.role, self.sha256)


def utc_text(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _until(value: object, at: str) -> float:
    try:
        if not isinstance(value, str) or not value.endswith("Z"):
            raise ValueError(value)
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise TokenStoreError(f"{at}.previous_until: must be a UTC time like "
                              f"2026-01-02T03:04:05Z") from None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return "mcp_" + secrets.token_urlsafe(32)


def check_role(role: object) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise ValidationError(f"{str(role)[:40]!r} is not one of {', '.join(ROLES)}", "role")
    return role


def tokens_path(config: AgentConfig) -> Path:
    if config.server.tokens_file:
        return Path(config.server.tokens_file).expanduser()
    return config.state_dir / "tokens.toml"


def token_file_path(config: AgentConfig) -> Path:
    """Where the generated first-start operator token is written."""
    return config.state_dir / "token"


def _check_file_mode(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise TokenStoreError(f"tokens file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise TokenStoreError(
            f"tokens file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
            f"(run: chmod 600 {path})"
        )
    if st.st_uid != os.geteuid():
        raise TokenStoreError(f"tokens file {path} is owned by uid {st.st_uid}, not by this user")


def parse_tokens(text: str, where: str) -> list[Token]:
    try:
        data = loads_toml(text, None)
    except ValidationError as exc:
        raise TokenStoreError(f"{where}: {exc}") from exc
    unknown = sorted(set(data) - {"tokens"})
    if unknown:
        raise TokenStoreError(f"{where}: unknown key {unknown[0]!r}")
    raw = data.get("tokens", [])
    if not isinstance(raw, list):
        raise TokenStoreError(f"{where}: tokens must be an array of tables")
    out: list[Token] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        at = f"{where}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise TokenStoreError(f"{at} must be a table")
        extra = sorted(set(entry) - set(TOKEN_KEYS))
        if extra:
            raise TokenStoreError(f"{at}: unknown key {extra[0]!r}")
        try:
            name = check_name(entry.get("name"), "name")
            role = check_role(entry.get("role"))
        except ValidationError as exc:
            raise TokenStoreError(f"{at}.{exc}") from exc
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest.lower()):
            raise TokenStoreError(f"{at}.sha256: must be 64 hex digits")
        if name in seen:
            raise TokenStoreError(f"{at}.name: duplicate token name {name!r}")
        seen.add(name)
        prev, until = entry.get("previous_sha256", ""), 0.0
        if prev or "previous_until" in entry:
            if not isinstance(prev, str) or not SHA256_RE.fullmatch(prev.lower()):
                raise TokenStoreError(f"{at}.previous_sha256: must be 64 hex digits")
            until = _until(entry.get("previous_until"), at)
        out.append(Token(name=name, role=role, sha256=digest.lower(),
                         previous_sha256=prev.lower(), previous_until=until))
    return out


TOKEN_KEYS = ("name", "role", "sha256", "previous_sha256", "previous_until")


def render_tokens(tokens: list[Token]) -> str:
    # Every value is validated (name regex, role enum, hex digest), so plain quoting is exact.
    parts = ["# mcp-agent tokens: only SHA-256 hashes are stored. Keep this file 0600.\n"]
    for t in tokens:
        parts.append(f'\n[[tokens]]\nname = "{t.name}"\nrole = "{t.role}"\nsha256 = "{t.sha256}"\n')
        if t.previous_sha256:
            parts.append(f'previous_sha256 = "{t.previous_sha256}"\n'
                         f'previous_until = "{utc_text(t.previous_until)}"\n')
    return "".join(parts)


class TokenStore:
    """Thread-safe view of the tokens file used by the server on every request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # The tokens and the cache of what they matched, replaced together as one tuple:
        # a lookup that began before a reload fills the old cache, never the new one.
        self._snapshot: tuple[list[Token], dict[str, Token]] = ([], {})
        self._sig: tuple[int, int, int] | None = None
        self._tried: tuple[int, int, int] | None = None   # stat's signature at the last read
        self._checked = 0.0
        self._error: TokenStoreError | None = None
        self.reload(force=True)
        if self._error is not None:
            raise self._error

    @classmethod
    def for_config(cls, config: AgentConfig) -> TokenStore:
        return cls(tokens_path(config))

    @property
    def tokens(self) -> list[Token]:
        return list(self._snapshot[0])

    def _read(self) -> tuple[list[Token], tuple[int, int, int] | None]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return [], None
        except OSError as exc:
            raise TokenStoreError(f"cannot open tokens file {self.path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            _check_file_mode(self.path, st)
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(1 << 20)
        finally:
            os.close(fd)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TokenStoreError(f"{self.path}: not UTF-8") from exc
        return parse_tokens(text, str(self.path)), (st.st_ino, st.st_mtime_ns, st.st_size)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload(self, force: bool = False) -> None:
        """Re-read the file if it changed; a bad file fails closed (no token is accepted)."""
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_INTERVAL_S:
            return
        with self._lock:
            if not force and now - self._checked < RELOAD_INTERVAL_S:
                return
            self._checked = now
            sig = self._stat()
            if not force and sig == self._sig and self._error is None:
                return
            self._load(sig)

    def _load(self, seen: tuple[int, int, int] | None) -> None:
        """Read the file (under ``_lock``); ``seen`` is the signature stat gave before."""
        self._tried = seen
        try:
            tokens, sig = self._read()
        except TokenStoreError as exc:
            if self._error is None or str(self._error) != str(exc):
                log.error("tokens refused: %s", exc)
            self._error = exc
            self._snapshot, self._sig = ([], {}), None
            return
        self._error = None
        self._snapshot = (tokens, {})
        self._sig = sig

    def _reload_on_miss(self) -> bool:
        """After a miss: re-read only if the file is not the one last read (a token added
        a moment ago), so a stream of invalid tokens costs one stat each, never a read."""
        if self._stat() == self._tried:
            return False
        with self._lock:
            sig = self._stat()
            if sig == self._tried:
                return False
            self._load(sig)
        return True

    def _match(self, digest: str) -> Token | None:
        tokens, by_hash = self._snapshot
        cached = by_hash.get(digest)
        if cached is not None:
            return cached
        found = old = None
        now = wall_clock()
        for t in tokens:  # no early exit: time does not depend on which one matched
            if hmac.compare_digest(t.sha256, digest):
                found = t
            if hmac.compare_digest(t.previous_sha256 or "-", digest) and t.previous_live(now):
                old = t
        if found is not None:
            by_hash[digest] = found   # one dict store: atomic under the GIL
        return found or old   # a replaced token in its grace: never cached, it expires

    def lookup(self, token: str) -> Token | None:
        """The stored token matching ``token``, compared in constant time; on a miss the
        file is re-read if it changed since it was last read."""
        self.reload()
        digest = hash_token(token)
        found = self._match(digest)
        if found is None and self._reload_on_miss():
            found = self._match(digest)
        return found

    def authorize(self, header: str | None, least_role: str) -> Token:
        """Check an ``Authorization`` header value; AuthError (401) or ForbiddenError (403)."""
        if not header:
            raise AuthError("missing bearer token (Authorization: Bearer <token>)")
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise AuthError("expected Authorization: Bearer <token>")
        tok = self.lookup(value)
        if tok is None:
            if self._error is not None:
                raise TokenStoreError("the agent's token store is unusable; see its log")
            raise AuthError("invalid token")
        if not tok.allows(least_role):
            raise ForbiddenError(f"token {tok.name!r} has role {tok.role}; needs {least_role}")
        return tok

    def _file_lock(self) -> AbstractContextManager[bool]:
        return flocked(self.path.with_name(self.path.name + ".lock"))

    def add(self, name: str, role: str) -> str:
        """Store a new token's hash and return the token (shown once, never stored)."""
        check_name(name, "name")
        check_role(role)
        with self._file_lock():
            tokens, _ = self._read()
            if any(t.name == name for t in tokens):
                raise ValidationError(f"a token named {name!r} already exists", "name")
            token = new_token()
            tokens.append(Token(name=name, role=role, sha256=hash_token(token)))
            self._write(tokens)
        self.reload(force=True)
        log.info("token added name=%s role=%s file=%s", name, role, self.path)
        return token

    def remove(self, name: str) -> None:
        """Forget token ``name``: it stops working at the agent's next request."""
        check_name(name, "name")
        with self._file_lock():
            tokens, _ = self._read()
            if not any(t.name == name for t in tokens):
                raise NotFoundError(f"no token named {name!r} "
                                    f"(tokens: {', '.join(t.name for t in tokens) or 'none'})")
            self._write([t for t in tokens if t.name != name])
        self.reload(force=True)
        log.info("token removed name=%s file=%s", name, self.path)

    def rotate(self, name: str, grace_s: float = 0) -> str:
        """A new token for ``name``, same role. The old one stops working at once, or
        with ``grace_s`` keeps working that long (its hash stored with the end, one
        previous token per name: a second rotate ends the first one's grace)."""
        check_name(name, "name")
        if not 0 <= grace_s <= MAX_GRACE_S:
            raise ValidationError(f"must be 0..{MAX_GRACE_S} seconds", "grace_s")
        with self._file_lock():
            tokens, _ = self._read()
            old = next((t for t in tokens if t.name == name), None)
            if old is None:
                raise NotFoundError(f"no token named {name!r} "
                                    f"(tokens: {', '.join(t.name for t in tokens) or 'none'})")
            token, now = new_token(), wall_clock()
            fresh = Token(name=name, role=old.role, sha256=hash_token(token),
                          previous_sha256=old.sha256 if grace_s else "",
                          previous_until=now + grace_s if grace_s else 0.0)
            self._write([fresh if t.name == name else t for t in tokens])
        self.reload(force=True)
        log.info("token rotated name=%s role=%s grace_s=%g file=%s", name, old.role, grace_s,
                 self.path)
        return token

    def _write(self, tokens: list[Token]) -> None:
        """Store ``tokens`` (under the file lock), grace periods that ended dropped."""
        now = wall_clock()
        atomic_write(self.path, render_tokens([t.current(now) for t in tokens]).encode())

    def ensure_initial(self, token_file: Path) -> Path | None:
        """First start: no tokens at all -> an operator token written 0600 to ``token_file``.

        The token file is written before the hash is stored: a crash in between
        only means a fresh token next start, never a stored hash nobody holds.
        """
        with self._file_lock():
            tokens, _ = self._read()
            if tokens:
                return None
            token = new_token()
            atomic_write(token_file, (token + "\n").encode())
            tokens = [Token(name=INITIAL_TOKEN_NAME, role="operator", sha256=hash_token(token))]
            atomic_write(self.path, render_tokens(tokens).encode())
        self.reload(force=True)
        log.info("generated operator token file=%s tokens_file=%s", token_file, self.path)
        return token_file
