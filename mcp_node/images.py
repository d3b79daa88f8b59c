"""Images that move (issue 19, item 4): a deploy resolves each component's image
reference to the image ID it names on this node and runs exactly that, and the
images of versions no longer kept are removed afterwards.

Resolution is the deploy's first step after validation: ``pull = "missing"`` pulls a
reference that is not here, ``"always"`` (or ``mcp deploy --pull``) pulls it anyway,
so a moved tag is seen. The resolved ID goes into the definition
(``ComponentDef.image_digest``), which is what the registry, the plan, the history
and a rollback compare: a moved tag is a ``replace``, and a rollback or a revert
deploys the digest its version ran. A definition that already carries a digest (a
version from history) is not resolved again: that image must still be here, or the
deploy fails naming both, before anything changes.

Pruning runs on a thread of its own after a deploy, never on its critical path. It
removes an image only when some service's history recorded it for a version older
than that service's last ``[images] keep_versions``, no kept version of any service
records it, no container uses it (the removal is never forced), and every name the
image has is a reference the history recorded for it: an image the agent never
recorded, or one with a name of the user's, stays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from .converge import in_parallel
from .errors import MCPError, ValidationError
from .plan import plan, plan_dict
from .servicedef import ComponentDef, ServiceDef

if TYPE_CHECKING:
    from .config import AgentConfig
    from .progress import Progress
    from .registry import Registry
    from .runtime import Runtime, WorkloadSpec


class Host(Protocol):
    """What of the agent resolution and pruning use."""

    config: AgentConfig
    registry: Registry
    progress: Progress

    def runtime(self, name: str) -> Runtime: ...
    def available_runtime(self, name: str) -> Runtime: ...
    def _unallocated_spec(self, service: str, comp: ComponentDef) -> WorkloadSpec: ...

log = logging.getLogger("mcp_node.images")


def pinned(defn: ServiceDef, digests: Mapping[str, str]) -> ServiceDef:
    """``defn`` with each component's resolved digest (a component not in ``digests``
    keeps its own)."""
    return replace(defn, components=tuple(
        replace(c, image_digest=digests.get(c.name, c.image_digest)) for c in defn.components))


def wants_pull(comp: ComponentDef, forced: bool) -> bool:
    """Whether the deploy pulls ``comp``'s reference even when it is present."""
    return forced or comp.pull == "always"


@dataclass(frozen=True)
class Candidate:
    digest: str
    runtime: str
    names: frozenset[str]     # the references history recorded for it


def prune_candidates(histories: Mapping[str, list[ServiceDef]], current: Iterable[ServiceDef],
                     keep: int) -> list[Candidate]:
    """The images the agent may remove: recorded for a service's version older than its
    last ``keep`` (``histories``: each service's versions, oldest first) and recorded by
    no kept version of any service nor by what runs now (``current``). Pure."""
    kept: set[str] = set()
    old: dict[str, str] = {}          # digest -> runtime
    names: dict[str, set[str]] = {}
    for versions in histories.values():
        for i, svc in enumerate(versions):
            recent = i >= len(versions) - keep
            for c in svc.components:
                if not c.image_digest:
                    continue
                names.setdefault(c.image_digest, set()).add(c.image)
                if recent:
                    kept.add(c.image_digest)
                else:
                    old.setdefault(c.image_digest, c.runtime)
    kept.update(c.image_digest for svc in current for c in svc.components)
    return [Candidate(d, rt, frozenset(names[d])) for d, rt in sorted(old.items())
            if d not in kept]


class Images:
    """Resolution for the agent's deploys and pruning after them (module docstring)."""

    def __init__(self, agent: Host) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._refs: dict[str, set[str]] = {}     # service -> references being deployed
        self._digests: dict[str, set[str]] = {}  # service -> digests being deployed
        self._thread: threading.Thread | None = None
        self._due: set[str] = set()              # services deployed since the last prune
        self.removed: list[str] = []             # digests removed so far (for tests)

    # -- resolution ---------------------------------------------------------------

    @contextmanager
    def deploying(self, service: str) -> Iterator[None]:
        """Around a deploy: what it resolves is never pruned meanwhile; a prune follows."""
        try:
            yield
        finally:
            with self._lock:
                self._refs.pop(service, None)
                self._digests.pop(service, None)
            self.prune_later(service)

    def resolve(self, defn: ServiceDef, rts: Mapping[str, Runtime],
                force_pull: bool = False) -> ServiceDef:
        """``defn`` pinned to what each component's image resolves to (pulled as its
        ``pull`` says; ``force_pull``: every one). Raises ImageError (cannot be pulled,
        or a pinned image is gone) before anything has changed."""
        with self._lock:
            self._refs.setdefault(defn.name, set()).update(c.image for c in defn.components)
            self._digests.setdefault(defn.name, set()).update(
                c.image_digest for c in defn.components if c.image_digest)
        digests = in_parallel([partial(self._one, defn.name, i, c, rts[c.name], force_pull)
                               for i, c in enumerate(defn.components)])
        with self._lock:
            self._digests.setdefault(defn.name, set()).update(d for d in digests if d)
        return pinned(defn, {c.name: d for c, d in zip(defn.components, digests, strict=True)
                             if d})

    def _one(self, service: str, i: int, comp: ComponentDef, rt: Runtime, force: bool) -> str:
        a = self.agent
        always = wants_pull(comp, force) and not comp.image_digest
        a.progress.step(service, comp.name, f"pulling {comp.image}")
        try:
            digest = rt.resolve(a._unallocated_spec(service, comp), always)
        except ValidationError as exc:   # the runtime names it ``binary``: say whose
            if exc.field != "binary":
                raise
            raise ValidationError(str(exc).removeprefix("binary: "),
                                  f"components[{i}].binary") from exc
        log.info("image service=%s component=%s %s -> %s%s", service, comp.name, comp.image,
                 digest or "(by name)", " (pulled)" if always else "")
        return digest

    def plan(self, defn: ServiceDef, force_pull: bool = False) -> dict[str, Any]:
        """What deploying ``defn`` would change, its images resolved as a deploy would
        (so a moved tag shows as an ``image_digest`` change); changes nothing else."""
        a = self.agent
        previous = (a.registry.get_service(defn.name)
                    if a.registry.has_service(defn.name) else None)
        rts = {c.name: a.available_runtime(c.runtime) for c in defn.components}
        try:
            new = self.resolve(defn, rts, force_pull)
        finally:
            with self._lock:
                self._refs.pop(defn.name, None)
                self._digests.pop(defn.name, None)
        states = ({c.defn.name: str(c.observed_state) for c in previous.components}
                  if previous else {})
        return plan_dict(plan(previous.definition() if previous else None, new, states))

    # -- pruning ------------------------------------------------------------------

    def prune_later(self, service: str) -> None:
        """Prune after a deploy of ``service``, on a thread of its own; one at a time,
        once more for what was deployed meanwhile."""
        with self._lock:
            self._due.add(service)
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="mcp-images", daemon=True)
            self._thread.start()

    def wait(self, timeout: float) -> None:
        """For tests and shutdown: the prune in flight, if any, ended."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                due, self._due = self._due, set()
                if not due:
                    self._thread = None
                    return
            try:
                self.prune(due)
            except Exception:   # a thread of its own: log, never die silently
                log.exception("image prune failed")

    def prune(self, services: set[str] | None = None) -> list[str]:
        """Remove what ``prune_candidates`` allows; returns the digests removed.
        ``services``: only when one of these has an image beyond its kept versions
        (its own history read first: a deploy that moved nothing costs one read)."""
        a = self.agent
        keep = a.config.images.keep_versions
        try:
            if services is not None and not any(
                    prune_candidates({s: [d.definition for d in a.registry.history(s)]}, [],
                                     keep) for s in services):
                return []
            histories = {name: [d.definition for d in a.registry.history(name)]
                         for name in a.registry.history_services()}
            current = [s.definition() for s in a.registry.list_services()]
        except MCPError as exc:
            log.warning("image prune skipped: %s", exc)
            return []
        removed = []
        for cand in prune_candidates(histories, current, keep):
            try:
                rt = a.runtime(cand.runtime)
            except MCPError:
                continue
            with self._lock:   # a deploy's resolution is never cut in two by a removal
                if any(cand.digest in ds for ds in self._digests.values()):
                    continue
                busy = set().union(*self._refs.values()) if self._refs else set()
                why = rt.remove_image(cand.digest, cand.names - busy)
            if why:
                log.debug("image %s kept: %s", cand.digest, why)
            else:
                log.info("image %s removed (of versions older than the last %d)",
                         cand.digest, keep)
                removed.append(cand.digest)
        self.removed.extend(removed)
        return removed
