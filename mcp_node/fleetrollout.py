"""Fleet mode's part of a health-gated rollout (issue 19 item 6).

The node a service is placed on rolls a fleet deploy out as a single node does
(``rollout``): the deploy answers with the node's status, whose ``rollout``
``mcp deploy --wait`` follows through the fleet's status until it ends. What this
module adds is that the fleet agrees with a revert. Without it etcd kept the failing
definition as the desired one, so the node's next sync (any service's change, the
minute's resync, a restart) deployed it again, and a move to another node would too:
a loop of rollouts and reverts. So a generation whose rollout the node reverted is not
applied again, and etcd's record is put back to the definition the node reverted to,
as a new generation noting ``reverted``. Which generation began which rollout is kept
in ``fleet-rollouts.json`` beside the node's registry: an agent restarted mid-rollout
goes on judging it (``rollout``) and still writes the revert back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from .cluster import KV, SERVICES
from .errors import FleetUnavailable, MCPError
from .files import atomic_write
from .fleetmoves import Txn
from .fleetviews import Fleetview
from .placement import demand_of
from .plan import carried
from .rollout import REVERTED, REVERTING
from .servicedef import ServiceDef, from_dict

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("mcp_node.fleet")


class Member(Protocol):
    """What a fleet rollout needs of the member (``fleetnode.Fleet``)."""

    name: str
    a: Agent
    _dirty: dict[str, bool]

    def txn_loop(self, step: Callable[[Fleetview], Txn | None]) -> Fleetview: ...
    def placement_txn(self, v: Fleetview, name: str, prev: KV | None,
                      rec: dict[str, Any] | None) -> Txn: ...


def answer(st: dict[str, Any]) -> dict[str, Any]:
    """A fleet deploy's answer (the placed node's status at its generation): whether the
    node changed anything, as a single node's deploy says. The rollout it shows was
    begun by another generation when this one changed nothing there; ``mcp deploy
    --wait`` then waits for readiness, not for an earlier rollout's outcome."""
    r = st.get("rollout")
    if st.get("pending") or "generation" not in st:
        return st
    return {**st, "unchanged": not (r and r.get("generation") == st["generation"])}


def fleet_form(local: ServiceDef, placed: ServiceDef) -> ServiceDef:
    """``local`` (a node's record: no fleet keys, its own image digests) as etcd keeps a
    definition: ``placed``'s placement keys and public hostnames, no digests (each node
    resolves its images; ``plan.carried`` keeps the local ones)."""
    public = {(c.name, r.name): r.public_hostname for c in placed.components
              for r in c.routes}
    return replace(local, node=placed.node, failover=placed.failover, components=tuple(
        replace(c, image_digest="", routes=tuple(
            replace(r, public_hostname=public.get((c.name, r.name), ""))
            for r in c.routes)) for c in local.components))


class FleetRollouts:
    """Which fleet generation began each service's latest local rollout, and the
    write-back of a revert."""

    def __init__(self, fleet: Member) -> None:
        self.f = fleet
        self._file = fleet.a.state_dir / "fleet-rollouts.json"
        self._lock = threading.Lock()
        # service -> (generation, local rollout version, a revert to write back may come)
        self.began: dict[str, tuple[int, int, bool]] = self._load()
        self._asked: set[tuple[str, int]] = set()   # unnoted reverts a sync looked at

    def deploy(self, name: str, gen: int, defn: ServiceDef) -> None:
        """The node's deploy of generation ``gen``; the rollout it begins is noted."""
        before = self.f.a.rollouts.of(name)
        self.f.a.deploy_local(defn)
        r = self.f.a.rollouts.of(name)
        if r is not None and (before is None or r.version != before.version):
            self._note(name, (gen, r.version, True))

    def reverted(self, name: str, gen: int, rec: dict[str, Any]) -> bool:
        """Whether ``gen`` (etcd's record ``rec``) began a rollout this node reverted (or
        is reverting): it is not applied again; its write-back makes the next
        generation. A rollout no generation is noted for (one the agent's restart began
        for a deploy its death cut short, ``Rollouts.resume_interrupted``) is ``gen``'s
        when ``gen``'s definition is the version it rolled out."""
        r, b = self.f.a.rollouts.of(name), self.began.get(name)
        if r is None or r.state not in (REVERTING, REVERTED):
            return False
        if (b is None or b[1] != r.version) and self._rolled_out(name, r.version, rec):
            self._note(name, b := (gen, r.version, True))
        return b is not None and b[0] == gen and r.version == b[1]

    def _rolled_out(self, name: str, version: int, rec: dict[str, Any]) -> bool:
        """Whether local ``version`` of ``name`` is what ``rec`` places here."""
        local = next((d.definition for d in self.f.a.registry.history(name)
                      if d.version == version), None)
        return local is not None and local == carried(
            local, from_dict(rec["definition"]).local_part())

    def mark(self, name: str, status: dict[str, Any]) -> None:
        """The generation that began the rollout a published status shows: a fleet
        deploy whose generation began none changed nothing here (``answer``)."""
        r, b = status.get("rollout"), self.began.get(name)
        if r is not None and b is not None and r.get("version") == b[1]:
            status["rollout"] = {**r, "generation": b[0]}

    def round(self) -> None:
        """Put etcd's record of each service reverted here back to what runs (the fleet
        thread, each round). A record written since (another deploy) stands as it is.
        A revert of a rollout no generation is noted for has the next sync look at it
        (``reverted``), once."""
        for done in self.f.a.rollouts.latest():
            b = self.began.get(done.service)
            if done.state == REVERTED and (b is None or b[1] != done.version) and \
                    (done.service, done.version) not in self._asked:
                self._asked.add((done.service, done.version))
                self.f._dirty["services"] = True
        for name, (gen, version, pending) in sorted(self.began.items()):
            r = self.f.a.rollouts.of(name)
            if r is None:
                self._note(name, None)
                continue
            if not pending or r.version != version or r.state == REVERTING:
                continue
            if r.state != REVERTED:
                if r.ended_at is not None:   # succeeded or failed: etcd says what runs
                    self._note(name, (gen, version, False))
                continue
            try:
                self._write_back(name, gen, r.version, r.previous, r.reason)
            except FleetUnavailable:
                raise
            except MCPError as exc:
                log.warning("fleet: the revert of service=%s is not written back yet: %s",
                            name, exc)
                continue
            self._note(name, (gen, version, False))

    def _write_back(self, name: str, gen: int, version: int, previous: int | None,
                    reason: str) -> None:
        local = self.f.a.registry.get_service(name).definition()

        def step(v: Fleetview) -> Txn | None:
            cur = v.services.get(SERVICES + name)
            if cur is None or int(cur.value.get("generation", 0)) != gen:
                return None          # undeployed or deployed again since: that stands
            defn = fleet_form(local, from_dict(cur.value["definition"]))
            back: dict[str, Any] = {
                **cur.value, "definition": defn.to_dict(),
                "demand": demand_of(defn).to_dict(), "generation": gen + 1,
                "time": time.time(), "reverted": {
                    "generation": gen, "version": version, "to": previous,
                    "node": self.f.name, "reason": reason}}
            return self.f.placement_txn(v, name, cur, back)

        view = self.f.txn_loop(step)
        cur = view.services.get(SERVICES + name)
        if cur is not None and int(cur.value.get("generation", 0)) == gen:
            self.f._dirty["services"] = True   # the next round applies it (no change)
            log.warning("fleet: service=%s generation %d reverted here (local version %d "
                        "-> %s); etcd's record is the reverted definition again: %s",
                        name, gen, version, previous, reason)

    def _note(self, name: str, entry: tuple[int, int, bool] | None) -> None:
        with self._lock:
            if self.began.get(name) == entry:
                return
            if entry is None:
                self.began.pop(name, None)
            else:
                self.began[name] = entry
            self._save()

    def _load(self) -> dict[str, tuple[int, int, bool]]:
        try:
            raw = json.loads(self._file.read_text())
            return {str(k): (int(v[0]), int(v[1]), bool(v[2])) for k, v in dict(raw).items()}
        except (OSError, ValueError, TypeError, IndexError):
            return {}

    def _save(self) -> None:
        atomic_write(self._file, json.dumps(self.began, sort_keys=True).encode(), 0o600)
