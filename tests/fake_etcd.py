"""``FakeEtcd``: cluster.Etcd's operations in memory (revisions, mod_revision compares,
leases that expire when the test says so, a watch), for many fast rounds of fleet logic.

It keeps the contract test_etcd_contract.py checks against a real etcd too: one
revision per put, delete, transaction or revoke (none for a write that changes
nothing); ``txn`` writes all or nothing and answers False when a compare fails (a key's
revision, or a prefix written since a revision); lease
IDs are never reused and a write on a dead lease is refused; a watch replays from
its start revision, then follows until stopped; ``down`` makes every call
FleetUnavailable, as an etcd without quorum does.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable
from typing import Any

from mcp_node.cluster import KV, Traffic
from mcp_node.errors import FleetUnavailable, MCPError


class FakeEtcd:
    def __init__(self) -> None:
        self.kv: dict[str, KV] = {}
        self.rev = 0
        self.leases: dict[int, int] = {}     # id -> ttl
        self.history: list[tuple[str, KV]] = []   # (PUT|DELETE, the key's KV then)
        self.traffic = Traffic()
        self.down = False
        self._ids = itertools.count(1000)
        self._changed = threading.Condition()

    def _check(self) -> None:
        if self.down:
            raise FleetUnavailable("etcd is unreachable or has no quorum (fake)")

    def _lease_ok(self, lease: int) -> None:
        if lease and lease not in self.leases:
            raise MCPError(f"etcd: requested lease not found ({lease})")

    def get(self, key: str) -> KV | None:
        self._check()
        with self._changed:
            return copy.deepcopy(self.kv.get(key))

    def revision(self) -> int:
        self._check()
        with self._changed:
            return self.rev

    def get_prefix(self, prefix: str) -> tuple[int, dict[str, KV]]:
        self._check()
        with self._changed:
            return self.rev, {k: copy.deepcopy(v) for k, v in self.kv.items()
                              if k.startswith(prefix)}

    # -- writes: each call below is one revision, or none when nothing changes ----------

    def _commit(self, puts: dict[str, tuple[Any, int]], deletes: list[str]) -> None:
        deletes = [k for k in deletes if k in self.kv and k not in puts]
        if not puts and not deletes:
            return
        self.rev += 1
        for k, (v, lease) in puts.items():
            self.kv[k] = KV(k, copy.deepcopy(v), self.rev, lease)
            self.history.append(("PUT", self.kv[k]))
        for k in deletes:
            del self.kv[k]
            self.history.append(("DELETE", KV(k, None, self.rev)))
        self._changed.notify_all()

    def put(self, key: str, value: Any, lease: int = 0) -> None:
        self._check()
        with self._changed:
            self._lease_ok(lease)
            self._commit({key: (value, lease)}, [])

    def delete(self, key: str) -> None:
        self._check()
        with self._changed:
            self._commit({}, [key])

    def txn(self, expect: dict[str, int], puts: dict[str, Any],
            deletes: tuple[str, ...] = (), lease: dict[str, int] | None = None,
            unchanged: dict[str, int] | None = None) -> bool:
        self._check()
        lease = lease or {}
        with self._changed:
            for k, r in expect.items():
                have = self.kv.get(k)
                if (have.mod_revision if have else 0) != r:
                    return False
            for prefix, r in (unchanged or {}).items():
                if any(k.startswith(prefix) and kv.mod_revision > r for k, kv in self.kv.items()):
                    return False
            for k in puts:
                self._lease_ok(lease.get(k, 0))
            self._commit({k: (v, lease.get(k, 0)) for k, v in puts.items()}, list(deletes))
            return True

    # -- leases -------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        self._check()
        with self._changed:
            lid = next(self._ids)
            self.leases[lid] = ttl
            return lid

    def keepalive(self, lease: int) -> int:
        self._check()
        with self._changed:
            return self.leases.get(lease, -1)

    def revoke(self, lease: int) -> None:
        self._check()
        with self._changed:
            self._lease_ok(lease)
        self.expire(lease)

    def expire(self, lease: int) -> None:
        """The lease ran out: its keys go in one revision, as etcd deletes them."""
        with self._changed:
            self.leases.pop(lease, None)
            self._commit({}, [k for k, v in self.kv.items() if v.lease == lease])

    # -- watch --------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, stop: threading.Event,
              on_event: Callable[[str, str], None]) -> None:
        """Changes under ``prefix`` from ``start_revision`` on, until ``stop`` (or the
        fake goes down: the stream ends, and the caller resyncs)."""
        self.watch_kvs(prefix, start_revision, stop, lambda kind, kv: on_event(kind, kv.key))

    def watch_kvs(self, prefix: str, start_revision: int, stop: threading.Event,
                  on_kv: Callable[[str, KV], None]) -> None:
        """``watch`` with each change's KV (a DELETE's value None), as etcd streams it."""
        self._check()
        seen = 0
        while not stop.is_set() and not self.down:
            with self._changed:
                new = self.history[seen:]
                seen = len(self.history)
                if not new:
                    self._changed.wait(0.1)
            for kind, kv in new:
                if kv.mod_revision >= start_revision and kv.key.startswith(prefix):
                    on_kv(kind, copy.deepcopy(kv))
