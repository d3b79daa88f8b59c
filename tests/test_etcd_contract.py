"""One contract for the etcd client, run against ``FakeEtcd`` and a real etcd (one
Debian etcd-server member): what fleet mode relies on. Keys and values round-trip,
a prefix read holds only its keys and the store's revision, a transaction writes all
or nothing in one revision, leases have IDs never used before and take their keys
with them, a watch replays from a revision and then follows, and an etcd that does
not answer is ``FleetUnavailable``. The fake passes what the real one does, so the
fleet logic tests on the fake (test_cluster_logic.py) test what production meets."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import need
from etcd_env import EtcdCluster, free_ports
from fake_etcd import FakeEtcd

from mcp_node.cluster import Etcd
from mcp_node.config import ClusterConfig
from mcp_node.errors import FleetUnavailable, MCPError

Store = Etcd | FakeEtcd


@pytest.fixture(scope="module")
def real_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    need("etcd")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1)
    cluster.base.mkdir(exist_ok=True)
    try:
        cluster.start(0)
        cluster.wait_healthy()
        yield cluster.endpoints
    finally:
        cluster.stop_all()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.integration)])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def etcd(kind: str, request: pytest.FixtureRequest) -> Store:
    if kind == "fake":
        return FakeEtcd()
    return Etcd(ClusterConfig(etcd=tuple(request.getfixturevalue("real_endpoints"))))


@pytest.fixture
def p() -> str:
    """A key prefix of this test's own (the real etcd is shared by the module)."""
    return f"/mcp-contract/{uuid.uuid4().hex[:8]}/"


def rev(etcd: Store, p: str) -> int:
    return etcd.get_prefix(p)[0]


# -- keys -------------------------------------------------------------------------------

def test_put_get_round_trip_and_revisions(etcd: Store, p: str) -> None:
    assert etcd.get(p + "a") is None
    value = {"list": [1, "x", None], "nested": {"k": True}, "n": 1.5}
    before = rev(etcd, p)
    etcd.put(p + "a", value)
    kv = etcd.get(p + "a")
    assert kv is not None and kv.key == p + "a" and kv.value == value and kv.lease == 0
    assert kv.mod_revision == before + 1 == rev(etcd, p)
    etcd.put(p + "a", "text")                                  # each put: one revision
    again = etcd.get(p + "a")
    assert again is not None and again.value == "text"
    assert again.mod_revision == before + 2


def test_prefix_read_holds_only_its_keys_and_the_revision(etcd: Store, p: str) -> None:
    for k in ("x/1", "x/2", "x0", "y/1"):
        etcd.put(p + k, k)
    r, kvs = etcd.get_prefix(p + "x/")
    assert sorted(kvs) == [p + "x/1", p + "x/2"]
    assert {k: v.value for k, v in kvs.items()} == {p + "x/1": "x/1", p + "x/2": "x/2"}
    last = etcd.get(p + "y/1")
    assert last is not None and r == last.mod_revision   # the store's, not the prefix's
    assert etcd.get_prefix(p + "none/") == (r, {})


def test_delete_takes_one_revision_and_an_absent_key_none(etcd: Store, p: str) -> None:
    etcd.put(p + "a", 1)
    before = rev(etcd, p)
    etcd.delete(p + "missing")
    assert rev(etcd, p) == before
    etcd.delete(p + "a")
    assert etcd.get(p + "a") is None and rev(etcd, p) == before + 1


# -- transactions -----------------------------------------------------------------------

def test_transaction_writes_everything_in_one_revision(etcd: Store, p: str) -> None:
    etcd.put(p + "old", 0)
    etcd.put(p + "kept", 0)
    kept = etcd.get(p + "kept")
    assert kept is not None
    before = rev(etcd, p)
    assert etcd.txn({p + "new": 0, p + "kept": kept.mod_revision},
                    {p + "new": "n", p + "other": {"o": 1}}, deletes=(p + "old",))
    new, other = etcd.get(p + "new"), etcd.get(p + "other")
    assert new is not None and other is not None
    assert new.mod_revision == other.mod_revision == before + 1 == rev(etcd, p)
    assert etcd.get(p + "old") is None
    assert new.value == "n" and other.value == {"o": 1}


def test_failed_compare_writes_nothing(etcd: Store, p: str) -> None:
    etcd.put(p + "a", 1)
    a = etcd.get(p + "a")
    assert a is not None
    before = rev(etcd, p)
    assert not etcd.txn({p + "a": 0}, {p + "b": 1})                     # exists, not absent
    assert not etcd.txn({p + "a": a.mod_revision + 1}, {p + "b": 1})    # moved on
    assert not etcd.txn({p + "a": a.mod_revision, p + "c": 5}, {p + "b": 1},
                        deletes=(p + "a",))                              # one of two fails
    assert etcd.get(p + "b") is None and etcd.get(p + "a") is not None
    assert rev(etcd, p) == before
    assert etcd.txn({p + "a": a.mod_revision}, {p + "a": 2})             # unchanged: passes
    got = etcd.get(p + "a")
    assert got is not None and got.value == 2




def test_unchanged_prefix_compare(etcd: Store, p: str) -> None:
    """A prefix compare fails once any key under it was written after the revision
    read, a key made there since too (how ``secret rm`` refuses to race a deploy);
    an empty prefix, or one whose keys are older, passes."""
    etcd.put(p + "svc/a", 1)
    read = rev(etcd, p)
    assert etcd.txn({}, {p + "x": 1}, unchanged={p + "svc/": read, p + "none/": read})
    assert not etcd.txn({}, {p + "x": 2}, unchanged={p + "svc/": read - 1})   # a is newer
    etcd.put(p + "svc/b", 1)                                    # created after the read
    assert not etcd.txn({}, {p + "x": 3}, unchanged={p + "svc/": read})
    got = etcd.get(p + "x")
    assert got is not None and got.value == 1
    assert etcd.txn({}, {p + "x": 4}, unchanged={p + "svc/": rev(etcd, p)})
    etcd.delete(p + "svc/b")                                   # a delete leaves only older keys
    assert etcd.txn({}, {p + "x": 5}, unchanged={p + "svc/": read})
# -- leases -----------------------------------------------------------------------------

def test_lease_ids_are_never_reused(etcd: Store) -> None:
    first, second = etcd.grant(30), etcd.grant(30)
    etcd.revoke(first)
    third = etcd.grant(30)
    assert len({first, second, third}) == 3 and min(first, second, third) > 0
    etcd.revoke(second)
    etcd.revoke(third)


def test_keepalive_says_whether_the_lease_lives(etcd: Store) -> None:
    lease = etcd.grant(30)
    assert 0 < etcd.keepalive(lease) <= 30
    etcd.revoke(lease)
    assert etcd.keepalive(lease) <= 0


def test_revoke_takes_the_lease_keys_in_one_revision(etcd: Store, p: str) -> None:
    lease = etcd.grant(30)
    etcd.put(p + "rec", {"node": "n1"}, lease=lease)
    assert etcd.txn({p + "leader": 0}, {p + "leader": "n1", p + "free": 1},
                    lease={p + "leader": lease})
    rec, leader, free = etcd.get(p + "rec"), etcd.get(p + "leader"), etcd.get(p + "free")
    assert rec is not None and leader is not None and free is not None
    assert rec.lease == leader.lease == lease and free.lease == 0
    before = rev(etcd, p)
    etcd.revoke(lease)
    assert etcd.get(p + "rec") is None and etcd.get(p + "leader") is None
    assert etcd.get(p + "free") is not None
    assert rev(etcd, p) == before + 1


def test_writes_on_a_dead_lease_are_refused(etcd: Store, p: str) -> None:
    lease = etcd.grant(30)
    etcd.revoke(lease)
    before = rev(etcd, p)
    with pytest.raises(MCPError, match="lease not found"):
        etcd.put(p + "rec", 1, lease=lease)
    with pytest.raises(MCPError, match="lease not found"):
        etcd.txn({p + "leader": 0}, {p + "leader": "n1", p + "b": 1}, lease={p + "leader": lease})
    assert etcd.get(p + "rec") is None and etcd.get(p + "b") is None
    assert rev(etcd, p) == before
    with pytest.raises(MCPError, match="lease not found"):
        etcd.revoke(lease)


# -- watch ------------------------------------------------------------------------------

def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.02)


def test_watch_replays_from_its_revision_then_follows(etcd: Store, p: str) -> None:
    etcd.put(p + "w/before", 0)                   # before the start revision: not reported
    start = rev(etcd, p) + 1
    etcd.put(p + "w/a", 1)                        # after it, before the watch: replayed
    seen: list[tuple[str, str]] = []
    stop = threading.Event()
    t = threading.Thread(target=etcd.watch, args=(p + "w/", start, stop,
                                                 lambda k, key: seen.append((k, key))))
    t.start()
    try:
        until(lambda: len(seen) >= 1)
        lease = etcd.grant(30)
        etcd.put(p + "elsewhere", 1)              # outside the prefix: not reported
        etcd.delete(p + "w/a")
        assert etcd.txn({}, {p + "w/b": 1, p + "w/c": 2}, lease={p + "w/c": lease})
        etcd.revoke(lease)
        want = [("PUT", "w/a"), ("DELETE", "w/a"), ("PUT", "w/b"), ("PUT", "w/c"),
                ("DELETE", "w/c")]
        until(lambda: len(seen) >= len(want))
        assert [(k, key[len(p):]) for k, key in seen] == want
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()                       # stop ends the watch


def test_watch_with_values_carries_each_change_and_its_revision(etcd: Store, p: str) -> None:
    """What a cache kept from the stream relies on: a PUT's value and revision, a
    DELETE's revision (value None), in order; ``revision`` is the store's."""
    etcd.put(p + "v/a", {"n": 1})
    start = etcd.revision()
    assert start == rev(etcd, p)
    seen: list[tuple[str, str, object, int]] = []
    stop = threading.Event()
    t = threading.Thread(target=etcd.watch_kvs, args=(p + "v/", start, stop, lambda k, kv:
                                                      seen.append((k, kv.key[len(p):],
                                                                   kv.value, kv.mod_revision))))
    t.start()
    try:
        etcd.put(p + "v/a", {"n": 2})
        etcd.delete(p + "v/a")
        until(lambda: len(seen) >= 3)
        assert seen == [("PUT", "v/a", {"n": 1}, start), ("PUT", "v/a", {"n": 2}, start + 1),
                        ("DELETE", "v/a", None, start + 2)]
        assert etcd.revision() == start + 2
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


# -- etcd not answering -------------------------------------------------------------------

def test_an_etcd_that_does_not_answer_is_fleet_unavailable(kind: str, tmp_path: Path) -> None:
    if kind == "fake":
        etcd: Store = FakeEtcd()
        etcd.down = True
    else:
        etcd = Etcd(ClusterConfig(etcd=(f"http://127.0.0.1:{free_ports(1)[0]}",),
                                  timeout_s=0.5))
    calls: list[Callable[[], object]] = [
        lambda: etcd.get("/k"), lambda: etcd.get_prefix("/k/"), lambda: etcd.put("/k", 1),
        lambda: etcd.delete("/k"), lambda: etcd.txn({"/k": 0}, {"/k": 1}),
        lambda: etcd.grant(10), lambda: etcd.keepalive(1), lambda: etcd.revoke(1)]
    for call in calls:
        with pytest.raises(FleetUnavailable, match="unreachable or has no quorum"):
            call()
