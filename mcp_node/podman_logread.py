"""One logs request for a podman container, answered. A ``k8s-file`` log we can read
is read by the agent itself from its end, in bounded steps (``logtail``; followed by
polling it, ended when the container is), since podman answers ``tail=N`` from
memory. Otherwise podman is asked and only the agent's copy is bounded
(``keep_last``); a follow request is opened in a thread, because podman sends no
headers until the container writes a line. The stream primitives are in
``podman_logs``; the REST calls are the runtime's own, so each is counted and a
transport failure drops its client as any other call does."""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from .errors import MCPError, NotFoundError, WorkloadError
from .logtail import LogTail, keep_last
from .logtime import normalized
from .podman_logs import (
    LogStream,
    RawAdapter,
    UnixFollow,
    frames,
    k8s_log_path,
    still_running,
)
from .podmanargs import response_message

log = logging.getLogger("mcp_node.podman")

FOLLOW_OPEN_WAIT_S = 0.5         # see ContainerLog.follow
HALF_WRITTEN = "is not a valid container log line"   # podman read conmon mid-write


@dataclass(frozen=True)
class ContainerLog:
    """The log of one container of ours (``attrs``: its inspect data), read through the
    runtime: ``request`` and ``inspect`` are its REST calls, ``counted`` counts one made
    on a connection of our own, ``socket_file`` is podman's unix socket when it is one
    and ``path_prefix`` the API's path prefix there."""

    name: str
    attrs: dict[str, Any]
    request: Callable[..., Any]
    inspect: Callable[[str], dict[str, Any] | None]
    counted: Callable[[], None]
    timeout: float
    socket_file: str | None
    path_prefix: Callable[[], str]

    def read(self, tail: int | None, follow: bool, max_bytes: int | None,
             timestamps: bool = False) -> Iterator[bytes]:
        """``timestamps``: each line starts with its time as a ``logtime`` key."""
        path = k8s_log_path(self.attrs)
        if path is not None:
            cid = str(self.attrs.get("Id") or "")
            return LogTail([path], "k8s", tail, max_bytes, follow,
                           lambda: self.still_running(cid), alive_every_s=1.0,
                           stamps=timestamps)
        params: dict[str, str] = {"stdout": "true", "stderr": "true",
                                  "follow": "true" if follow else "false"}
        if tail is not None:
            params["tail"] = str(max(0, int(tail)))
        if timestamps:
            params["timestamps"] = "true"
        log.info("podman: logs %s %s", self.name, params)
        out: Iterator[bytes]
        if not follow:
            out = frames(self._open(params, self.timeout))
            out = keep_last(out, max_bytes) if max_bytes is not None else out
        else:
            out = self.follow(params)
        return normalized(out) if timestamps else out

    def follow(self, params: dict[str, str]) -> LogStream:
        """Returns once podman answered or ``FOLLOW_OPEN_WAIT_S`` passed, by when the
        request is in podman's hands and every later line will be delivered. The
        stream's ``close()`` may be called from any thread."""
        name = self.name
        stream = LogStream()
        if self.socket_file is not None:   # our own connection: close() cuts it before any answer
            target = (self.path_prefix()
                      + f"containers/{quote(name, safe='')}/logs?{urlencode(params)}")
            try:
                req = UnixFollow(self.socket_file, target)
            except OSError as exc:
                raise WorkloadError(f"podman logs {name}: {exc}") from exc
            stream.on_close(req.cancel)
            self.counted()

            def opener() -> None:
                try:
                    resp = req.open()
                except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
                    req.cancel()   # also what a close() meanwhile raises here
                    stream.opened(None, WorkloadError(f"podman logs {name}: {exc}"))
                    return
                if resp.status >= 400:
                    message = resp.read(4096).decode(errors="replace")
                    req.cancel()
                    stream.opened(None, NotFoundError(f"no container {name}")
                                  if resp.status == 404 else
                                  WorkloadError(f"podman logs {name}: {message}"))
                    return
                stream.opened(RawAdapter(resp, req), None)
        else:
            def opener() -> None:
                try:
                    stream.opened(self._open(params, (10, None)), None)
                except MCPError as exc:
                    stream.opened(None, exc)

        threading.Thread(target=opener, name=f"podman-logs-{name}", daemon=True).start()
        stream.wait_open(FOLLOW_OPEN_WAIT_S)
        return stream

    def still_running(self, cid: str = "") -> bool | None:
        """The followed container still runs: ``cid``, not a replacement of that name
        (None: podman did not answer; conmon still writes the log meanwhile)."""
        try:
            attrs = self.inspect(self.name)
        except MCPError as exc:
            log.warning("podman: %s: cannot tell whether it still runs: %s", self.name, exc)
            return None
        return still_running(attrs) and (not cid or (attrs or {}).get("Id") == cid)

    def _open(self, params: dict[str, str], timeout: Any) -> Any:
        """Asked again (3 tries) when podman's reader met a line conmon is still writing:
        it answers "... is not a valid container log line" for the half-written last line
        of a busy log (seen in CI)."""
        name = self.name
        for attempt in range(3):
            resp = self.request("GET", f"/containers/{name}/logs", f"logs {name}",
                                params=params, stream=True, timeout=timeout)
            if resp.status_code < 400:
                return resp
            message = response_message(resp)
            resp.close()
            if resp.status_code == 404:
                raise NotFoundError(f"no container {name}")
            if HALF_WRITTEN not in message or attempt == 2:
                raise WorkloadError(f"podman logs {name}: {message}")
            time.sleep(0.05)
        raise AssertionError("unreachable")
