"""etcd for fleet mode: one small client over etcd's JSON gateway (etcd3gw), the key
layout, leases, transactions and a watch that reports its own end.

Every call has a deadline (``cluster.timeout_s``) and moves on to the next
endpoint when one does not answer; when none answers, ``FleetUnavailable``
(503) says so, which is how a node tells "etcd has no quorum" from a slow one.
Secrets go into etcd only sealed under the fleet key (``fleetsecrets``): definitions,
node records, placements and ciphertexts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from .causes import transport_cause
from .config import ClusterConfig
from .errors import FleetUnavailable, MCPError

__all__ = ["KV", "Etcd", "FleetUnavailable", "Traffic"]

log = logging.getLogger("mcp_node.cluster")

PREFIX = "/mcp/"
NODES = PREFIX + "nodes/"          # lease-bound: each live node's record
OBSERVED = PREFIX + "observed/"    # lease-bound: what each node runs, per service
SERVICES = PREFIX + "services/"    # desired: definition, placement, state
ALLOC = PREFIX + "alloc/"          # per node: the demand of every placement on it
CORDON = PREFIX + "cordon/"        # drained nodes
LOST = PREFIX + "lost/"            # when the leader first saw a node's record gone
LEADER = PREFIX + "leader"         # lease-bound: the agent that re-places work
MEMBERS = PREFIX + "members/"      # kept: each node's address and DNS holder, for takeovers
SECRETS = PREFIX + "secrets/"      # per secret: its kept versions, sealed under the fleet key


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True)
class KV:
    key: str
    value: Any              # decoded JSON
    mod_revision: int
    lease: int = 0


class Traffic:
    """Requests and bytes (request plus response bodies) sent to etcd: the idle
    cost of an agent, which bench/fleet.py reports."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, sent: int, received: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += sent + received


class Etcd:
    """The few etcd operations fleet mode needs, over every configured endpoint."""

    def __init__(self, cfg: ClusterConfig, traffic: Traffic | None = None) -> None:
        from etcd3gw.client import Etcd3Client

        self.cfg = cfg
        self.traffic = traffic or Traffic()
        self._clients = []
        for url in cfg.etcd:
            u = urlsplit(url)
            self._clients.append(Etcd3Client(
                host=u.hostname or "127.0.0.1", port=u.port or 2379, protocol=u.scheme,
                timeout=cfg.timeout_s, api_path="/v3/", session=_session(cfg)))
        self._current = 0
        self._lock = threading.Lock()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers; FleetUnavailable when none does.

        Every endpoint is tried twice, 0.3 s apart: a leader election after a member
        died makes the others answer "unavailable" for a moment, which is no loss."""
        errors: list[str] = []
        for attempt in range(2):
            if attempt:
                time.sleep(0.3)
            errors = []
            out = self._pass(path, body, errors)
            if out is not None:
                return out
        raise _no_quorum(errors)

    def _pass(self, path: str, body: dict[str, Any], errors: list[str]) -> dict[str, Any] | None:
        from etcd3gw import exceptions as ex

        n = len(self._clients)
        with self._lock:
            start = self._current
        data = json.dumps(body)
        for i in range(n):
            idx = (start + i) % n
            client = self._clients[idx]
            try:
                out: dict[str, Any] = client.post(client.get_url(path), data=data)
            except (ex.ConnectionFailedError, ex.ConnectionTimeoutError) as exc:
                errors.append(f"{self.cfg.etcd[idx]}: {transport_cause(exc)}")
                continue
            except ex.Etcd3Exception as exc:
                detail = str(getattr(exc, "detail_text", "") or exc)
                # A member without quorum answers "request timed out" or "no leader".
                if any(w in detail for w in ("timed out", "no leader", "not capable",
                                             "unhealthy", "stopped", "Unavailable")):
                    errors.append(f"{self.cfg.etcd[idx]}: {detail[:160]}")
                    continue
                raise MCPError(f"etcd {path}: {detail[:300]}") from exc
            self.traffic.add(len(data), len(json.dumps(out)))
            with self._lock:
                self._current = idx
            return out
        return None

    # -- keys ---------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        kvs = self._range({"key": _b64(key)})[1]
        return kvs[0] if kvs else None

    def revision(self) -> int:
        """The store's revision now (a count-only read of one key)."""
        return self._range({"key": _b64(PREFIX), "count_only": True})[0]

    def get_prefix(self, prefix: str) -> tuple[int, dict[str, KV]]:
        """(revision, key -> KV) of every key under ``prefix``."""
        rev, kvs = self._range({"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return rev, {kv.key: kv for kv in kvs}

    def _range(self, body: dict[str, Any]) -> tuple[int, list[KV]]:
        out = self._post("/kv/range", body)
        rev = int(out.get("header", {}).get("revision", 0))
        return rev, [_kv(kv) for kv in out.get("kvs", [])]

    def put(self, key: str, value: Any, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value, sort_keys=True))}
        if lease:
            body["lease"] = lease
        self._post("/kv/put", body)

    def delete(self, key: str) -> None:
        self._post("/kv/deleterange", {"key": _b64(key)})

    def txn(self, expect: dict[str, int], puts: dict[str, Any],
            deletes: tuple[str, ...] = (), lease: dict[str, int] | None = None,
            unchanged: dict[str, int] | None = None) -> bool:
        """Put and delete as one step if every key in ``expect`` still has that
        mod_revision (0: absent) and no key under a prefix of ``unchanged`` was written
        after that revision (a key created there since fails it too: etcd compares every
        key of the range); False (nothing written) when one moved on."""
        compare = [{"key": _b64(k), "result": "EQUAL", "target": "MOD", "mod_revision": str(r)}
                   for k, r in expect.items()]
        compare.extend({"key": _b64(p), "range_end": _b64(prefix_end(p)), "result": "LESS",
                        "target": "MOD", "mod_revision": str(r + 1)}
                       for p, r in (unchanged or {}).items())
        ops: list[dict[str, Any]] = []
        for k, v in puts.items():
            put: dict[str, Any] = {"key": _b64(k), "value": _b64(json.dumps(v, sort_keys=True))}
            if lease and lease.get(k):
                put["lease"] = lease[k]
            ops.append({"request_put": put})
        ops.extend({"request_delete_range": {"key": _b64(k)}} for k in deletes)
        out = self._post("/kv/txn", {"compare": compare, "success": ops})
        return bool(out.get("succeeded"))

    # -- leases -------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self._post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after the refresh; -1 when it had already expired."""
        out = self._post("/lease/keepalive", {"ID": lease})
        if "result" not in out:
            # the gateway streams an error (e.g. "no leader") with status 200: that is
            # no answer about the lease, not its expiry (which would fence the node)
            raise FleetUnavailable(f"etcd keepalive: {str(out.get('error', out))[:200]}")
        return int(out["result"].get("TTL", -1))

    def keepalive_raced(self, lease: int, head_s: float = 0.2) -> int:
        """One keepalive, to the endpoint that answered last and, if it has not
        answered within ``head_s``, to every other one at once; the first answer wins.
        A member being restarted can hold a request for its whole timeout, and the
        lease's fence deadline does not wait for ``_post``'s serial retries (issue 18).
        FleetUnavailable when none answers about the lease."""
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        from etcd3gw import exceptions as ex

        data = json.dumps({"ID": lease})

        def one(i: int) -> int:
            client = self._clients[i]
            try:
                out: dict[str, Any] = client.post(client.get_url("/lease/keepalive"),
                                                  data=data)
            except (ex.ConnectionFailedError, ex.ConnectionTimeoutError) as exc:
                raise FleetUnavailable(f"{self.cfg.etcd[i]}: {transport_cause(exc)}") from exc
            except ex.Etcd3Exception as exc:
                detail = str(getattr(exc, "detail_text", "") or exc)
                raise FleetUnavailable(f"{self.cfg.etcd[i]}: {detail[:160]}") from exc
            self.traffic.add(len(data), len(json.dumps(out)))
            if "result" not in out:
                raise FleetUnavailable(f"{self.cfg.etcd[i]}: "
                                       f"{str(out.get('error', out))[:160]}")
            with self._lock:
                self._current = i
            return int(out["result"].get("TTL", -1))

        with self._lock:
            first = self._current
        pool = ThreadPoolExecutor(max_workers=len(self._clients))
        errors: list[str] = []
        try:
            pending: set[Future[int]] = {pool.submit(one, first)}
            done, pending = wait(pending, timeout=head_s)
            if not done or not _answered(done, errors):
                pending |= {pool.submit(one, i) for i in range(len(self._clients)) if i != first}
            while True:
                for f in done:
                    if f.exception() is None:
                        return f.result()
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                _answered(done, errors)
        finally:
            pool.shutdown(wait=False)
        raise _no_quorum(errors)

    def revoke(self, lease: int) -> None:
        self._post("/kv/lease/revoke", {"ID": lease})

    def status_all(self) -> list[Callable[[], bool | None]]:
        """Per member, a call saying whether it has a leader (None: it did not answer).
        A member without quorum still answers its status at once (a keepalive to it
        hangs), with no ``leader``: how a node tells a leaderless etcd from its own
        partition (fleetlease)."""
        return [partial(self._has_leader, c) for c in self._clients]

    def _has_leader(self, client: Any) -> bool | None:
        from etcd3gw import exceptions as ex

        try:
            out = client.post(client.get_url("/maintenance/status"), data="{}")
        except (ex.Etcd3Exception, ValueError):
            return None
        self.traffic.add(2, len(json.dumps(out)))
        return bool(int(out.get("leader", 0) or 0))

    # -- watch --------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, stop: threading.Event,
              on_event: Callable[[str, str], None]) -> None:
        """Stream changes under ``prefix`` from ``start_revision`` until ``stop`` or the
        stream ends (a member died, etcd restarted); the caller resyncs and watches
        again. ``on_event(kind, key)``, kind PUT or DELETE."""
        self.watch_kvs(prefix, start_revision, stop, lambda kind, kv: on_event(kind, kv.key))

    def watch_kvs(self, prefix: str, start_revision: int, stop: threading.Event,
                  on_kv: Callable[[str, KV], None]) -> None:
        """``watch`` with each change's KV (the stream carries it anyway): a PUT's new
        value, a DELETE's value None; ``mod_revision`` is the change's revision, which
        is what a cache kept from the stream needs to know how far it is."""
        client = self._clients[self._current]
        create = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                  "start_revision": start_revision}
        body: dict[str, Any] = {"create_request": create}
        resp = client.session.post(client.get_url("/watch"), data=json.dumps(body), stream=True,
                                   timeout=(self.cfg.timeout_s, None))
        self.traffic.add(len(json.dumps(body)), 0)
        done = threading.Event()
        threading.Thread(target=_close_on, args=(stop, done, resp), daemon=True).start()
        try:
            for line in _lines(resp, stop):
                self.traffic.add(0, len(line))
                result = json.loads(line).get("result", {})
                for ev in result.get("events", []):
                    kind = ev.get("type", "PUT")
                    kv = _kv(ev["kv"])
                    on_kv(kind, KV(kv.key, None, kv.mod_revision) if kind == "DELETE" else kv)
                if result.get("canceled"):
                    return
        finally:
            done.set()
            resp.close()


def _no_quorum(errors: list[str]) -> FleetUnavailable:
    return FleetUnavailable("etcd is unreachable or has no quorum (" + "; ".join(errors)
                            + "): fleet writes are refused until it is back; reads answer "
                            "from this node's own record, marked stale")


def _answered(done: set[Any], errors: list[str]) -> bool:
    """True if one of ``done`` succeeded; notes the failures' causes."""
    ok = False
    for f in done:
        exc = f.exception()
        if exc is None:
            ok = True
        else:
            errors.append(str(exc)[:160] or type(exc).__name__)
    return ok


def _session(cfg: ClusterConfig) -> Any:
    """TLS as configured, and nothing from the environment: a ``REQUESTS_CA_BUNDLE``
    would replace the configured CA, and an HTTP proxy has no business between an
    agent and its etcd."""
    import requests

    session = requests.Session()
    session.trust_env = False
    if cfg.ca_cert:
        session.verify = cfg.ca_cert
    if cfg.cert_file and cfg.key_file:
        session.cert = (cfg.cert_file, cfg.key_file)
    return session


def _lines(resp: Any, stop: threading.Event) -> Iterator[str]:
    """The stream's lines; its end, however abrupt, is only the end."""
    import requests

    try:
        for raw in resp.iter_lines(chunk_size=None):
            if raw and raw.strip():
                yield raw.decode()
    except (requests.RequestException, OSError, AttributeError, ValueError) as exc:
        if not stop.is_set():
            log.info("etcd watch ended: %s", exc)


def _close_on(stop: threading.Event, done: threading.Event, resp: Any) -> None:
    """Ends a blocked stream read when the agent stops."""
    while not done.is_set():
        if stop.wait(0.5):
            break
    # A read blocked on the stream ends only when its socket is shut down (as etcd3gw's
    # own watcher does); close() from another thread does not wake it.
    with contextlib.suppress(Exception):   # a stream that already ended
        fd = resp.raw._fp.fileno()
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
            dup.shutdown(socket.SHUT_RDWR)


def _kv(raw: dict[str, Any]) -> KV:
    text = _unb64(raw.get("value", ""))
    try:
        value = json.loads(text) if text else None
    except ValueError:
        value = text
    return KV(_unb64(raw["key"]), value, int(raw.get("mod_revision", 0)),
              int(raw.get("lease", 0)))
