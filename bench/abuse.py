"""abuse: the agent under hostile load (issue 16), each figure against a baseline of the
same run.

One real ``mcp-agent`` (bench/common.py, default ``[server]`` caps unless ``--server``)
and its podman service, through these cases (``--case``, default all, in this order):

- ``slowloris``: 1,000 connections that begin a request head and send one header line
  a second, never finishing it, reconnecting a second after the agent closes one.
  ``/v1/health`` p99 of one authenticated client, keep-alive and a fresh connection per
  request, against the same with none held (target <= 2x keep-alive, no 503).
- ``held``: 1,030 connections of one reader token that each sent one ``/v1/health``
  and stayed open (reconnecting a second after the agent closes one); ``streams``:
  1,024 reader ``/v1/events?follow=true`` streams, kept reading. For each, an
  operator's ``/v1/health`` (keep-alive and fresh) and ``deploy`` (an unchanged one, a
  fresh connection each, as ``mcp deploy`` comes) p99 against none held (target <= 2x,
  worst <= 100 ms, no 503).
- ``metrics``: 3,000 requests, each with a method of its own, most of them malformed;
  ``/metrics`` size and agent RSS after the first 20 of them (the series such requests
  add once) and after all (target: within 5%).
- ``logs``: a component that has written 70 MB of log; six concurrent reads of it
  (the whole log, then ``?tail=`` the cap) by operators; agent peak RSS (target <= 2x
  its idle RSS).
- ``history``: 60 services deployed (two versions each) and undeployed; the registry's
  size and its deployments rows (target: history kept for no more services than
  ``history.max_undeployed_services``, lowered to 20 for the bench).

The RSS of the agent and of its podman service is printed before, during (peak) and
after each of the last three. Baseline and load blocks alternate (``--rounds``) so
other load on the machine falls on both alike. The attackers run in processes of their
own at nice 19 (``--attacker-nice``): on 2 cores their own CPU use would otherwise be
counted as the agent's slowness. Bounded: fixed counts, a time limit per phase, traffic
only to 127.0.0.1. The open-file limit is raised to the hard one here and checked
against what the cases hold; the agent raises its own in serve().

    .venv/bin/python bench/abuse.py [--case NAME ...] [--rounds 3] [--slots 1000]
        [--held 1030] [--streams 1024] [--methods 3000] [--log-mb 70] [--tails 6]
        [--services 60] [--keep-undeployed 20] [--server KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from abusers import (
    HELD_COUNTS,
    Series,
    agent_usage,
    cpu_s,
    hold_authed,
    hold_slow,
    measure,
    p99,
    raise_nofile,
    read_response,
    request_bytes,
    rss_mb,
    sink,
)
from common import BIN, Bed, bed, hello_image

RAMP_LIMIT_S = 30.0
CASES = ("slowloris", "held", "streams", "metrics", "logs", "history")
DEPLOY = "deploy (unchanged), fresh"


class Ctx:
    """What every case needs: the bed, its tokens, the options; ``out`` collects the
    report, printed once every chosen case has run."""

    def __init__(self, b: Bed, args: argparse.Namespace, image: str) -> None:
        assert b.proc is not None
        self.b, self.args, self.image = b, args, image
        self.pid, self.port = b.proc.pid, b.port
        self.operator = (b.state / "token").read_text().strip()
        self.reader = mint(b, "abuse-reader", "reader")
        self.out: list[str] = []
        # an operator's deploy of a service already running so: what `mcp deploy` costs
        # the agent when nothing changes (a fresh connection each, as mcp comes)
        web = {"name": "abuse-web", "components": [{"name": "main", "image": image}]}
        self.deploy = request_bytes("POST", "/v1/services", self.operator,
                                    json.dumps(web).encode())
        self.targets: list[tuple[str, bool, str]] = []

    def say(self, line: str = "") -> None:
        self.out.append(line)

    def target(self, what: str, met: bool, figure: str) -> None:
        self.targets.append((what, met, figure))

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
            s.sendall(request_bytes("GET", path, token or self.operator))
            return read_response(s, bytearray())

    def post(self, path: str, body: Any) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as s:
            s.sendall(request_bytes("POST", path, self.operator, json.dumps(body).encode()))
            return read_response(s, bytearray())

    def delete(self, path: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as s:
            s.sendall(request_bytes("DELETE", path, self.operator))
            return read_response(s, bytearray())


def mint(b: Bed, name: str, role: str) -> str:
    """A token of ``role`` made as an operator would (``mcp-agent token add``)."""
    import subprocess

    out = b.dir / f"{name}.tok"
    subprocess.run([str(BIN / "mcp-agent"), "--config", str(b.config), "--state-dir",
                    str(b.state), "token", "add", name, role, "--output", str(out)],
                   check=True, capture_output=True)
    return out.read_text().strip()


def fd_check(ctx: Ctx) -> None:
    soft, hard = raise_nofile()
    limits = Path(f"/proc/{ctx.pid}/limits").read_text()
    agent_soft = next((ln.split()[3] for ln in limits.splitlines()
                       if ln.startswith("Max open files")), "?")
    a = ctx.args
    want = max(a.slots if "slowloris" in a.chosen else 0, a.held if "held" in a.chosen else 0,
               a.streams if "streams" in a.chosen else 0) + 256
    ctx.say(f"open files: bench soft={soft} hard={hard}, agent soft={agent_soft}; the "
            f"largest case holds {want - 256} connections (+256 headroom)")
    if soft < want or (agent_soft.isdigit() and int(agent_soft) < want):
        ctx.say(f"  WARNING: an open-file limit below {want}: connect failures below are "
                "the limit's, not the agent's")


# -- load in the background --------------------------------------------------------------------


@contextmanager
def attacker(target: Callable[..., None], args: tuple[Any, ...], counts: Any,
             until: Callable[[], bool]) -> Iterator[Any]:
    """``target(*args, stop, counts)`` in a process of its own, until the block ends;
    yields once ``until()`` holds (or the ramp's time limit passed) and 3 s more."""
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, stop, counts), daemon=True)
    proc.start()
    try:
        ramp = time.monotonic() + RAMP_LIMIT_S
        while not until() and time.monotonic() < ramp:
            time.sleep(0.1)
        time.sleep(3)                                      # into the steady state
        yield proc
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    time.sleep(2)                                          # the agent closes what it left


class Peak:
    """Peak RSS (MB) of some processes, sampled every 50 ms while in the block."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {k: 0.0 for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, pid in self.pids.items():
                self.peak[k] = max(self.peak[k], rss_mb(pid))
            self._stop.wait(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_now(ctx: Ctx) -> dict[str, float]:
    return {"agent": rss_mb(ctx.pid), "podman": rss_mb(ctx.b.podman.pid)}


def rss_line(label: str, before: dict[str, float], peak: dict[str, float],
             after: dict[str, float]) -> str:
    return "  " + label + "; ".join(
        f"{k} RSS {before[k]:.1f} MB before, {peak[k]:.1f} peak during, {after[k]:.1f} after"
        for k in before)


def settle(ctx: Ctx) -> dict[str, float]:
    time.sleep(2)
    return rss_now(ctx)


# -- slowloris -----------------------------------------------------------------------------------


def case_slowloris(ctx: Ctx) -> None:
    a = ctx.args
    health = request_bytes("GET", "/v1/health", ctx.operator)
    base, att = Series(), Series()
    cpu = {"agent": 0.0, "attacker": 0.0, "base": 0.0}
    base_s = att_s = 0.0
    seen = [0] * 6
    usage = ""
    for _ in range(a.rounds):
        c0, t0 = cpu_s(ctx.pid), time.monotonic()
        base.add("keep-alive", *measure(ctx.port, health, a.requests, False))
        base.add("fresh", *measure(ctx.port, health, a.fresh, True))
        base.add(DEPLOY, *measure(ctx.port, ctx.deploy, a.deploys, True, 0.01))
        cpu["base"] += cpu_s(ctx.pid) - c0
        base_s += time.monotonic() - t0
        counts = mp.get_context("fork").Array("q", 6, lock=False)
        with attacker(hold_slow, (ctx.port, a.slots, a.peers, a.attacker_nice), counts,
                      lambda: counts[1] >= a.slots) as proc:
            k0 = list(counts)
            c0, x0, t0 = cpu_s(ctx.pid), cpu_s(proc.pid), time.monotonic()
            att.add("keep-alive", *measure(ctx.port, health, a.requests, False))
            att.add("fresh", *measure(ctx.port, health, a.fresh, True))
            att.add(DEPLOY, *measure(ctx.port, ctx.deploy, a.deploys, True, 0.01))
            att_s += time.monotonic() - t0
            cpu["agent"] += cpu_s(ctx.pid) - c0
            cpu["attacker"] += cpu_s(proc.pid) - x0
            usage = agent_usage(ctx.pid)
            k1 = list(counts)
            seen = [s + k1[i] - k0[i] for i, s in enumerate(seen)]
            seen[0] = k1[0]
    ctx.say(f"\n== slowloris: {a.slots} slots from {a.peers} loopback address(es), one "
            f"header line/s each, reconnecting 1 s after a close; nice {a.attacker_nice}")
    ctx.say(f"  during the measurements ({att_s:.1f} s in {a.rounds} rounds): connected "
            f"(attacker's view, last) {seen[0]}, connects {seen[1]} ({seen[1] / att_s:.0f}/s), "
            f"closed by the agent {seen[2]} (503 dropped {seen[3]}, 408 deadline {seen[4]}), "
            f"connect failures {seen[5]}")
    ctx.say(f"  agent (last round): {usage}")
    ctx.say(f"  CPU (share of one core): agent {cpu['agent'] / att_s:.0%} under attack, "
            f"{cpu['base'] / base_s:.0%} in the baseline; attacker "
            f"{cpu['attacker'] / att_s:.0%}; {os.cpu_count()} cores in all")
    report_latency(ctx, "slowloris", "/v1/health", base, att,
                   ("keep-alive", "fresh", DEPLOY), gate=("keep-alive",),
                   worst_of=("keep-alive", "fresh"))


def report_latency(ctx: Ctx, case: str, what: str, base: Series, att: Series,
                   kinds: tuple[str, ...], gate: tuple[str, ...],
                   worst_of: tuple[str, ...] | None = None) -> None:
    """p99 per kind against its baseline; the targets: ratio <= 2x for ``gate`` kinds,
    worst <= 100 ms for ``worst_of`` (default all) and no 503 for all."""
    ctx.say(f"  {what} (ms), {ctx.args.rounds} rounds     p99: baseline  under load   ratio"
            "   worst: baseline  under load")
    for kind in kinds:
        b_p, a_p = p99(base.lat[kind]), p99(att.lat[kind])
        ctx.say(f"    {kind:28} {b_p:14.3f} {a_p:11.3f} {a_p / b_p:6.2f}x "
                f"{max(base.lat[kind]):16.1f} {max(att.lat[kind]):11.1f}")
        if kind in gate:
            ctx.target(f"{case}: {kind} p99 ratio <= 2x", a_p / b_p <= 2, f"{a_p / b_p:.2f}x")
    worst = max(x for kind in worst_of or kinds for x in att.lat[kind])
    ctx.say(f"  503s: {att.statuses.get(503, 0)} under load, {base.statuses.get(503, 0)} in "
            "the baseline")
    other = {k: v for k, v in att.statuses.items() if k not in (200, 503)}
    if other:
        ctx.say(f"  other outcomes under load: {other}")
    ctx.target(f"{case}: worst <= 100 ms ({', '.join(worst_of or kinds)})", worst <= 100,
               f"{worst:.1f} ms")
    ctx.target(f"{case}: no 503", att.statuses.get(503, 0) == 0,
               f"{att.statuses.get(503, 0)} 503s")


# -- held reader connections and reader follow streams ------------------------------------------


def operator_block(ctx: Ctx, series: Series) -> None:
    a = ctx.args
    health = request_bytes("GET", "/v1/health", ctx.operator)
    series.add("health keep-alive", *measure(ctx.port, health, a.requests, False))
    series.add("health fresh", *measure(ctx.port, health, a.fresh, True))
    series.add(DEPLOY, *measure(ctx.port, ctx.deploy, a.deploys, True, 0.01))


def case_reader_load(ctx: Ctx, case: str) -> None:
    """``held`` or ``streams``: the operator's figures with and without that load."""
    a = ctx.args
    slots, path = ((a.held, "/v1/health") if case == "held"
                   else (a.streams, "/v1/events?follow=true&tail=0"))
    base, att, floor = Series(), Series(), Series()
    seen = [0] * len(HELD_COUNTS)
    usage = ""
    cpu = {"agent": 0.0, "attacker": 0.0, "base": 0.0}
    base_s = att_s = 0.0
    for _ in range(a.rounds):
        c0, t0 = cpu_s(ctx.pid), time.monotonic()
        operator_block(ctx, base)
        cpu["base"] += cpu_s(ctx.pid) - c0
        base_s += time.monotonic() - t0
        counts = mp.get_context("fork").Array("q", len(HELD_COUNTS), lock=False)
        with attacker(hold_authed, (ctx.port, ctx.reader, slots, path, a.attacker_nice),
                      counts, lambda: counts[1] >= slots) as proc:
            k0 = list(counts)
            c0, x0, t0 = cpu_s(ctx.pid), cpu_s(proc.pid), time.monotonic()
            operator_block(ctx, att)
            att_s += time.monotonic() - t0
            cpu["agent"] += cpu_s(ctx.pid) - c0
            cpu["attacker"] += cpu_s(proc.pid) - x0
            usage = agent_usage(ctx.pid)
            k1 = list(counts)
            seen = [s + k1[i] - k0[i] for i, s in enumerate(seen)]
            seen[0] = k1[0]
        if case == "held":
            floor_block(ctx, floor, slots, path)
    what = ("connections that each sent one /v1/health and stayed open" if case == "held"
            else "/v1/events?follow=true streams, kept reading")
    ctx.say(f"\n== {case}: {slots} reader {what} (one token), reconnecting 1 s after a "
            f"close; nice {a.attacker_nice}")
    ctx.say("  reader's view during the measurements: " + ", ".join(
        f"{label} {n}" for label, n in zip(HELD_COUNTS, seen, strict=True)))
    ctx.say(f"  agent (last round): {usage}")
    ctx.say(f"  CPU (share of one core): agent {cpu['agent'] / att_s:.0%} under load, "
            f"{cpu['base'] / base_s:.0%} in the baseline; reader {cpu['attacker'] / att_s:.0%}")
    report_latency(ctx, case, "operator", base, att,
                   ("health keep-alive", "health fresh", DEPLOY),
                   gate=("health keep-alive", DEPLOY))
    if case == "held":
        ctx.say("  floor: the same reader load aimed at a sink process instead (abusers.sink: "
                "accept, read the head, 503, close; Python, the agent's priority), the "
                "operator still measured against the agent:")
        for kind in ("health keep-alive", "health fresh", DEPLOY):
            b_p, f_p, a_p = p99(base.lat[kind]), p99(floor.lat[kind]), p99(att.lat[kind])
            ctx.say(f"    {kind:28} p99 {f_p:.3f} ms = {f_p / b_p:.2f}x the baseline; the "
                    f"agent's own load {a_p / f_p:.2f}x the floor")


def floor_block(ctx: Ctx, series: Series, slots: int, path: str) -> None:
    """The operator's block while the reader's connections go to ``abusers.sink``."""
    a, fork = ctx.args, mp.get_context("fork")
    port, stop = fork.Value("i", 0), fork.Event()
    proc = fork.Process(target=sink, args=(port, stop), daemon=True)
    proc.start()
    try:
        while port.value == 0 and proc.is_alive():
            time.sleep(0.01)
        counts = fork.Array("q", len(HELD_COUNTS), lock=False)
        with attacker(hold_authed, (port.value, ctx.reader, slots, path, a.attacker_nice),
                      counts, lambda: counts[1] >= slots):
            operator_block(ctx, series)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# -- metrics labels -------------------------------------------------------------------------------


def case_metrics(ctx: Ctx) -> None:
    n = ctx.args.methods
    first = 20  # the series these requests add once (method "other", their statuses)
    size00 = len(ctx.get("/metrics")[1])
    answers: dict[int | str, int] = {}
    before: dict[str, float] = {}
    size0 = 0
    with Peak({"agent": ctx.pid, "podman": ctx.b.podman.pid}) as peak:
        for i in range(n + first):
            if i == first:
                size0, before = len(ctx.get("/metrics")[1]), rss_now(ctx)
            # a method of its own each: one in four a well-formed but unknown one
            method = f"X{i}" if i % 4 == 0 else f"B@D{i}"
            try:
                with socket.create_connection(("127.0.0.1", ctx.port), timeout=10) as s:
                    s.sendall(f"{method} /v1/health HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    status: int | str = read_response(s, bytearray())[0]
            except OSError as exc:
                status = type(exc).__name__
            answers[status] = answers.get(status, 0) + 1
    after = settle(ctx)
    size1 = len(ctx.get("/metrics")[1])
    ctx.say(f"\n== metrics: {n} requests with a method of their own each, no token, after "
            f"{first} such (answers: {answers})")
    ctx.say(f"  /metrics {size00} bytes at first, {size0} after the first {first}, {size1} "
            f"after {n} more ({size1 / size0 - 1:+.1%})")
    ctx.say(rss_line("", before, peak.peak, after))
    grew = after["agent"] / before["agent"] - 1
    ctx.target("metrics: /metrics size within 5%", abs(size1 / size0 - 1) <= 0.05,
               f"{size1 / size0 - 1:+.1%}")
    ctx.target("metrics: agent RSS within 5%", abs(grew) <= 0.05, f"{grew:+.1%}")


# -- log reads ------------------------------------------------------------------------------------


def fill_log(port: int, mb: int, threads: int = 8) -> int:
    """Requests to the hello component, each logging a ~2 KB line, until ``mb`` MB."""
    line = b"GET /" + b"x" * 1990 + b" HTTP/1.0\r\n\r\n"
    per = len(line) - 4 + 8                                  # "hello: " and a newline
    total = mb * 1_000_000 // per + 1
    left = [total]
    lock = threading.Lock()
    deadline = time.monotonic() + 600

    def run() -> None:
        while time.monotonic() < deadline:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(line)
                    while s.recv(4096):
                        pass
            except OSError:
                with lock:
                    left[0] += 1                             # not logged: again
                time.sleep(0.05)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return total * per


def concurrent_reads(ctx: Ctx, path: str, n: int) -> list[tuple[int | str, int, float]]:
    """``n`` concurrent GET ``path`` read to the end: (status, bytes, seconds) each."""
    results: list[tuple[int | str, int, float]] = [("-", 0, 0.0)] * n

    def one(k: int) -> None:
        t0 = time.monotonic()
        try:
            status, body = ctx.get(path)
            results[k] = (status, len(body), time.monotonic() - t0)
        except OSError as exc:
            results[k] = (type(exc).__name__, 0, time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def log_file_mb(ctx: Ctx, container: str) -> str:
    """The size of the container's log file, as podman keeps it ("?" if it will not say)."""
    import subprocess

    out = subprocess.run(["podman", "--url", ctx.b.podman.url, "inspect", container,
                          "--format", "{{.HostConfig.LogConfig.Path}}"],
                         capture_output=True, text=True, timeout=60)
    path = Path(out.stdout.strip())
    return f"{path.stat().st_size / 1e6:.1f} MB" if path.is_file() else "? MB"


def case_logs(ctx: Ctx) -> None:
    a = ctx.args
    body = {"name": "abuse-logs", "components": [{"name": "main", "image": ctx.image,
                                                  "routes": [{"port": 8080}]}]}
    status, answer = ctx.post("/v1/services", body)
    assert status == 200, answer
    deadline = time.monotonic() + 120
    while True:
        comp = json.loads(ctx.get("/v1/services/abuse-logs")[1])["components"][0]
        if comp["ready"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert comp["ready"], comp
    port = comp["routes"][0]["host_port"]
    t0 = time.monotonic()
    fill_log(int(port), a.log_mb)
    took = time.monotonic() - t0
    ctx.say(f"\n== logs: a component that wrote {log_file_mb(ctx, 'mcp-abuse-logs-main')} of "
            f"log ({took:.0f} s to write); {a.tails} concurrent reads each")
    idle = settle(ctx)
    for label, path in (("whole log", "/v1/services/abuse-logs/logs"),
                        ("?tail=10000", "/v1/services/abuse-logs/logs?tail=10000")):
        before = settle(ctx)
        with Peak({"agent": ctx.pid, "podman": ctx.b.podman.pid}) as peak:
            results = concurrent_reads(ctx, path, a.tails)
        after = settle(ctx)
        outcome = ", ".join(f"{s} {n / 1e6:.1f} MB in {t:.1f} s" for s, n, t in results)
        ctx.say(f"  {label}: {outcome}")
        ctx.say(rss_line("", before, peak.peak, after))
        ratio = peak.peak["agent"] / idle["agent"]
        ctx.target(f"logs ({label}): agent peak RSS <= 2x idle", ratio <= 2,
                   f"{ratio:.2f}x ({peak.peak['agent']:.0f} / {idle['agent']:.0f} MB)")
    ctx.delete("/v1/services/abuse-logs")


# -- undeployed history ---------------------------------------------------------------------------


def registry_figures(ctx: Ctx) -> tuple[str, int]:
    """A line on the registry's size and deployments rows; how many services have any."""
    db = ctx.b.state / "registry.db"
    size = sum(p.stat().st_size for p in db.parent.glob("registry.db*"))
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows, services = con.execute(
            "SELECT COUNT(*), COUNT(DISTINCT service) FROM deployments").fetchone()
    finally:
        con.close()
    return (f"registry {size / 1e6:.2f} MB, {rows} deployment rows of {services} services",
            int(services))


def case_history(ctx: Ctx) -> None:
    n, keep = ctx.args.services, ctx.args.keep_undeployed
    before, figures0 = settle(ctx), registry_figures(ctx)
    t0 = time.monotonic()
    failures = 0
    figures_mid = ""
    with Peak({"agent": ctx.pid, "podman": ctx.b.podman.pid}) as peak:
        for i in range(n):
            for version in range(2):                      # two versions of each
                body = {"name": f"abuse-h{i}", "components": [
                    {"name": "main", "image": ctx.image, "env": [f"V={version}"]}]}
                failures += ctx.post("/v1/services", body)[0] != 200
            failures += ctx.delete(f"/v1/services/abuse-h{i}")[0] != 200
            if i == n // 2:
                figures_mid = registry_figures(ctx)[0]
    after, figures1 = settle(ctx), registry_figures(ctx)
    ctx.say(f"\n== history: {n} services deployed (2 versions each) and undeployed in "
            f"{time.monotonic() - t0:.0f} s ({failures} calls not 200), "
            f"history.max_undeployed_services = {keep}")
    ctx.say(f"  before: {figures0[0]}; half-way: {figures_mid}; after: {figures1[0]}")
    ctx.say(rss_line("", before, peak.peak, after))
    ctx.target("history: services with history <= history.max_undeployed_services",
               figures1[1] <= keep, f"{figures1[1]} of {n + 2}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=CASES, help="default: all")
    ap.add_argument("--rounds", type=int, default=3,
                    help="baseline and load blocks alternate this many times")
    ap.add_argument("--requests", type=int, default=1000, help="keep-alive, per block")
    ap.add_argument("--fresh", type=int, default=100, help="fresh connections, per block")
    ap.add_argument("--deploys", type=int, default=50, help="deploys, per block")
    ap.add_argument("--slots", type=int, default=1000, help="slowloris connections")
    ap.add_argument("--peers", type=int, default=1,
                    help="spread the slowloris slots over 127.0.0.2..(1+N)")
    ap.add_argument("--held", type=int, default=1030, help="held reader connections")
    ap.add_argument("--streams", type=int, default=1024, help="reader follow streams")
    ap.add_argument("--methods", type=int, default=3000, help="requests of the metrics case")
    ap.add_argument("--log-mb", type=int, default=70)
    ap.add_argument("--tails", type=int, default=6, help="concurrent log reads")
    ap.add_argument("--services", type=int, default=60, help="of the history case")
    ap.add_argument("--keep-undeployed", type=int, default=20,
                    help="history.max_undeployed_services for the agent (default 100: "
                         "lowered so that fewer services show the bound)")
    ap.add_argument("--attacker-nice", type=int, default=19,
                    help="the attackers' nice value (0 to let them compete)")
    ap.add_argument("--server", action="append", default=[], metavar="KEY=VALUE",
                    help="a [server] key for the agent (default: the built-in caps)")
    args = ap.parse_args()
    assert 1 <= args.slots <= 5000 and 1 <= args.held <= 5000 and 1 <= args.streams <= 5000
    assert 1 <= args.peers <= 250 and 1 <= args.rounds <= 10 and 0 <= args.attacker_nice <= 19
    assert 1 <= args.log_mb <= 500 and 1 <= args.tails <= 32 and 2 <= args.services <= 1000
    chosen = args.chosen = [c for c in CASES if c in (args.case or CASES)]
    raise_nofile()
    image = hello_image()
    extra = "".join(f"{kv}\n" for kv in args.server)
    config = ((f"[server]\n{extra}" if extra else "")
              + f"[history]\nmax_undeployed_services = {args.keep_undeployed}\n")
    with bed(extra_config=config) as b:
        b.start_agent()
        ctx = Ctx(b, args, image)
        ctx.say(f"agent [server] overrides: {args.server or 'none (defaults)'}")
        fd_check(ctx)
        warm = request_bytes("GET", "/v1/health", ctx.operator)
        measure(ctx.port, warm, 200, False)
        timed = [c for c in chosen if c in ("slowloris", "held", "streams")]
        if timed:  # the service the operator's deploys find unchanged
            status, answer = ctx.post("/v1/services", json.loads(ctx.deploy.partition(
                b"\r\n\r\n")[2]))
            assert status == 200, answer
        for case in CASES:
            if case in chosen:
                if case in ("held", "streams"):
                    case_reader_load(ctx, case)
                else:
                    globals()[f"case_{case}"](ctx)
                if timed and case == timed[-1]:
                    ctx.delete("/v1/services/abuse-web")
    print("\n".join(ctx.out))
    print("\ntargets:")
    for what, met, figure in ctx.targets:
        print(f"  {what}: {'met' if met else 'NOT met'} ({figure})")
    missed = [t for t in ctx.targets if not t[1]]
    print(f"{len(ctx.targets) - len(missed)} of {len(ctx.targets)} met")


if __name__ == "__main__":
    main()
