"""What fencing asks of a real 3-member etcd (issue 18): a keepalive raced over the
endpoints answers past a member that holds requests (a socket that accepts and never
answers, first in the list), says -1 for a revoked lease; each member's status tells
"has a leader", "no leader" (quorum lost: it still answers at once) and "no answer"."""

from __future__ import annotations

import socket
import time

from etcd_env import EtcdCluster

from mcp_node.cluster import Etcd
from mcp_node.config import ClusterConfig


def test_raced_keepalive_and_leader_status(etcd_cluster: EtcdCluster) -> None:
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    hold.listen(8)                       # connections are accepted by the kernel, never read
    try:
        silent = f"http://127.0.0.1:{hold.getsockname()[1]}"
        etcd = Etcd(ClusterConfig(etcd=(silent, *etcd_cluster.endpoints), timeout_s=2))
        lease = Etcd(ClusterConfig(etcd=tuple(etcd_cluster.endpoints))).grant(5)
        assert etcd._current == 0        # the silent one is asked first
        assert etcd.keepalive_raced(lease) > 0
        assert etcd._current != 0        # the member that answered is asked first next
        assert etcd.keepalive_raced(lease) > 0
        etcd.revoke(lease)
        assert etcd.keepalive_raced(lease) <= 0       # gone: the node must fence
        assert [f() for f in etcd.status_all()] == [None, True, True, True]
        etcd_cluster.kill(0)
        etcd_cluster.kill(1)
        # the one left still answers, with no leader (once its election timeout passed):
        # a leaderless etcd, not a partition
        deadline = time.monotonic() + 20
        while (got := [f() for f in etcd.status_all()[1:]]) != [None, None, False]:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
    finally:
        hold.close()
