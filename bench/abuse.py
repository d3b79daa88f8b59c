"""abuse: /v1/health from one authenticated client while 1,000 slow connections are
held against the agent, against the same with none held, in one run.

A real ``mcp-agent`` (bench/common.py, default ``[server]`` caps) is measured
by the same client alone (the baseline) and while a separate process keeps
1,000 slowloris slots busy, in alternating blocks (``--rounds``), so that other
load on the machine falls on both alike. Each slot connects from loopback,
begins a request head and sends one more header line every second, never
finishing it; when the agent closes the slot's connection (its per-peer or
unauthenticated cap dropped it, or the header deadline answered 408) the slot
connects again a second later, as a real attacker would. The client measures
``/v1/health`` on one keep-alive connection and, separately, on a fresh
connection per request (the way each ``mcp`` invocation arrives, and the one a
connection cap could lock out).

The attacker runs at nice 19 by default: on a 2-core machine its own CPU use
(and the scheduling delays it causes the client) would otherwise be counted as
the agent's slowness; ``--attacker-nice 0`` measures that too. It also prints
what both processes used.

Prints both p99s and their ratio (target <= 2x, keep-alive), the worst latency
(target <= 100 ms), the 503s the client got (target 0), and what the attacker
and the agent saw. Bounded: 1,000 slots, a fixed number of requests, a time
limit per phase; traffic only to 127.0.0.1. The open-file soft limit is raised
to the hard limit here (1,000+ sockets); the agent raises its own in serve().

    .venv/bin/python bench/abuse.py [--slots 1000] [--rounds 3] [--requests 1000]
                                    [--fresh 100] [--peers 1] [--attacker-nice 19]
                                    [--server KEY=VALUE]
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing as mp
import os
import resource
import selectors
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from common import bed

PHASE_LIMIT_S = 120.0
RAMP_LIMIT_S = 30.0


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- the attacker (own process) --------------------------------------------------------


def hold_slow(port: int, slots: int, peers: int, nice: int, stop: Any, counts: Any) -> None:
    """Keep ``slots`` slowloris connections going until ``stop`` is set.

    ``counts``: [connected now, connects, closed by the agent, 503s, 408s, connect
    failures], shared with the parent.
    """
    raise_nofile()
    os.nice(nice)
    sel = selectors.DefaultSelector()
    due: list[tuple[float, int, int]] = []      # (when, slot, generation): next step
    gen = [0] * slots                           # a close makes older entries stale
    socks: dict[int, socket.socket] = {}
    lines: dict[int, int] = {}
    start = time.monotonic()
    for i in range(slots):                      # ramp: 500 slots a second
        heapq.heappush(due, (start + i / 500, i, 0))

    def closed(i: int, s: socket.socket) -> None:
        """The agent closed slot ``i``: connect again a second later."""
        sel.unregister(s)
        s.close()
        del socks[i]
        counts[0] -= 1
        counts[2] += 1
        gen[i] += 1
        heapq.heappush(due, (time.monotonic() + 1, i, gen[i]))

    while not stop.is_set():
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, i, g = heapq.heappop(due)
            if g != gen[i]:
                continue
            s = socks.get(i)
            if s is None:                       # (re)connect and begin a request head
                s = socket.socket()
                s.settimeout(3)
                try:
                    s.bind((f"127.0.0.{2 + i % peers}" if peers > 1 else "127.0.0.1", 0))
                    s.connect(("127.0.0.1", port))
                    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                except OSError:
                    s.close()
                    counts[5] += 1
                    heapq.heappush(due, (now + 1, i, g))
                    continue
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, i)
                socks[i], lines[i] = s, 0
                counts[0] += 1
                counts[1] += 1
            else:                               # one more header line, a second later
                lines[i] += 1
                try:
                    s.send(b"X-Slow-%d: 1\r\n" % lines[i])
                except OSError:
                    closed(i, s)
                    continue
            heapq.heappush(due, (now + 1, i, g))
        for key, _ in sel.select(timeout=0.02):
            i, sock = key.data, key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                counts[3] += 1
            elif data.startswith(b"HTTP/1.1 408"):
                counts[4] += 1
            closed(i, sock)
    for s in list(socks.values()):
        s.close()


# -- the measured client ---------------------------------------------------------------------


def _read_response(s: socket.socket, buf: bytearray) -> int:
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed before a response")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed in a body")
        rest += data
    buf[:] = rest[length:]
    return status


def measure(port: int, token: str, n: int, fresh: bool, pace_s: float = 0.002
            ) -> tuple[list[float], dict[int | str, int]]:
    """``n`` sequential GET /v1/health; latencies in ms and a count per status."""
    req = (f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           f"Authorization: Bearer {token}\r\n\r\n").encode()
    lat: list[float] = []
    statuses: dict[int | str, int] = {}
    s: socket.socket | None = None
    buf = bytearray()
    deadline = time.monotonic() + PHASE_LIMIT_S
    for _ in range(n):
        if time.monotonic() > deadline:
            statuses["phase time limit"] = statuses.get("phase time limit", 0) + 1
            break
        t0 = time.perf_counter()
        try:
            if s is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf.clear()
            s.sendall(req)
            status: int | str = _read_response(s, buf)
        except OSError as exc:
            status = type(exc).__name__
            s = None
        lat.append((time.perf_counter() - t0) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        if fresh and s is not None:
            s.close()
            s = None
        time.sleep(pace_s)
    if s is not None:
        s.close()
    return lat, statuses


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) >= 100 else max(xs)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_usage(pid: int) -> str:
    threads = next((ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text()
                    .splitlines() if ln.startswith("Threads:")), "?")
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return f"threads={threads} fds={fds}"


class Series:
    """Latencies and outcomes of one condition, pooled over the rounds."""

    def __init__(self) -> None:
        self.keep_alive: list[float] = []
        self.fresh: list[float] = []
        self.statuses: dict[int | str, int] = {}

    def add(self, lat: list[float], statuses: dict[int | str, int], fresh: bool) -> None:
        (self.fresh if fresh else self.keep_alive).extend(lat)
        for k, v in statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3,
                    help="baseline and attack blocks alternate this many times")
    ap.add_argument("--requests", type=int, default=1000, help="keep-alive, per block")
    ap.add_argument("--fresh", type=int, default=100, help="fresh connections, per block")
    ap.add_argument("--peers", type=int, default=1,
                    help="spread the slots over 127.0.0.2..(1+N) (default: all 127.0.0.1)")
    ap.add_argument("--attacker-nice", type=int, default=19,
                    help="the attacker's nice value (default 19: on a small machine its own "
                         "CPU use would otherwise be measured as the agent's slowness; 0 to "
                         "let it compete)")
    ap.add_argument("--server", action="append", default=[], metavar="KEY=VALUE",
                    help="a [server] key for the agent (default: the built-in caps)")
    args = ap.parse_args()
    assert 1 <= args.slots <= 5000 and 1 <= args.peers <= 250 and 1 <= args.rounds <= 10
    assert 0 <= args.attacker_nice <= 19
    soft, hard = raise_nofile()
    print(f"open-file limit raised to soft={soft} hard={hard} (bench process; the agent "
          "raises its own)")
    base, att = Series(), Series()
    attack_s = 0.0
    cpu = {"agent": 0.0, "attacker": 0.0, "agent (baseline)": 0.0}
    base_s = 0.0
    seen = [0] * 6
    usage: list[str] = []
    extra = "".join(f"{kv}\n" for kv in args.server)
    with bed(extra_config=f"[server]\n{extra}" if extra else "") as b:
        b.start_agent()
        assert b.proc is not None
        token = (b.state / "token").read_text().strip()
        measure(b.port, token, 200, False)                   # warm-up
        ctx = mp.get_context("fork")
        for _ in range(args.rounds):
            # baseline block: nothing else connected
            a0, t0 = cpu_s(b.proc.pid), time.monotonic()
            for fresh, n in ((False, args.requests), (True, args.fresh)):
                base.add(*measure(b.port, token, n, fresh), fresh)
            cpu["agent (baseline)"] += cpu_s(b.proc.pid) - a0
            base_s += time.monotonic() - t0
            idle = agent_usage(b.proc.pid)
            # attack block
            stop = ctx.Event()
            counts = ctx.Array("q", 6, lock=False)
            attacker = ctx.Process(target=hold_slow, args=(b.port, args.slots, args.peers,
                                                           args.attacker_nice, stop, counts),
                                   daemon=True)
            attacker.start()
            try:
                ramp = time.monotonic() + RAMP_LIMIT_S
                while counts[1] < args.slots and time.monotonic() < ramp:
                    time.sleep(0.1)
                time.sleep(3)                                 # into the steady state
                c0 = list(counts)
                assert attacker.pid is not None
                a0, x0, t0 = cpu_s(b.proc.pid), cpu_s(attacker.pid), time.monotonic()
                for fresh, n in ((False, args.requests), (True, args.fresh)):
                    att.add(*measure(b.port, token, n, fresh), fresh)
                attack_s += time.monotonic() - t0
                cpu["agent"] += cpu_s(b.proc.pid) - a0
                cpu["attacker"] += cpu_s(attacker.pid) - x0
                usage.append(f"idle {idle}, under attack {agent_usage(b.proc.pid)}")
                c1 = list(counts)
                seen = [a + c1[k] - c0[k] for k, a in enumerate(seen)]
                seen[0] = c1[0]
            finally:
                stop.set()
                attacker.join(10)
                if attacker.is_alive() and attacker.pid is not None:
                    attacker.kill()
                    attacker.join()
            time.sleep(2)  # let the agent close what the attacker left

    print(f"\nagent [server] overrides: {args.server or 'none (defaults)'}")
    print(f"attacker: {args.slots} slots from {args.peers} loopback address(es), one header "
          f"line/s each, reconnecting 1 s after a close; nice {args.attacker_nice}")
    print(f"  during the measurements ({attack_s:.1f} s in {args.rounds} rounds): connected "
          f"(attacker's view, last) {seen[0]}, connects {seen[1]} ({seen[1] / attack_s:.0f}/s), "
          f"closed by the agent {seen[2]} (503 dropped {seen[3]}, 408 deadline {seen[4]}), "
          f"connect failures {seen[5]}")
    print(f"  agent (last round): {usage[-1]}")
    print(f"  CPU (share of one core): agent {cpu['agent'] / attack_s:.0%} under attack, "
          f"{cpu['agent (baseline)'] / base_s:.0%} in the baseline; attacker "
          f"{cpu['attacker'] / attack_s:.0%}; {os.cpu_count()} cores in all")
    print(f"\n/v1/health p99 (ms), {args.rounds} rounds     baseline   under attack   ratio")
    for label, b_lat, a_lat in (("keep-alive connection", base.keep_alive, att.keep_alive),
                                ("fresh connection each", base.fresh, att.fresh)):
        print(f"  {label:28} {p99(b_lat):9.3f}   {p99(a_lat):12.3f}   "
              f"{p99(a_lat) / p99(b_lat):5.2f}x")
    for label, lat in (("baseline", base.keep_alive), ("under attack", att.keep_alive)):
        q = statistics.quantiles(lat, n=1000)
        print(f"  keep-alive {label:13} p50 {q[499]:.3f}  p90 {q[899]:.3f}  p99 {q[989]:.3f}  "
              f"p99.9 {q[998]:.3f} ms")
    worst = max(att.keep_alive + att.fresh)
    print(f"\nworst latency under attack: {worst:.1f} ms (target <= 100 ms)")
    n503 = att.statuses.get(503, 0)
    print(f"503s to the authenticated client: {n503} under attack, "
          f"{base.statuses.get(503, 0)} in the baseline (target 0)")
    other = {k: v for k, v in att.statuses.items() if k not in (200, 503)}
    if other:
        print(f"other non-200 outcomes under attack: {other}")
    ratio = p99(att.keep_alive) / p99(base.keep_alive)
    print(f"\ntargets: keep-alive p99 ratio <= 2x: {'met' if ratio <= 2 else 'NOT met'} "
          f"({ratio:.2f}x); worst <= 100 ms: {'met' if worst <= 100 else 'NOT met'}; "
          f"0 503s: {'met' if n503 == 0 else 'NOT met'}")


if __name__ == "__main__":
    main()
