"""What each token may hold of the API server (issue 16): connections, idle worker
threads and follow streams.

Without these a single reader token could hold every connection the server has
(``server.max_connections``) and lock out every other client, operators included.
Each token may hold ``server.max_connections_per_token`` connections and
``server.max_streams_per_token`` follow streams; reader tokens together may hold
``server.max_connections`` less ``server.reserved_for_operators``, so operator and
master tokens always have room. An idle keep-alive connection keeps its worker
thread only while its token has fewer than ``IDLE_THREADS_PER_TOKEN`` doing so;
the others wait in the intake, which costs no thread.

The server calls every method here with its connection lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import HTTPError

if TYPE_CHECKING:
    from .auth import Token
    from .config import ServerConfig
    from .wire import Conn

IDLE_THREADS_PER_TOKEN = 4


class Budgets:
    """Authenticated connections by token (oldest first), and what each token holds."""

    def __init__(self) -> None:
        self.by_token: dict[str, dict[Conn, None]] = {}
        self.readers = 0                    # connections of reader tokens, all of them
        self.held: dict[str, int] = {}      # idle connections waited on by a worker
        self.streams: dict[str, int] = {}   # follow streams

    def add(self, conn: Conn, token: Token) -> None:
        conn.token, conn.role = token.name, token.role
        self.by_token.setdefault(token.name, {})[conn] = None
        if token.role == "reader":
            self.readers += 1

    def forget(self, conn: Conn) -> None:
        mine = self.by_token.get(conn.token)
        if mine is not None and conn in mine:
            del mine[conn]
            if not mine:
                del self.by_token[conn.token]
            if conn.role == "reader":
                self.readers -= 1
        conn.token = ""

    def check(self, token: Token, limits: ServerConfig) -> None:
        """HTTPError 503 naming the key if one more connection of ``token`` would not fit
        its budgets. The new one is refused, not an old one dropped: a refusal is
        answered by the intake without a worker, so a token reconnecting in a loop
        costs what a slowloris does; served, each would cost a request."""
        mine = self.by_token.get(token.name, {})
        cap = limits.max_connections_per_token
        if len(mine) >= cap:
            raise HTTPError(503, "busy", (
                f"token {token.name!r} has {len(mine)} open connections "
                f"(server.max_connections_per_token = {cap}); close one, or wait for an "
                "idle one to time out (server.idle_timeout_s)"), close=True)
        share = limits.max_connections - limits.reserved_for_operators
        if token.role == "reader" and self.readers >= share:
            raise HTTPError(503, "busy", (
                f"reader tokens hold {self.readers} connections, all that "
                f"server.max_connections ({limits.max_connections}) leaves them: the rest, "
                f"server.reserved_for_operators ({limits.reserved_for_operators}), is for "
                "operator and master tokens"), close=True)

    def hold(self, conn: Conn) -> bool:
        """May a worker wait on ``conn``'s next request? (Else it goes to the intake.)"""
        n = self.held.get(conn.token, 0)
        if not conn.token or n >= IDLE_THREADS_PER_TOKEN:
            return False
        self.held[conn.token] = n + 1
        conn.held = conn.token
        return True

    def unhold(self, conn: Conn) -> None:
        name, conn.held = conn.held, ""
        if name:
            n = self.held[name] - 1
            if n:
                self.held[name] = n
            else:
                del self.held[name]

    def add_stream(self, name: str, limits: ServerConfig) -> None:
        """One more follow stream for token ``name``, or HTTPError 503 naming the key."""
        n = self.streams.get(name, 0)
        cap = limits.max_streams_per_token
        if n >= cap:
            raise HTTPError(503, "busy", (
                f"token {name!r} has {n} follow streams open "
                f"(server.max_streams_per_token = {cap}); end one first"))
        self.streams[name] = n + 1

    def end_stream(self, name: str) -> None:
        n = self.streams.get(name, 0) - 1
        if n > 0:
            self.streams[name] = n
        else:
            self.streams.pop(name, None)
