"""What a fleet member reads and writes of the fleet's state at a cost of what changed
(issue 21): a cache of the desired state kept from the member's one watch, and what
each node runs as one lease-bound key per service.

- ``Cache``: node records, placements, capacity held, cordons and losses, loaded with
  one read when the watch (re)starts and kept from its stream. Deploys read it instead
  of every node record and placement on each attempt; their transactions compare
  what they read, so a cache behind etcd costs a retry, never a wrong placement.
- Observed state: ``/mcp/observed/<node>/<service>``, written only when that service's
  status changed, deleted when it is gone. The layout before it (one value per node,
  ``/mcp/observed/<node>``, every service in it) is still read where no per-service
  key says otherwise, and a node removes its own once it writes the new keys: a fleet
  upgraded one node at a time never loses or misreports what a node runs.
- ``await_answer``: a deploy's wait for the placed node's answer, on a watch of that
  one key instead of polling a node-wide value.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from . import fleetviews
from .cluster import ALLOC, CORDON, KV, LOST, NODES, OBSERVED, PREFIX, SERVICES
from .errors import WorkloadError
from .fleetviews import Fleetview

if TYPE_CHECKING:
    from .agent import Agent
    from .cluster import Etcd
    from .config import ClusterConfig


class Marks(Protocol):
    def mark(self, name: str, status: dict[str, Any]) -> None: ...


class Fleet(Protocol):
    """What publishing and a deploy's wait need of the member (``fleetnode.Fleet``),
    named here rather than imported: fleetnode imports this module."""

    name: str
    lease: int
    etcd: Etcd
    a: Agent
    cfg: ClusterConfig
    _results: dict[str, tuple[int, str]]

    @property
    def rollouts(self) -> Marks: ...

log = logging.getLogger("mcp_node.fleet")

CACHED = (NODES, SERVICES, ALLOC, CORDON, LOST)
CATCH_UP_S = 2.0      # how long a deploy waits for the cache to reach etcd's revision


class Cache:
    """The desired state as of revision ``rev``, from the watch; ``live`` while the
    watch that keeps it runs."""

    def __init__(self) -> None:
        self.kvs: dict[str, KV] = {}
        self.rev = 0
        self.live = False
        self._cond = threading.Condition()

    def load(self, etcd: Any) -> int:
        """One read of the fleet's keys; the watch follows from the revision returned."""
        rev, kvs = etcd.get_prefix(PREFIX)
        with self._cond:
            self.kvs = {k: kv for k, kv in kvs.items() if k.startswith(CACHED)}
            self.rev = rev
            self._cond.notify_all()
        return int(rev)

    def apply(self, kind: str, kv: KV) -> None:
        with self._cond:
            if kv.key.startswith(CACHED):
                if kind == "DELETE":
                    self.kvs.pop(kv.key, None)
                else:
                    self.kvs[kv.key] = kv
            self.rev = max(self.rev, kv.mod_revision)
            self._cond.notify_all()

    def stopped(self) -> None:
        with self._cond:
            self.live = False
            self._cond.notify_all()

    def started(self) -> None:
        with self._cond:
            self.live = True

    def reach(self, rev: int, timeout: float = CATCH_UP_S) -> bool:
        """Whether the cache is live and at ``rev`` or later within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.live and self.rev < rev:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.live and self.rev >= rev

    def under(self, prefix: str) -> dict[str, KV]:
        with self._cond:
            return {k: kv for k, kv in self.kvs.items() if k.startswith(prefix)}

    def view(self) -> Fleetview:
        with self._cond:
            v = Fleetview(rev=self.rev)
            for k, kv in self.kvs.items():
                if k.startswith(NODES):
                    v.nodes[k] = kv
                elif k.startswith(SERVICES):
                    v.services[k] = kv
                elif k.startswith(ALLOC):
                    v.allocs[k] = kv
                elif k.startswith(CORDON):
                    v.cordons.add(k[len(CORDON):])
                elif k.startswith(LOST):
                    v.lost[k] = kv
            return v


# -- observed state, one key per service ---------------------------------------------

def key(node: str, service: str) -> str:
    return f"{OBSERVED}{node}/{service}"


def observed(etcd: Any, node: str = "", service: str = "") -> dict[str, dict[str, Any]]:
    """node -> {"services": {service: what it published}}: every node's, or (``node``
    and ``service`` given) that one service's alone. A per-service key wins over the
    same service in a node's value of the old layout."""
    if service and not node:
        return {}            # placed nowhere: nothing to read
    if node and service:
        kv = etcd.get(key(node, service))
        if kv is not None:
            return {node: {"services": {service: kv.value}}}
        legacy = etcd.get(OBSERVED + node)
        got = ((legacy.value or {}).get("services", {}).get(service)
               if legacy is not None else None)
        return {node: {"services": {service: got}}} if got else {}
    _, kvs = etcd.get_prefix(OBSERVED)
    out: dict[str, dict[str, Any]] = {}
    new: dict[str, dict[str, Any]] = {}
    for k, kv in kvs.items():
        n, _, name = k[len(OBSERVED):].partition("/")
        if name:
            new.setdefault(n, {})[name] = kv.value
        else:
            out[n] = {"services": dict((kv.value or {}).get("services", {}))}
    for n, services in new.items():
        out.setdefault(n, {"services": {}})["services"].update(services)
    return out


def stable(doc: dict[str, Any]) -> str:
    """A published service without what changes every round (times): a real change."""
    return json.dumps(fleetviews.without_times({"services": {"s": doc}}), sort_keys=True,
                      default=str)


class Publisher:
    """This node's services as its status shows them, each under its own key and the
    node's lease; a service only when something other than the passing of time
    changed in it."""

    def __init__(self, fleet: Fleet) -> None:
        self.f = fleet
        self._sent: dict[str, str] = {}    # service -> its stable form, as put
        self._lease = 0                    # the lease those keys are under

    def publish(self) -> None:
        f = self.f
        if f.lease != self._lease:          # keys under another lease are gone or go
            self._sent, self._lease = {}, f.lease
            f.etcd.delete(OBSERVED + f.name)    # the old layout's value: superseded
        docs: dict[str, dict[str, Any]] = {}
        now = time.time()
        for rec in f.a.registry.list_services():
            st = f.a.views.status(rec)
            for c in st["components"]:
                c["since"] = int(now - c.pop("uptime_s", 0))
                c["node"] = f.name
            st["node"] = f.name
            f.rollouts.mark(rec.name, st)   # the generation that began its rollout
            gen, err = f._results.get(rec.name, (0, ""))
            docs[rec.name] = {"generation": gen, "error": err, "status": st}
        for name, (gen, err) in f._results.items():
            docs.setdefault(name, {"generation": gen, "error": err, "status": None})
        for name in sorted(set(self._sent) - set(docs)):
            f.etcd.delete(key(f.name, name))
            del self._sent[name]
        for name, doc in sorted(docs.items()):
            form = stable(doc)
            if self._sent.get(name) != form:
                f.etcd.put(key(f.name, name), json.loads(json.dumps(doc, default=str)),
                           lease=f.lease)
                self._sent[name] = form


def await_answer(f: Fleet, name: str, node: str, gen: int) -> dict[str, Any]:
    """The node's status of ``name`` once it applied generation ``gen``, read from its
    key and then from a watch of that key (a look every second besides, should the
    watch end); WorkloadError with its message when it failed there. A node of the
    old layout (its one value present) is read as before."""
    deadline = time.monotonic() + f.cfg.deploy_wait_s
    k = key(node, name)
    answer: list[dict[str, Any]] = []
    seen = threading.Event()

    def done(got: Any) -> bool:
        if got and int(got.get("generation", 0)) >= gen and not answer:
            answer.append(got)
            seen.set()
        return bool(answer)

    if f.etcd.get(OBSERVED + node) is not None:
        return _legacy_await(f, name, node, gen, deadline)
    stop = threading.Event()
    rev, kvs = f.etcd.get_prefix(k)
    if not done(kvs[k].value if k in kvs else None):
        def on_kv(kind: str, kv: KV) -> None:
            if kv.key == k and kind == "PUT":
                done(kv.value)

        def follow() -> None:
            try:
                f.etcd.watch_kvs(k, rev + 1, stop, on_kv)
            except Exception as exc:   # noqa: BLE001 - the looks below carry on
                log.debug("fleet: the watch of %s ended: %s", k, exc)

        threading.Thread(target=follow, name=f"await-{name}", daemon=True).start()
        try:
            while not seen.wait(max(min(1.0, deadline - time.monotonic()), 0)):
                if time.monotonic() > deadline:
                    return _pending(f, name, node)
                got = f.etcd.get(k)
                if done(got.value if got else None):
                    break
        finally:
            stop.set()
    return _answer(name, node, answer[0])


def _legacy_await(f: Fleet, name: str, node: str, gen: int,
                  deadline: float) -> dict[str, Any]:
    delay = 0.02
    while True:
        kv = f.etcd.get(OBSERVED + node)
        got = (kv.value or {}).get("services", {}).get(name) if kv else None
        if got and int(got.get("generation", 0)) >= gen:
            return _answer(name, node, got)
        if time.monotonic() > deadline:
            return _pending(f, name, node)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def _answer(name: str, node: str, got: dict[str, Any]) -> dict[str, Any]:
    if got.get("error"):
        raise WorkloadError(f"node {node}: {got['error']}")
    return fleetviews.with_uptime(got.get("status") or {"service": name, "components": []})


def _pending(f: Fleet, name: str, node: str) -> dict[str, Any]:
    return {"service": name, "node": node, "pending": True, "components": [],
            "message": f"placed on {node}; it has not answered within "
                       f"{f.cfg.deploy_wait_s:g} s"}
