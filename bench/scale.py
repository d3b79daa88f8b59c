"""scale: what the agent costs as the node grows (issue 21), each figure against the
same run's smaller node.

One real ``mcp-agent`` and its podman service. Agent CPU is utime + stime of the
agent process from ``/proc`` (every thread, the exited ones included).

- idle round: the agent restarted with ``monitor.interval_s`` 1 s, then CPU over
  ``--idle-s`` seconds divided by the rounds in them (the agent's ``mcp_monitor_rounds``),
  and of it the monitor thread's own (``mcp_monitor_round_cpu_seconds``; the rest is the
  checker's probes), and of that the runtimes' listings (``mcp_monitor_listing_cpu_seconds``:
  timed by the agent in the same rounds, so under the same load and cache state as the rest
  of the round; a listing timed here, back to back in a hot loop, came out at a
  fraction). At 10 services with 0, 100k and 1M events in the log (rows written into
  the registry as old, planned state changes spread over the services; removed again
  after), then at 100 and 300 services.
  Target: flat in events; linear in services only through podman's own listing.
- deploy: the agent with no rounds (interval 1 h) deploying services of one container
  and one route each, through the HTTP API; agent CPU of deploys 1-10 against deploys
  291-300 (``--services``). Target <= 1.3x.
- undeploy: the same for undeploys of the first and of the last ten services.

- fleet deploy (bench/scale_fleet.py): etcd requests and bytes per fleet deploy with 1 /
  100 / 1,000 node records and 10 / 200 services on the node. Target <= 2x.

    .venv/bin/python bench/scale.py [--services 300] [--idle-s 15] [--events 100000,1000000]
                                    [--only node|fleet]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from pathlib import Path

import scale_fleet
from common import Bed, bed, hello_image
from prometheus_client.parser import text_string_to_metric_families

from mcp_node.client import Client

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def service(i: int, image: str) -> dict[str, object]:
    return {"name": f"scale-{i:04d}", "components": [
        {"name": "web", "image": image, "routes": [{"port": 8080}]}]}


def restart(b: Bed, interval_s: float) -> Client:
    assert b.daemon is not None
    b.daemon.stop()
    text = b.config.read_text()
    head, _, rest = text.partition("[monitor]\ninterval_s = ")
    b.config.write_text(f"{head}[monitor]\ninterval_s = {interval_s}\n"
                        + rest.partition("\n")[2])
    return b.start_agent()


COUNTERS = ("mcp_monitor_rounds_total", "mcp_monitor_round_cpu_seconds_total",
            "mcp_monitor_listing_cpu_seconds_total")


def round_counters(client: Client) -> list[float]:
    """The agent's own counts: monitor rounds, their thread's CPU seconds, and of it the
    runtimes' listings' (timed in the same rounds, under the same load)."""
    text = b"".join(client.stream("/metrics")).decode()
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return [got[name] for name in COUNTERS]


def settle(client: Client, names: list[str], timeout: float = 300.0) -> None:
    """Until no service's rollout is in progress. The deploys ran with no rounds, so the
    first rounds after the restart judge every rollout they began (a registry write and
    an event each as one ends): that is not an idle round, and it had made the figure at
    300 services half as much again."""
    deadline = time.monotonic() + timeout
    while names:
        names = [n for n in names if (client.get(f"/v1/services/{n}").get("rollout") or {})
                 .get("state") == "in_progress"]
        assert time.monotonic() < deadline, f"rollouts in progress: {names[:5]}"
        time.sleep(1 if names else 0)


def idle_round_ms(b: Bed, seconds: float, names: list[str]) -> tuple[float, int, float, float]:
    """Over ``seconds`` of an idle agent (the services ``names``): its CPU per monitor
    round (ms), the rounds, the round's own share (ms per round of the monitor thread's
    CPU, as the agent counts it; the rest is the checker probing each component every
    check_interval_s) and of that the listings' (ms per round)."""
    client = restart(b, 1.0)
    time.sleep(3)                       # past the start-up's own rounds and adoption
    settle(client, names)
    time.sleep(2)
    assert b.proc is not None
    c0, (r0, m0, l0) = cpu_s(b.proc.pid), round_counters(client)
    time.sleep(seconds)
    c1, (r1, m1, l1) = cpu_s(b.proc.pid), round_counters(client)
    rounds = max(int(r1 - r0), 1)
    return ((c1 - c0) * 1000 / rounds, rounds, (m1 - m0) * 1000 / rounds,
            (l1 - l0) * 1000 / rounds)


def add_events(b: Bed, n: int, services: list[str]) -> None:
    db = sqlite3.connect(b.state / "registry.db", timeout=60)
    now = time.time()
    rows = ((services[i % len(services)], "web", now - 86400 + i * 86400 / n, "running",
             "running", "bench", 0) for i in range(n))
    with db:
        db.executemany("INSERT INTO events (service, component, time, prev_state, "
                       "new_state, detail, unplanned) VALUES (?,?,?,?,?,?,?)", rows)
    db.close()


def drop_events(b: Bed) -> None:
    db = sqlite3.connect(b.state / "registry.db", timeout=60)
    with db:
        db.execute("DELETE FROM events WHERE detail='bench'")
    db.execute("VACUUM")
    db.close()


def background_s(b: Bed, seconds: float = 5.0) -> float:
    """The agent's CPU per second with no request and no round (its checker's ticks)."""
    assert b.proc is not None
    c0, t0 = cpu_s(b.proc.pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_s(b.proc.pid) - c0) / (time.monotonic() - t0)


def calls_cpu_ms(b: Bed, client: Client,
                 calls: list[tuple[str, str, object]]) -> tuple[float, float]:
    """Agent CPU per call (ms): as measured, and less the background measured just
    before over the calls' own time (what the calls themselves cost)."""
    assert b.proc is not None
    rate = background_s(b)
    c0, t0 = cpu_s(b.proc.pid), time.monotonic()
    for method, path, body in calls:
        client.request(method, path, body)
    cpu, wall = cpu_s(b.proc.pid) - c0, time.monotonic() - t0
    return cpu * 1000 / len(calls), (cpu - rate * wall) * 1000 / len(calls)


def deploys(specs: list[dict[str, object]]) -> list[tuple[str, str, object]]:
    return [("POST", "/v1/services", spec) for spec in specs]


def undeploys(specs: list[dict[str, object]]) -> list[tuple[str, str, object]]:
    return [("DELETE", f"/v1/services/{spec['name']}", None) for spec in specs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=300)
    ap.add_argument("--idle-s", type=float, default=15.0)
    ap.add_argument("--events", default="100000,1000000")
    ap.add_argument("--only", choices=("node", "fleet"), default="")
    a = ap.parse_args()
    if a.only != "node":
        fleet = scale_fleet.run()
        if a.only == "fleet":
            print("scale, fleet\n" + "\n".join(fleet))
            return
    image = hello_image()
    out: list[str] = []
    with bed(monitor_interval=3600.0) as b:
        client = b.start_agent()
        specs = [service(i, image) for i in range(a.services + 10)]
        first = calls_cpu_ms(b, client, deploys(specs[:10]))
        idle: dict[str, tuple[float, int, float, float]] = {}
        names = [str(s["name"]) for s in specs[:10]]
        idle["10 services, 0 events"] = idle_round_ms(b, a.idle_s, names)
        for n in (int(x) for x in a.events.split(",") if x):
            add_events(b, n, names)
            idle[f"10 services, {n:,} events"] = idle_round_ms(b, a.idle_s, names)
            drop_events(b)
        client = restart(b, 3600.0)
        at = 10
        for size in sorted({min(100, a.services), a.services}):
            if size > at:
                for spec in specs[at:size - 10]:
                    client.request("POST", "/v1/services", spec)
                last = calls_cpu_ms(b, client, deploys(specs[size - 10:size]))
                at = size
                idle[f"{size} services"] = idle_round_ms(
                    b, a.idle_s, [str(s["name"]) for s in specs[:size]])
                client = restart(b, 3600.0)
        undeploy_last = calls_cpu_ms(b, client, undeploys(specs[at - 10:at]))
        undeploy_first = calls_cpu_ms(b, client, undeploys(specs[:10]))
    base = idle["10 services, 0 events"][0]
    out.append(f"scale ({a.services} services at most; agent CPU from /proc)")
    own0 = idle["10 services, 0 events"][2]
    out.append("  idle monitor round, agent CPU per round; of it the round's own thread (the "
               "agent's count; the rest is the checker's probes):")
    for label, (ms, rounds, own, _listed) in idle.items():
        out.append(f"    {label:28} {ms:7.2f} ms  ({rounds} rounds)  {ms / base:5.2f}x;  "
                   f"round {own:6.2f} ms  {own / own0:5.2f}x")
    out.append("  of the round's own, the runtimes' listings (podman's answer read and parsed, "
               "as the agent counts them); the rest:")
    list0, rest0 = idle["10 services, 0 events"][3], own0 - idle["10 services, 0 events"][3]
    for label, (_ms, _rounds, own, listed) in idle.items():   # events: the rest reads them
        out.append(f"    {label:28} listing {listed:6.2f} ms = {listed / list0:5.2f}x; the "
                   f"rest {own - listed:6.2f} ms = {(own - listed) / rest0:5.2f}x")
    out.append(f"  deploy, agent CPU per deploy: 1st-10th {first[0]:.1f} ms, {at - 9}th-{at}th "
               f"{last[0]:.1f} ms = {last[0] / first[0]:.2f}x; less the background measured "
               f"before each (the checker's ticks): {first[1]:.1f} ms, {last[1]:.1f} ms = "
               f"{last[1] / first[1]:.2f}x (target <= 1.3x)")
    out.append(f"  undeploy, agent CPU per undeploy: the last ten (with {at - 10}-{at} "
               f"deployed) {undeploy_last[0]:.1f} ms, the first ten (with {at - 20}-"
               f"{at - 10}) {undeploy_first[0]:.1f} ms; less the background "
               f"{undeploy_last[1]:.1f} ms, {undeploy_first[1]:.1f} ms")
    ev = [(k, v[0]) for k, v in idle.items() if k.startswith("10 services")]
    out.append(f"  idle round, {ev[-1][0]} / none: {ev[-1][1] / ev[0][1]:.2f}x (target: flat)")
    if a.only != "node":
        out.extend(fleet)
    print("\n".join(out))


if __name__ == "__main__":
    main()
