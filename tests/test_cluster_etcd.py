"""cluster.Etcd against a real 3-member etcd: keys, leases, transactions, watch,
and the 503 it answers once quorum is gone."""

from __future__ import annotations

import threading
import time

import pytest
from etcd_env import EtcdCluster

from mcp_node.cluster import Etcd, FleetUnavailable
from mcp_node.config import ClusterConfig


def test_keys_lease_txn_watch_and_quorum(etcd_cluster: EtcdCluster) -> None:
    a = Etcd(ClusterConfig(etcd=tuple(etcd_cluster.endpoints[:1]), timeout_s=1))
    b = Etcd(ClusterConfig(etcd=tuple(etcd_cluster.endpoints[1:]), timeout_s=1))
    a.put("/mcp/t/x", {"v": 1})
    assert b.get("/mcp/t/x").value == {"v": 1}
    rev = b.get("/mcp/t/x").mod_revision
    a.txn({"/mcp/t/x": rev, "/mcp/t/y": 0}, {"/mcp/t/x": {"v": 2}, "/mcp/t/y": 1})
    # x moved on: the same compare fails and nothing is written
    assert not a.txn({"/mcp/t/x": rev}, {"/mcp/t/z": 1})
    assert b.get("/mcp/t/z") is None
    lease = a.grant(2)
    a.put("/mcp/t/leased", "me", lease=lease)
    assert a.keepalive(lease) == 2
    seen: list[tuple[str, str]] = []
    stop = threading.Event()
    start, _ = b.get_prefix("/mcp/t/")
    t = threading.Thread(target=b.watch, args=("/mcp/t/", start + 1, stop,
                                               lambda k, key: seen.append((k, key))))
    t.start()
    deadline = time.monotonic() + 10      # the lease expires without keepalives
    while ("DELETE", "/mcp/t/leased") not in seen:
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive()
    etcd_cluster.kill(0)                  # one member down: the others still answer
    assert b.get("/mcp/t/y").value == 1
    both = Etcd(ClusterConfig(etcd=tuple(etcd_cluster.endpoints), timeout_s=1))
    both.put("/mcp/t/w", 1)               # the dead endpoint is skipped
    etcd_cluster.kill(1)                  # quorum lost: a linearizable read fails (the
    with pytest.raises(FleetUnavailable, match="no quorum"):   # fleet reads before it writes)
        both.get("/mcp/t/w")
    etcd_cluster.start(0)
    etcd_cluster.start(1)
    etcd_cluster.wait_healthy()
    assert both.get("/mcp/t/w").value == 1


def test_client_certificates(etcd_tls: dict[str, str]) -> None:
    ok = Etcd(ClusterConfig(etcd=(etcd_tls["endpoint"],), ca_cert=etcd_tls["ca"],
                            cert_file=etcd_tls["cert"], key_file=etcd_tls["key"], timeout_s=2))
    ok.put("/mcp/t/tls", {"ok": True})
    assert ok.get("/mcp/t/tls").value == {"ok": True}
    for cert, key in (("", ""), (etcd_tls["bad_cert"], etcd_tls["bad_key"])):
        refused = Etcd(ClusterConfig(etcd=(etcd_tls["endpoint"],), ca_cert=etcd_tls["ca"],
                                     cert_file=cert, key_file=key, timeout_s=2))
        with pytest.raises(FleetUnavailable):     # the handshake is refused: no answer
            refused.get("/mcp/t/tls")
