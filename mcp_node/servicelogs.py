"""The agent's logs operation (issue 22 row 11): one component's output, or every
component of a service at once, interleaved by time like ``docker compose logs``.

Each line of several components starts with its component's name, padded to the
longest, and `` | `` (``web | GET /``); ``timestamps`` adds the line's time, ``since``
drops what came before. The lines are ordered by the time their runtime gave them
(podman records one per line; a VM's console records none, so the agent stamps it,
see ``logtime.Stamped``). A follow of several components orders what arrives within
``REORDER_S`` and follows each component into its next run (a replace, a restart);
when one stops for good its last line says so, and the stream ends when all have.
In-band notes start with ``[mcp: `` as the byte-cap notice does.
"""

from __future__ import annotations

import heapq
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

from .config import AgentConfig
from .errors import MCPError, NotFoundError, ValidationError
from .logtime import Relined, kept, key_at, parse_since, split_stamp
from .registry import Registry
from .runtime import Runtime, Workload
from .servicedef import check_name
from .states import RUNNING

REORDER_S = 0.25   # lines of several components arriving this close are put in time order
POLL_S = 0.2       # how often a component whose output ended is looked at for a new run


class Host(Protocol):
    config: AgentConfig
    registry: Registry

    def available_runtime(self, name: str) -> Runtime: ...


def logs(a: Host, name: str, component: str | None, tail: int | None, follow: bool,
         since: str | None = None, timestamps: bool = False) -> Iterator[bytes]:
    """Raises ValidationError (bad name, tail or since), NotFoundError,
    RuntimeUnavailable, WorkloadError: all before anything streams."""
    rec = a.registry.get_service(check_name(name, "service"))
    cap = a.config.server.max_tail  # lines; server.max_log_bytes caps the bytes
    if tail is not None and not 0 <= tail <= cap:
        raise ValidationError(f"{tail} is not within 0-{cap} lines (server.max_tail)", "tail")
    after = parse_since(since, time.time()) if since else None
    max_bytes = a.config.server.max_log_bytes
    if component is not None or len(rec.components) == 1:
        comp = rec.component(check_name(component, "component")) if component \
            else rec.components[0]
        rt = a.available_runtime(comp.defn.runtime)
        if after is None and not timestamps:
            return rt.logs(rec.name, comp.defn.name, tail, follow, max_bytes=max_bytes)
        return Relined(rt.logs(rec.name, comp.defn.name, tail, follow, max_bytes=max_bytes,
                               timestamps=True), kept(after, timestamps))
    names = [c.defn.name for c in rec.components]
    runtimes = {c.defn.name: a.available_runtime(c.defn.runtime) for c in rec.components}
    width = max(len(n) for n in names)
    prefixes = {n: f"{n:<{width}} | ".encode() for n in names}
    per = max(max_bytes // len(names), 1)
    if not follow:
        opened = [(n, _open(runtimes[n], rec.name, n, tail, False, per)) for n in names]
        return _merged(opened, prefixes, after, timestamps)
    return Following(a, rec.name, names, runtimes, prefixes, tail, after, timestamps, per)


def _open(rt: Runtime, service: str, comp: str, tail: int | None, follow: bool,
          max_bytes: int) -> Iterator[bytes] | None:
    """A component's stamped output; None when it has no workload now (never started,
    or removed): the others are still shown."""
    try:
        return rt.logs(service, comp, tail, follow, max_bytes=max_bytes, timestamps=True)
    except NotFoundError:
        return None


def _lines(stream: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in stream:
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        yield from data[:cut].splitlines(keepends=True)
    if rest:
        yield rest + b"\n"


def _shown(prefix: bytes, line: bytes, timestamps: bool) -> bytes:
    key, text = split_stamp(line)
    return prefix + (line if timestamps or not key else text)


def _merged(opened: list[tuple[str, Iterator[bytes] | None]], prefixes: dict[str, bytes],
            after: bytes | None, timestamps: bool) -> Iterator[bytes]:
    def keyed(i: int, name: str, stream: Iterator[bytes]) -> Iterator[tuple[bytes, int, bytes]]:
        for line in _lines(stream):
            key = split_stamp(line)[0]
            if after is None or not key or key >= after:
                yield key, i, _shown(prefixes[name], line, timestamps)

    try:
        batch: list[bytes] = []
        for _, _, shown in heapq.merge(*(keyed(i, n, s) for i, (n, s) in enumerate(opened)
                                         if s is not None)):
            batch.append(shown)
            if len(batch) >= 256:
                yield b"".join(batch)
                batch = []
        if batch:
            yield b"".join(batch)
    finally:
        for _, s in opened:
            _close(s)


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


class Following:
    """The follow of several components: a reader thread per component puts its lines
    (with their times) on one queue; ``__next__`` hands them out in time order once
    each has waited ``REORDER_S``. ``close`` (from any thread) stops every reader."""

    def __init__(self, a: Host, service: str, names: list[str], runtimes: dict[str, Runtime],
                 prefixes: dict[str, bytes], tail: int | None, after: bytes | None,
                 timestamps: bool, max_bytes: int) -> None:
        self.a, self.service, self.runtimes = a, service, runtimes
        self.prefixes, self.timestamps, self.max_bytes = prefixes, timestamps, max_bytes
        self.q: queue.Queue[tuple[float, bytes, int, bytes] | None] = queue.Queue()
        self.heap: list[tuple[bytes, int, float, bytes]] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.streams: dict[str, Any] = {}
        self.seq = 0
        self.live = len(names)
        for n in names:
            threading.Thread(target=self._read, args=(n, tail, after), daemon=True,
                             name=f"logs-{service}-{n}").start()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def _put(self, name: str, key: bytes, line: bytes) -> None:
        with self.lock:
            self.seq += 1
            seq = self.seq
        self.q.put((time.monotonic(), key, seq, _shown(self.prefixes[name], line,
                                                       self.timestamps)))

    def _note(self, name: str, text: str, at: float | None = None, key: bytes = b"") -> None:
        key = key or key_at(time.time() if at is None else at)
        self._put(name, key, key + b" " + f"[mcp: {text}]\n".encode())

    def _read(self, name: str, tail: int | None, after: bytes | None) -> None:
        rt = self.runtimes[name]
        # The newest line's time shown of the runs before: a restart's log (the same
        # container's) still holds them. A VM's console is stamped by the agent, its
        # older lines with the new run's start: after a restart of the same VM they show
        # again, once.
        last, floor = b"", b""
        try:
            w = rt.inspect(self.service, name)
            while not self.closed.is_set():
                stream = _open(rt, self.service, name, tail, True, self.max_bytes)
                run = (w.id, w.started_at) if w is not None else None
                if stream is not None:
                    with self.lock:
                        self.streams[name] = stream
                    if self.closed.is_set():
                        _close(stream)
                    for line in _lines(stream):
                        key = split_stamp(line)[0]
                        if key and ((after is not None and key < after) or key <= floor):
                            continue
                        last = max(last, key)
                        self._put(name, key, line)
                    with self.lock:
                        self.streams.pop(name, None)
                why, w = self._next_run(name, run)
                if why or w is None:
                    self._note(name, why)
                    return
                # The new run's whole output, from after the last line shown; not from its
                # start: a process may write before podman records StartedAt.
                tail, floor = None, last
                # the note right after the last line shown (a key tie sorts by arrival)
                self._note(name, "replaced or restarted; following its new run" if run
                           else "started; following its run", w.started_at, last)
        except MCPError as exc:
            self._note(name, f"following ended: {exc}")
        finally:
            self.q.put(None)

    def _next_run(self, name: str, run: tuple[str, float | None] | None
                  ) -> tuple[str, Workload | None]:
        """Waits until the component runs again in a run other than ``run`` (that
        workload), or is not meant to run any more (why its output ended)."""
        while not self.closed.is_set():
            try:
                comp = self.a.registry.get_service(self.service).component(name)
            except NotFoundError:
                return "its output ended: removed", None
            w = self.runtimes[name].inspect(self.service, name)
            if comp.desired_state != RUNNING:
                state = w.state if w is not None else "missing"
                return f"its output ended: {state} (desired {comp.desired_state})", None
            if w is not None and w.state == RUNNING and (w.id, w.started_at) != run:
                return "", w
            self.closed.wait(POLL_S)
        return "closed", None

    def __next__(self) -> bytes:
        while True:
            now = time.monotonic()
            out = []
            while self.heap and self.heap[0][2] + REORDER_S <= now:
                out.append(heapq.heappop(self.heap)[3])
            if out:
                return b"".join(out)
            if self.closed.is_set() or (self.live == 0 and not self.heap):
                raise StopIteration
            wait = self.heap[0][2] + REORDER_S - now if self.heap else None
            try:
                item = self.q.get(timeout=wait)
            except queue.Empty:
                continue
            if item is None:
                self.live -= 1
                continue
            arrived, key, seq, shown = item
            heapq.heappush(self.heap, (key, seq, arrived, shown))

    def close(self) -> None:
        self.closed.set()
        self.q.put(None)
        with self.lock:
            streams = list(self.streams.values())
        for s in streams:
            _close(s)
