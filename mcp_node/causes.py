"""A transport failure (requests, urllib3, http.client, sockets) in a few words.

Libraries wrap a refused connection three or four deep and pass on the repr of
the stack (``ConnectionError(MaxRetryError('HTTPConnectionPool(...`` from etcd3gw,
``('Connection aborted.', APIError(...))`` from podman-py); an operator needs what
happened ("connection refused", "read timed out (0.5 s)"). A leaf module: the
fleet's etcd client and the podman runtime both use it.
"""

from __future__ import annotations

import http.client
import os
import re
import socket

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"()]+)")
_TIMEOUT = re.compile(r"(Read|Connect) timed out", re.IGNORECASE)


def transport_cause(exc: BaseException) -> str:
    """A requests/urllib3 failure in a few words ("connection refused", "read timed
    out (0.5 s)"), for an operator: etcd3gw passes on only the nested exceptions'
    repr, ``ConnectionError(MaxRetryError('HTTPConnectionPool(...``, which says the
    same in 300 characters."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < 10:
        chain.append(e)
        e = _nested(e)
    text = " ".join(str(getattr(x, "detail_text", "") or x) for x in chain)
    for x in reversed(chain):
        if isinstance(x, OSError) and x.errno and not isinstance(x, socket.timeout):
            return os.strerror(x.errno).lower()
    if any(isinstance(x, http.client.RemoteDisconnected) for x in chain):
        return "connection closed without a response"   # the peer died mid-request
    if m := _TIMEOUT.search(text):
        limit = re.search(r"timeout=([\d.]+)", text)
        return m.group(0).lower() + (f" ({limit.group(1)} s)" if limit else "")
    if m := _ERRNO.search(text):
        return m.group(1).strip().lower()
    name = type(chain[-1]).__name__
    first = str(chain[-1]).split(":")[-1].strip()[:120]
    return f"{name}: {first}" if first else name


def _nested(e: BaseException) -> BaseException | None:
    """The exception ``e`` wraps: urllib3's ``reason``, requests' first argument, or
    what it was raised from or during."""
    reason = getattr(e, "reason", None)
    if isinstance(reason, BaseException):
        return reason
    for arg in e.args:
        if isinstance(arg, BaseException):
            return arg
    return e.__cause__ or e.__context__
