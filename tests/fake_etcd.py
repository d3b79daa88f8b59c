"""``FakeEtcd``: cluster.Etcd's operations in memory (revisions, mod_revision compares,
leases that expire when the test says so), for many fast rounds of fleet logic.

The real client is tested against a real etcd (test_cluster_etcd.py); this one only
has to keep the same contract: ``txn`` writes all or nothing and answers False when a
compare fails.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from mcp_node.cluster import KV, Traffic


class FakeEtcd:
    def __init__(self) -> None:
        self.kv: dict[str, KV] = {}
        self.rev = 0
        self.leases: dict[int, int] = {}     # id -> ttl
        self.traffic = Traffic()
        self.down = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        from mcp_node.errors import FleetUnavailable

        if self.down:
            raise FleetUnavailable("etcd is unreachable or has no quorum (fake)")

    def get(self, key: str) -> KV | None:
        self._check()
        with self._lock:
            kv = self.kv.get(key)
            return copy.deepcopy(kv)

    def get_prefix(self, prefix: str) -> tuple[int, dict[str, KV]]:
        self._check()
        with self._lock:
            return self.rev, {k: copy.deepcopy(v) for k, v in self.kv.items()
                              if k.startswith(prefix)}

    def _put(self, key: str, value: Any, lease: int = 0) -> None:
        self.rev += 1
        self.kv[key] = KV(key, copy.deepcopy(value), self.rev, lease)

    def put(self, key: str, value: Any, lease: int = 0) -> None:
        self._check()
        with self._lock:
            self._put(key, value, lease)

    def delete(self, key: str) -> None:
        self._check()
        with self._lock:
            if self.kv.pop(key, None) is not None:
                self.rev += 1

    def txn(self, expect: dict[str, int], puts: dict[str, Any],
            deletes: tuple[str, ...] = (), lease: dict[str, int] | None = None) -> bool:
        self._check()
        with self._lock:
            for k, r in expect.items():
                have = self.kv.get(k)
                if (have.mod_revision if have else 0) != r:
                    return False
            for k, v in puts.items():
                self._put(k, v, (lease or {}).get(k, 0))
            for k in deletes:
                self.kv.pop(k, None)
            self.rev += 1
            return True

    def grant(self, ttl: int) -> int:
        self._check()
        with self._lock:
            lid = len(self.leases) + 1000
            self.leases[lid] = ttl
            return lid

    def keepalive(self, lease: int) -> int:
        self._check()
        return self.leases.get(lease, -1)

    def revoke(self, lease: int) -> None:
        self.expire(lease)

    def expire(self, lease: int) -> None:
        """The lease ran out: its keys go, as etcd deletes them."""
        with self._lock:
            self.leases.pop(lease, None)
            for k in [k for k, v in self.kv.items() if v.lease == lease]:
                del self.kv[k]
                self.rev += 1
