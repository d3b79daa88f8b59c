"""The agent's JSON/HTTP API (design §6) on ``http.server``, no framework.

Connections are accepted by one selector thread, the intake, which also does
the TLS handshake and reads request heads for every connection that has not
shown a valid token yet: a slow or idle connection costs a socket and a
buffer, not a thread. A complete head goes to a worker thread (reused, see
``Workers``), which parses and answers it; a connection that authenticated
stays with its worker (keep-alive), one that did not goes back to the intake.
Request parsing and routing are ``handler``'s; the endpoints are ``endpoints``'.

Each phase has a deadline, not just an idle timeout: a request's line and
headers (``server.header_timeout_s``), its body (``server.body_timeout_s``,
408), the wait for the next request on an authenticated keep-alive
connection (``server.idle_timeout_s``). Unauthenticated connections are
capped in total and per peer address, and at a cap the oldest one is dropped
to admit the new one, so idle or slow connections never lock out a client
with a token; ``server.max_connections`` bounds them all. Authenticated ones
count toward their token's budgets (``budgets``), so no token, and no reader,
can take the room of an operator either; an idle one goes back to the intake
too, unless its token has a few idle ones waited on by workers already.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .auth import Token, TokenStore, token_file_path
from .budgets import Budgets
from .config import AgentConfig
from .endpoints import APIHandler
from .errors import HTTPError, MCPError
from .httpapi import (
    StreamPump,
    check_listen,
    tls_context,
)
from .metrics import Metrics
from .wire import (
    HEAD_END_RE,
    MAX_HEAD,
    Conn,
    access_line,
    error_response,
    head_ready,
    lower_thread_priority,
    raise_fd_limit,
    request_line_of,
)
from .workers import Workers

if TYPE_CHECKING:
    from pathlib import Path

    from .operations import Operations


log = logging.getLogger("mcp_node.server")

SHUTDOWN_GRACE_S = 10.0
LINGER_S = 2.0
LINGER_BYTES = 4 << 20
DROP_LOG_EVERY_S = 10.0
GIL_SWITCH_S = 0.0005
INTAKE_SWEEP_S = 0.1          # how often the intake looks for expired head deadlines
ACCEPT_BATCH = 32             # connections accepted before the intake reads again
BEARER_RE = re.compile(rb"\nauthorization:[ \t]*bearer[ \t]+([!-~]+)", re.IGNORECASE)
BUSY_BODY = b'{"error":{"code":"busy","message":"too many open connections"}}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
                  % (len(BUSY_BODY), BUSY_BODY))


class AgentServer(ThreadingHTTPServer):
    """Accepts connections within the caps of ``[server]`` and reads each request head of
    a connection without a valid token in one selector thread (the intake), so slow and
    idle connections cost a socket and a buffer, not a thread; complete heads, and every
    connection once authenticated, go to the workers. See the module docstring."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog: a burst of connects is not met by SYN drops

    def __init__(self, address: tuple[str, int], agent: Operations, config: AgentConfig,
                 tokens: TokenStore, ssl_context: ssl.SSLContext | None) -> None:
        self.agent = agent
        self.config = config
        self.tokens = tokens
        self.ssl_context = ssl_context
        self._conns: dict[socket.socket, Conn] = {}        # every open one, by accepted socket
        self._unauth: dict[Conn, None] = {}                # oldest first
        self._unauth_by_peer: dict[str, dict[Conn, None]] = {}
        self._dropped_open = 0                            # dropped, not closed yet
        self._conns_lock = threading.Lock()
        self._streams: set[StreamPump] = set()
        self._budgets = Budgets()
        self._busy_lock = threading.Lock()
        self._busy = 0
        self._drops = 0
        self._drops_logged_at = 0.0
        self.health_cache: tuple[dict[str, Any], bytes] | None = None
        self.metrics = Metrics(agent)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self._workers = Workers(self.process_request_thread)
        self._intake: dict[Conn, None] = {}               # intake thread only
        self._parked: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, APIHandler)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{shown}:{port}"

    @property
    def token_file(self) -> Path | None:
        path = token_file_path(self.config)
        return path if path.exists() else None

    # -- connection accounting (tests and the bench read these) ----------------------

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def unauthenticated_connections(self) -> int:
        return len(self._unauth)

    def unauthenticated_by_peer(self) -> dict[str, int]:
        with self._conns_lock:
            return {peer: len(conns) for peer, conns in self._unauth_by_peer.items()}

    @property
    def open_streams(self) -> list[StreamPump]:
        with self._conns_lock:
            return list(self._streams)

    def connections_of(self, token: str) -> int:
        with self._conns_lock:
            return len(self._budgets.by_token.get(token, ()))

    def stream_begin(self, token: str) -> None:
        """One more follow stream of ``token``: HTTPError 503 past its budget."""
        with self._conns_lock:
            self._budgets.add_stream(token, self.config.server)

    def stream(self, pump: StreamPump, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._streams.add(pump)
            else:
                self._streams.discard(pump)

    def stream_end(self, pump: StreamPump | None, token: str) -> None:
        """The stream ``stream_begin`` counted for ``token`` has ended."""
        with self._conns_lock:
            if pump is not None:
                self._streams.discard(pump)
            self._budgets.end_stream(token)

    def hold(self, conn: Conn) -> bool:
        """May a worker wait on ``conn``'s next request (see ``budgets``)?"""
        with self._conns_lock:
            return self._budgets.hold(conn)

    def unhold(self, conn: Conn) -> None:
        with self._conns_lock:
            self._budgets.unhold(conn)

    def busy(self, delta: int) -> None:
        with self._busy_lock:
            self._busy += delta

    def conn_of(self, sock: socket.socket) -> Conn:
        with self._conns_lock:
            return self._conns[sock]

    def authenticated(self, conn: Conn, token: Token) -> None:
        """``conn`` showed ``token``: it leaves the unauthenticated caps for good and
        counts toward the token's budgets; HTTPError 503 if it does not fit them (the
        intake refused it already, unless another connection of the token came first)."""
        if conn.token == token.name:
            return
        with self._conns_lock:
            if conn.token:
                self._budgets.forget(conn)
            elif not conn.authenticated:
                self._forget_unauth(conn)
            conn.authenticated = True
            self._budgets.check(token, self.config.server)
            self._budgets.add(conn, token)

    def _over_budget(self, conn: Conn) -> str:
        """Why the request head in ``conn.buf`` comes from a token with no room for
        this connection ("" if it has room, or shows no valid token: the worker answers
        that). Intake thread: a token reconnecting in a loop is refused without a worker."""
        end = HEAD_END_RE.search(conn.buf, 0, MAX_HEAD)
        m = BEARER_RE.search(conn.buf, 0, MAX_HEAD if end is None else end.start())
        if m is None:
            return ""
        token = self.tokens.lookup(m.group(1).decode("latin-1"))
        if token is None or token.name == conn.token:
            return ""
        try:
            with self._conns_lock:
                self._budgets.check(token, self.config.server)
        except HTTPError as exc:
            return str(exc)
        return ""

    def _forget_unauth(self, conn: Conn) -> None:
        if conn in self._unauth:
            del self._unauth[conn]
            peer = self._unauth_by_peer[conn.peer]
            del peer[conn]
            if not peer:
                del self._unauth_by_peer[conn.peer]

    def _drop_oldest(self, conns: dict[Conn, None], why: str,
                     completed: list[Conn]) -> Conn | None:
        """The oldest of ``conns`` still waiting in the intake for its head, marked as
        dropped. One whose head has arrived meanwhile (unread yet) is not slow: it goes
        to ``completed`` instead. None if every one is being answered by a worker."""
        found = None
        for c in conns:  # oldest first; usually the first one
            if c.in_intake and c not in completed:
                if c.drain or not self._head_arrived(c):
                    found = c
                    break
                completed.append(c)
        if found is not None:
            self._forget_unauth(found)
            found.dropped = why
            self._dropped_open += 1
            self._drops += 1
        return found

    def _head_arrived(self, conn: Conn) -> bool:
        """Read what is waiting on ``conn`` (intake thread; no blocking, no closing)."""
        try:
            while conn.handshaken and not head_ready(conn):
                data = conn.sock.recv(65536)
                if not data:
                    return False
                conn.buf += data
        except (OSError, ValueError):  # includes BlockingIOError, SSLWantReadError
            return False
        return conn.handshaken

    # -- the intake (one thread: accepts, caps, reads request heads) -------------------

    def _serve(self) -> None:
        lower_thread_priority(self.config.server.intake_nice)
        sel = self._sel
        self.socket.setblocking(False)
        sel.register(self.socket, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sweep = time.monotonic() + INTAKE_SWEEP_S
        try:
            while not self._stopping:
                for key, _ in sel.select(INTAKE_SWEEP_S):
                    self._guarded(self._intake_event, key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + INTAKE_SWEEP_S
                    for conn in [c for c in self._intake if c.deadline <= now]:
                        self._guarded(self._intake_expired, conn)
        finally:
            for conn in list(self._intake):
                self._intake_close(conn)
            while not self._parked.empty():
                self._intake_close(self._parked.get())

    def _guarded(self, fn: Callable[[Any], None], arg: Any) -> None:
        """The intake must outlive any one connection's surprise: log it, drop that one."""
        try:
            fn(arg)
        except Exception:
            log.exception("intake error")
            if isinstance(arg, Conn):
                with contextlib.suppress(Exception):
                    self._intake_close(arg)

    def _intake_event(self, what: Any) -> None:
        if what == "accept":
            self._accept_all()
        elif what == "wake":
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            while not self._parked.empty():
                self._guarded(self._intake_add, self._parked.get())
        elif what.drain:
            self._intake_drain(what)
        else:
            self._intake_read(what)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _accept_all(self) -> None:
        for _ in range(ACCEPT_BATCH):  # then read what the accepted ones sent
            try:
                raw, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: let others finish first
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)
                return
            conn = self.admit(raw, addr)
            if conn is None:
                self.close_request(raw)
                continue
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            self._intake_add(conn)

    def _intake_add(self, conn: Conn) -> None:
        try:
            conn.sock.setblocking(False)
            if self.ssl_context is not None and conn.sock is conn.raw:
                conn.sock = self.ssl_context.wrap_socket(conn.raw, server_side=True,
                                                         do_handshake_on_connect=False)
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            self._release(conn)
            return
        conn.in_intake = True
        self._intake[conn] = None
        if conn.drain:
            conn.deadline = time.monotonic() + LINGER_S
            conn.buf.clear()
            self._intake_drain(conn)
        else:
            self._intake_read(conn)  # a client sends its request at once: read it now

    def _intake_drain(self, conn: Conn) -> None:
        """Discard what a client still sends after our error (see Handler.finish)."""
        try:
            while conn.drained < LINGER_BYTES:
                data = socket.socket.recv(conn.sock, 65536)  # raw bytes, TLS or not
                if not data:
                    break
                conn.drained += len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._intake_close(conn)

    def _intake_read(self, conn: Conn) -> None:
        sock = conn.sock
        idle = conn.authenticated and not conn.buf
        try:
            if not conn.handshaken and isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
            conn.handshaken = True
            while not head_ready(conn):
                data = sock.recv(65536)
                if not data:  # the client is gone, whatever it had begun
                    self._intake_close(conn)
                    return
                conn.buf += data
                if idle:  # the idle deadline was its token's; the head has one of its own
                    idle = False
                    conn.deadline = time.monotonic() + self.config.server.header_timeout_s
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # more to come (a handshake's small writes do not block in practice)
        except (OSError, ValueError):
            self._intake_close(conn)
            return
        self._hand_over(conn)

    def _hand_over(self, conn: Conn) -> None:
        why = self._over_budget(conn)
        if why:  # answered here, like a dropped unauthenticated connection (no access line)
            with self._conns_lock:
                if not conn.dropped:
                    if not conn.authenticated:
                        self._forget_unauth(conn)
                    elif conn.token:
                        self._budgets.forget(conn)
                    conn.dropped = why
                    self._dropped_open += 1
                    self._drops += 1
            self._intake_close(conn)
            self._log_drops()
            return
        self._intake_forget(conn)
        self._workers.submit(conn.raw, conn.addr)

    def _intake_expired(self, conn: Conn) -> None:
        """Past its header deadline: 408 if it had begun a request (and an access line),
        else closed without a word. Answered here: no worker for a slowloris."""
        if conn.buf.strip() and not conn.drain:
            timeout = self.config.server.header_timeout_s
            self._intake_close(conn, 408, "request_timeout",
                               f"request headers not complete within {timeout:g} s "
                               "(server.header_timeout_s)")
        else:
            self._intake_close(conn)

    def _intake_forget(self, conn: Conn) -> None:
        if conn.in_intake:
            conn.in_intake = False
            del self._intake[conn]
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)

    def _intake_close(self, conn: Conn, status: int = 0, code: str = "",
                      message: str = "") -> None:
        """Close ``conn``, first answering ``status`` (or 503 if it was dropped) when it
        had begun a request; never blocks (the response is small, the buffer empty)."""
        self._intake_forget(conn)
        if conn.dropped:
            status, code, message = 503, "busy", conn.dropped
        if status and conn.buf.strip():
            data = error_response(status, code, message)
            with contextlib.suppress(OSError, ValueError):
                conn.sock.send(data)
            if log.isEnabledFor(logging.INFO) and not conn.dropped:  # drops: _log_drops
                began = conn.deadline - self.config.server.header_timeout_s
                access_line(*request_line_of(conn.buf), status, len(data),
                            (time.monotonic() - began) * 1000, "-", conn.peer)
        self._release(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self.close_request(conn.raw)

    def admit(self, request: socket.socket, client_address: Any) -> Conn | None:
        """Admit every new connection while it can: at an unauthenticated cap the oldest
        unauthenticated connection (of the same peer first) is dropped to make room.
        Only when every open connection is authenticated is the new one refused (503)."""
        limits = self.config.server
        conn = Conn(request, client_address, time.monotonic() + limits.header_timeout_s)
        peer = conn.peer
        victims: list[Conn | None] = []
        completed: list[Conn] = []
        admit = True
        with self._conns_lock:
            mine = self._unauth_by_peer.get(peer)
            if mine is not None and len(mine) >= limits.max_unauthenticated_per_peer:
                victims.append(self._drop_oldest(mine, (
                    f"too many unauthenticated connections from {peer} (more than "
                    f"server.max_unauthenticated_per_peer = "
                    f"{limits.max_unauthenticated_per_peer}); the oldest was closed"),
                    completed))
            elif len(self._unauth) >= limits.max_unauthenticated:
                heaviest = max(self._unauth_by_peer.values(), key=len)
                victims.append(self._drop_oldest(heaviest, (
                    f"too many unauthenticated connections (more than "
                    f"server.max_unauthenticated = {limits.max_unauthenticated}); "
                    "the oldest of the peer with the most was closed"), completed))
            if len(self._conns) - self._dropped_open >= limits.max_connections:
                victim = None
                if self._unauth:
                    heaviest = max(self._unauth_by_peer.values(), key=len)
                    victim = self._drop_oldest(heaviest, (
                        f"too many open connections (server.max_connections = "
                        f"{limits.max_connections}); the oldest unauthenticated was closed"),
                        completed)
                admit = victim is not None
                victims.append(victim)
            open_now = len(self._conns)
            if admit:
                self._conns[request] = conn
                self._unauth[conn] = None
                self._unauth_by_peer.setdefault(peer, {})[conn] = None
        for c in completed:
            self._hand_over(c)
        for v in victims:
            if v is not None:
                self._intake_close(v)
        if any(victims):
            self._log_drops()
        if not admit:
            with contextlib.suppress(OSError):
                request.send(BUSY_RESPONSE, socket.MSG_DONTWAIT)
            log.warning("connection refused peer=%s reason=too_many_connections open=%d",
                        peer, open_now)
            return None
        return conn

    def _log_drops(self) -> None:
        """One warning per ``DROP_LOG_EVERY_S`` at most: under attack, drops come by
        the thousand and must not flood the log."""
        now = time.monotonic()
        if now - self._drops_logged_at >= DROP_LOG_EVERY_S:
            with self._conns_lock:
                n, self._drops = self._drops, 0
                unauth = len(self._unauth)
            self._drops_logged_at = now
            log.warning("dropped connections (unauthenticated, or beyond a token's budget) "
                        "count=%d open=%d unauthenticated=%d", n, len(self._conns), unauth)

    def _release(self, conn: Conn) -> None:
        with self._conns_lock:
            if self._conns.pop(conn.raw, None) is not None:
                if conn.dropped:
                    self._dropped_open -= 1
                elif conn.token:
                    self._budgets.forget(conn)
                elif not conn.authenticated:
                    self._forget_unauth(conn)

    def shutdown_request(self, request: Any) -> None:
        """A worker is done with ``request``: back to the intake, or closed."""
        with self._conns_lock:
            conn = self._conns.get(request)
        if conn is not None and (conn.park or conn.drain) and not self._stopping:
            conn.park = False
            self._parked.put(conn)
            self._wake()
            return
        if conn is not None:
            self._release(conn)
            if conn.sock is not request:
                with contextlib.suppress(OSError):
                    conn.sock.close()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error peer=%r", client_address, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="mcp-http", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting, let requests in progress finish (bounded), drop idle connections."""
        if self._stopped:
            return
        self._stopped = self._stopping = True
        if self._thread is not None:
            self._wake()
            self._thread.join()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self._busy > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._conns_lock:
            conns = list(self._conns.values())
        for c in conns:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(c.sock, socket.SHUT_RDWR)
        self._workers.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self.server_close()


def serve(agent: Operations, config: AgentConfig, *,
          tokens: TokenStore | None = None) -> AgentServer:
    """Bind, make sure a token exists, and serve in a background thread."""
    host, port = check_listen(config)
    ctx = tls_context(config)
    store = tokens if tokens is not None else TokenStore.for_config(config)
    store.ensure_initial(token_file_path(config))
    raise_fd_limit(config.server.max_connections + 256)
    # A worker woken by a request waits at most this long for the GIL while other threads
    # (the intake under a flood, the monitor) run Python; the default 5 ms would be the
    # tail of every answer given while they are busy.
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        srv = AgentServer((host, port), agent, config, store, ctx)
    except OSError as exc:
        raise MCPError(f"cannot listen on {config.server.listen}: {exc}") from exc
    srv.start()
    log.info("listening url=%s tokens_file=%s", srv.url, store.path)
    return srv

