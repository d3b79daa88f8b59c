"""vm_net (issue 23): requests/s and p99 latency to a Nanos VM over its service's bridge
against the same VM behind QEMU's user-mode network, and against a container on the
same bridge; with wrk's own ceiling against a host-side server in the same run.

All in a network namespace the bench makes (nothing outside it is addressed but its
own loopback): wrk (``-t1 -c8``: one thread, so the 2-CPU machine leaves the guest a
CPU) runs there against
  ceiling     the same program (tests/images/hello.c) run directly on 127.0.0.1;
  user-mode   a Nanos VM deployed by an agent with ``[network] mode = "user"``, at its
              host port (slirp's forward);
  bridge      the same definition deployed by an agent with ``mode = "bridge"``, at its
              address on the bridge (TAP);
  container   a container of the same image on the same bridge, at its address.
Goals: bridge >= 2x user-mode's requests/s with a lower p99. Every figure is a ratio
against another measured in the same run; rounds alternate the VM cases' order.

Run: .venv/bin/python bench/vm_net.py [--rounds N] [--duration S]
"""

# ruff: noqa: I001  (common must be imported before the tests' helper modules)
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from common import TOP, hello_image  # first: it puts tests/ on sys.path

from bridge_env import Node, get  # noqa: E402
from qemu_env import nanos_dir, qemu_pids_in  # noqa: E402

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


FRESH = iter(range(200, 250))


@contextlib.contextmanager
def fresh_source(ns: str, url: str) -> Iterator[None]:
    """A new source address for one run to a bridged target: every request is a new
    connection (the program answers HTTP/1.0 and closes), so a guest's TCP keeps each in
    TIME_WAIT, and a client port reused onto one of those is refused or stalls (seen:
    the same run slowing 3x once the ports wrapped). A fresh /32 on the bridge, and a
    route to the target through it, give each run 4-tuples the guest has not seen."""
    host = url.split("//", 1)[1].split(":", 1)[0]
    if host.startswith("127."):
        yield
        return
    dev = json.loads(subprocess.run(["ip", "-n", ns, "-j", "route", "get", host],
                                    capture_output=True, text=True, check=True).stdout)[0]["dev"]
    src = host.rsplit(".", 1)[0] + f".{next(FRESH)}"
    subprocess.run(["ip", "-n", ns, "addr", "add", f"{src}/32", "dev", dev], check=True)
    subprocess.run(["ip", "-n", ns, "route", "replace", f"{host}/32", "dev", dev, "src", src],
                   check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", ns, "route", "del", f"{host}/32"], capture_output=True)
        subprocess.run(["ip", "-n", ns, "addr", "del", f"{src}/32", "dev", dev],
                       capture_output=True)


def wrk(ns: str, url: str, duration: float) -> tuple[float, float]:
    """(requests/s, p99 ms) of one wrk run from inside ``ns``."""
    out = subprocess.run(["ip", "netns", "exec", ns, "wrk", "-t1", "-c8",
                          f"-d{duration:g}s", "--latency", url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if not rps or not p99:
        raise SystemExit(f"wrk gave no figures for {url}:\n{out}")
    if errors and "Non-2xx" in errors[0]:
        raise SystemExit(f"wrk saw errors for {url}: {errors[0]}")
    return float(rps[1]), float(p99[1]) * UNITS[p99[2]]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each of qemu's threads (by thread name and id)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def measured(ns: str, url: str, duration: float,
             qemu: int | None) -> tuple[float, float, float | None, str]:
    """wrk's figures, and for a VM the share of a CPU its busiest qemu thread (the TCG
    vCPU) used meanwhile: near 100% is the guest's own floor under TCG, whatever the
    network in front of it."""
    before = thread_cpu(qemu) if qemu else {}
    busy0, total0 = host_cpu()
    t0 = time.monotonic()
    with fresh_source(ns, url):
        rps, p99 = wrk(ns, url, duration)
    busy1, total1 = host_cpu()
    machine = f"machine {100 * (busy1 - busy0) / max(total1 - total0, 1):.0f}% busy"
    if not qemu:
        return rps, p99, None, machine
    wall = time.monotonic() - t0
    try:
        after = thread_cpu(qemu)
    except FileNotFoundError:
        return rps, p99, None, "qemu restarted during the run"
    use = {k: (after[k] - before.get(k, 0.0)) / wall for k in after}
    busiest = max(use.values(), default=0.0)   # the TCG vCPU thread (threads are unnamed)
    return rps, p99, busiest, (f"{machine}, qemu {sum(use.values()) * 100:.0f}% of a CPU, "
                               f"busiest thread {busiest * 100:.0f}%")


def definition(tmp: Path, svc: str, image: str, container: bool) -> Path:
    path = tmp / f"{svc}.toml"
    text = (f'name = "{svc}"\n\n[[components]]\nname = "vm"\nimage = "{image}"\n'
            'runtime = "unikernel"\nmemory_mb = 192\nenv = ["MESSAGE=vm", "QUIET=1"]\n'
            '[[components.routes]]\nport = 8081\n')
    if container:
        text += (f'\n[[components]]\nname = "web"\nimage = "{image}"\n'
                 'env = ["MESSAGE=container", "QUIET=1"]\n[[components.routes]]\nport = 8080\n')
    path.write_text(text)
    return path


def deployed(node: Node, defn: Path, svc: str) -> dict[str, tuple[str, int]]:
    """component -> (address or 127.0.0.1, port), once each answers."""
    rc, out = node.mcp("deploy", str(defn))
    if rc != 0:
        raise SystemExit(f"deploy failed: {out}\n{node.log()}")
    where = {}
    for c in node.status(svc)["components"]:
        port = c["routes"][0]["host_port"]
        where[c["component"]] = (c.get("address") or "127.0.0.1", port)
    for addr, port in where.values():
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError):
                if get(node.ns, f"http://{addr}:{port}/", 3)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{addr}:{port} never answered\n{node.log()}")
            time.sleep(0.2)
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    for tool in ("ip", "nsenter", "wrk", "nft", "dnsmasq", "qemu-system-x86_64", "podman"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise SystemExit(f"vm_net: needs {tool}")
    if os.geteuid() != 0:
        raise SystemExit("vm_net: needs root (namespaces, bridges, TAPs)")
    nanos = nanos_dir()
    image = hello_image("v1")
    binary = TOP / ".build" / "hello"
    ns = f"mcpvn{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    # The user-mode VM and the ceiling are reached on 127.0.0.1: all the client ports.
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                    "net.ipv4.ip_local_port_range=1024 65535"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="mcp-vm-net-"))
    nodes: list[Node] = []
    server = None
    figures: dict[str, list[tuple[float, float]]] = {}
    vcpu: dict[str, list[float]] = {}   # VM case -> req/s per vCPU second, per run
    try:
        port = 18090
        server = subprocess.Popen(["ip", "netns", "exec", ns, str(binary)],
                                  env={**os.environ, "PORT": str(port), "MESSAGE": "host",
                                       "QUIET": "1"},
                                  stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        user = Node(ns, tmp / "user", nanos, mode="user")
        bridge = Node(ns, tmp / "bridge", nanos, mode="bridge")
        nodes += [user, bridge]
        targets: dict[str, str] = {"ceiling": f"http://127.0.0.1:{port}/"}
        user.start()
        svc_u = f"vnu{uuid.uuid4().hex[:5]}"
        a, p = deployed(user, definition(user.tmp, svc_u, image, False), svc_u)["vm"]
        targets["user-mode"] = f"http://{a}:{p}/"
        bridge.start()
        svc_b = f"vnb{uuid.uuid4().hex[:5]}"
        where = deployed(bridge, definition(bridge.tmp, svc_b, image, True), svc_b)
        targets["bridge"] = "http://{}:{}/".format(*where["vm"])
        targets["container"] = "http://{}:{}/".format(*where["web"])
        if where["vm"][0] == "127.0.0.1":
            raise SystemExit("bridge mode gave the VM no address:\n" + bridge.log())
        for name, url in targets.items():   # warm each path once
            wrk(ns, url, 1)
            print(f"{name:10s} {url}")
        states = {"user-mode": user.state, "bridge": bridge.state}
        for rnd in range(args.rounds):
            order = ["ceiling", "user-mode", "bridge", "container"]
            if rnd % 2:
                order[1:3] = order[2:0:-1]
            for name in order:
                pids = qemu_pids_in(states[name]) if name in states else []
                rps, p99, busiest, cpu = measured(ns, targets[name], args.duration,
                                                  pids[0] if pids else None)
                figures.setdefault(name, []).append((rps, p99))
                if busiest:
                    vcpu.setdefault(name, []).append(rps / busiest)
                print(f"round {rnd}: {name:10s} {rps:9.0f} req/s  p99 {p99:7.2f} ms  {cpu}")
    finally:
        for n in nodes:
            n.clean_up("mcp-vnb")
        if server is not None:
            server.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: (statistics.median(r for r, _ in v), statistics.median(p for _, p in v))
           for k, v in figures.items()}
    print("\ncase        req/s (median)   p99 ms (median)")
    for k, (rps, p99) in med.items():
        print(f"{k:10s} {rps:12.0f} {p99:14.2f}")
    r = {k: v[0] for k, v in med.items()}
    p = {k: v[1] for k, v in med.items()}
    if not r["user-mode"]:
        raise SystemExit("the user-mode VM answered nothing: no ratio to report")
    print(f"\nbridged VM / user-mode VM req/s: {r['bridge'] / r['user-mode']:.2f}x  (goal >= 2x)")
    print(f"bridged VM / user-mode VM p99:   {p['bridge'] / p['user-mode']:.2f}x  (goal < 1)")
    print(f"bridged VM / wrk ceiling req/s:  {r['bridge'] / r['ceiling']:.2f}x")
    print(f"container / wrk ceiling req/s:   {r['container'] / r['ceiling']:.2f}x")
    print(f"bridged VM / container req/s:    {r['bridge'] / r['container']:.2f}x")
    # The guest's floor: requests per second of its vCPU thread, so the most a VM can
    # answer with that thread at 100% of a CPU, whatever the network in front of it.
    per = {k: statistics.median(v) for k, v in vcpu.items()}
    if "bridge" in per and "user-mode" in per:
        print(f"\nguest floor (TCG): requests per vCPU-second: user-mode {per['user-mode']:.0f},"
              f" bridged {per['bridge']:.0f}")
        print(f"bridged VM at a whole vCPU / user-mode VM req/s: "
              f"{per['bridge'] / r['user-mode']:.2f}x  (the most the guest allows here)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
