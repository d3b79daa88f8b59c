"""Bridge mode end to end (issue 23), in a network namespace this test makes: a real
agent process (started there with nsenter, so podman keeps its cgroup mounts), its own
podman service and CNI network, a Nanos VM on a TAP, the service's dnsmasq, the node's
nftables table. Nothing outside the namespace is addressed but its own loopback.

One flow, because each Nanos boot under TCG costs seconds: a container and a VM of one
service reach each other by name (short and ``<c>.<service>.internal``) in both
directions; another service's container cannot reach them, by address or by name, until
their definition lets it in (and then only that way round); a start-first replace of the
VM moves its name and host port to the new one; an agent SIGKILLed and
started again keeps the VM (same qemu, same address) and its traffic, through the outage
too; links a crashed undeploy would leave are removed by
the next round; a podman network removed by hand is made again, its container with it;
undeploy leaves no link, address, rule, resolver or podman network."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge_env import CIDR, Node, get, ip, lookup, our_links, resolvers, table
from podman_env import podman_cli
from qemu_env import qemu_pids_in

from mcp_node.netplan import resolver_dir


@pytest.fixture
def node(tmp_path: Path, hello_image: str, nanos: Path) -> Iterator[Node]:
    from conftest import lacking, need

    need("ip", "nft", "dnsmasq", "nsenter", "qemu-system-x86_64", "podman")
    if os.geteuid() != 0:
        lacking("root (bridges, TAPs, nftables)")
    ns = f"mcpbn{os.getpid()}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    n = Node(ns, tmp_path, nanos)
    try:
        yield n
    finally:
        n.clean_up("mcp-nb")


def definition(tmp: Path, svc: str, image: str, vm: bool = True, allow: str = "",
               vm_says: str = "unikernel", order: str = "", vm_memory: int = 192,
               vm_pin: str = "") -> Path:
    path = tmp / f"{svc}.toml"
    text = f'name = "{svc}"\n' + (f'[network]\nallow_from = ["{allow}"]\n' if allow else "")
    if order:
        text += f'[update]\norder = "{order}"\ndrain_s = 1\nhealthy_deadline_s = 60\n'

    text += f'\n[[components]]\nname = "web"\nimage = "{image}"\n' \
           'env = ["MESSAGE=container"]\n[[components.routes]]\nport = 8080\n'
    if vm:
        text += f'\n[[components]]\nname = "vm"\nimage = "{image}"\nruntime = "unikernel"\n' \
                f'memory_mb = {vm_memory}\nenv = ["MESSAGE={vm_says}"]\n' + \
                (f'image_sha256 = "{vm_pin}"\n' if vm_pin else "") + '[[components.routes]]\n' \
                'port = 8081\n'
    path.write_text(text)
    return path


def podman_networks() -> list[str]:
    return podman_cli("network", "ls", "--format", "{{.Name}}").stdout.split()


def comp(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in st["components"] if c["component"] == name)


def addr_port(st: dict[str, Any], name: str) -> tuple[str, int]:
    c = comp(st, name)
    return c["address"], c["routes"][0]["host_port"]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            value = check()
            if value:
                return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_bridge_mode_by_name_isolated_survives_a_crash_and_leaves_nothing(
        node: Node, hello_image: str) -> None:
    tag = uuid.uuid4().hex[:6]
    a, b = f"nba{tag}", f"nbb{tag}"
    node.start()
    rc, out = node.mcp("deploy", str(definition(node.tmp, a, hello_image)))
    assert rc == 0, out + node.log()
    rc, out = node.mcp("deploy", str(definition(node.tmp, b, hello_image, vm=False)))
    assert rc == 0, out + node.log()
    st = node.status(a)
    (web, web_port), (vm, vm_port) = addr_port(st, "web"), addr_port(st, "vm")
    other, other_port = addr_port(node.status(b), "web")
    assert web.startswith("10.213.") and vm.startswith("10.213.") and other.startswith("10.213.")
    assert web.rsplit(".", 1)[0] == vm.rsplit(".", 1)[0] != other.rsplit(".", 1)[0]
    wait_for(lambda: get(node.ns, f"http://{vm}:{vm_port}/", 3)[0] == 200, 60, "the VM")

    # By name, both directions, short and qualified.
    assert get(node.ns, f"http://{web}:{web_port}/get/vm/{vm_port}") == \
        (200, "hello from unikernel\n")
    assert get(node.ns, f"http://{vm}:{vm_port}/get/web/{web_port}") == \
        (200, "hello from container\n")
    assert get(node.ns, f"http://{web}:{web_port}/get/vm.{a}.internal/{vm_port}") == \
        (200, "hello from unikernel\n")
    # Host ports still work (through the agent's DNAT, containers' and VMs' alike).
    assert get(node.ns, f"http://127.0.0.1:{vm_port}/") == (200, "hello from unikernel\n")

    # Another service: not by address, not by name; its own network works.
    code, body = get(node.ns, f"http://{other}:{other_port}/get/{web}/{web_port}")
    assert code == 502 and "connect" in body, body
    code, body = get(node.ns, f"http://{other}:{other_port}/get/{vm}/{vm_port}")
    assert code == 502 and "connect" in body, body
    code, body = get(node.ns, f"http://{other}:{other_port}/get/web.{a}.internal/{web_port}")
    assert code == 502 and "resolve" in body, body
    # Its own resolver answers its own names (a one-request server cannot fetch itself).
    gateway = other.rsplit(".", 1)[0] + ".1"
    assert lookup(node.ns, gateway, "web") == [other]
    assert lookup(node.ns, gateway, f"web.{b}.internal") == [other]
    assert lookup(node.ns, gateway, f"vm.{a}.internal") == "NXDOMAIN"

    # Its definition lets the other service in: that one's container reaches it by address
    # and by qualified name (its bare names stay its own); not the other way round.
    rc, out = node.mcp("deploy", str(definition(node.tmp, a, hello_image, allow=b)))
    assert rc == 0, out + node.log()
    assert get(node.ns, f"http://{other}:{other_port}/get/{web}/{web_port}") == \
        (200, "hello from container\n")
    assert get(node.ns, f"http://{other}:{other_port}/get/vm.{a}.internal/{vm_port}") == \
        (200, "hello from unikernel\n")
    assert lookup(node.ns, gateway, "web") == [other]
    code, body = get(node.ns, f"http://{web}:{web_port}/get/{other}/{other_port}")
    assert code == 502 and "connect" in body, body

    # A start-first replace of the VM: the new one boots beside the old one at an
    # address of its own, on the same port; its name and host port follow it at the
    # switch, and the old one (its qemu, its TAP, its number) goes after its drain.
    # Through its host port all along: both VMs are on the bridge at once, each with its
    # own MAC (one MAC on two ports would take the old one's traffic away).
    old_vm, old_qemu = vm, qemu_pids_in(node.state)
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answers.append(get(node.ns, f"http://127.0.0.1:{vm_port}/", 3))
            except OSError as exc:
                answers.append((0, str(exc)))
            time.sleep(0.05)

    load = threading.Thread(target=client)
    load.start()
    try:
        rc, out = node.mcp("deploy", str(definition(node.tmp, a, hello_image, allow=b,
                                                    vm_says="unikernel v2",
                                                    order="start-first")))
        assert rc == 0, out + node.log()
    finally:
        stop.set()
        load.join(30)
    assert answers and all(code == 200 for code, _ in answers), \
        [x for x in answers if x[0] != 200]
    assert answers[-1] == (200, "hello from unikernel v2\n"), answers[-3:]
    vm, port = addr_port(node.status(a), "vm")
    assert port == vm_port and vm != old_vm
    assert vm.rsplit(".", 1)[0] == old_vm.rsplit(".", 1)[0]
    assert get(node.ns, f"http://{web}:{web_port}/get/vm/{vm_port}") == \
        (200, "hello from unikernel v2\n")
    assert get(node.ns, f"http://127.0.0.1:{vm_port}/") == (200, "hello from unikernel v2\n")
    wait_for(lambda: len(qemu_pids_in(node.state)) == 1 and
             not set(qemu_pids_in(node.state)) & set(old_qemu), 30, "the old VM to go")
    assert len([n for n in our_links(node.ns) if n.startswith("mcpt")]) == 1
    # The guest took its address by DHCP (its lease by MAC), so its image is the same at
    # either address: pinned to it, a start-first replace (more memory) boots it again.
    pin = comp(node.status(a), "vm")["image_sha256"]
    assert isinstance(pin, str) and len(pin) == 64, pin
    rc, out = node.mcp("deploy", str(definition(
        node.tmp, a, hello_image, allow=b, vm_says="unikernel v2", order="start-first",
        vm_memory=200, vm_pin=pin)))
    assert rc == 0, out + node.log()
    st = node.status(a)
    assert addr_port(st, "vm") == (old_vm, vm_port) and comp(st, "vm")["image_sha256"] == pin
    vm = old_vm
    assert get(node.ns, f"http://{web}:{web_port}/get/vm/{vm_port}") == \
        (200, "hello from unikernel v2\n")

    # SIGKILL: the VM keeps running and answering, also while no agent runs.
    qemu = qemu_pids_in(node.state)
    assert len(qemu) == 1
    node.kill()
    assert get(node.ns, f"http://{web}:{web_port}/get/vm/{vm_port}") == \
        (200, "hello from unikernel v2\n")
    node.start()
    st = node.status(a)
    assert addr_port(st, "vm") == (vm, vm_port) and qemu_pids_in(node.state) == qemu
    assert comp(st, "vm")["restarts"] == 0
    assert get(node.ns, f"http://{vm}:{vm_port}/get/web/{web_port}") == \
        (200, "hello from container\n")

    # What a crashed undeploy of a third service leaves: its links go in the next round.
    for argv in (["link", "add", "mcpbr77", "type", "bridge"],
                 ["tuntap", "add", "dev", "mcpt77x2", "mode", "tap"]):
        subprocess.run(["ip", "netns", "exec", node.ns, "ip", *argv], check=True)
    wait_for(lambda: {"mcpbr77", "mcpt77x2"}.isdisjoint(our_links(node.ns)), 20,
             "the leftover links to go")

    # A podman network removed by hand (its container with it): the next rounds make the
    # network again and reconcile the container on it, at its address, no deploy needed.
    # (Removed is its exit status: the next round may make it again before a listing.)
    assert podman_cli("network", "rm", "-f", f"mcp-{b}").returncode == 0
    wait_for(lambda: f"mcp-{b}" in podman_networks(), 30,
             "the podman network to be made again")
    wait_for(lambda: get(node.ns, f"http://{other}:{other_port}/", 3) ==
             (200, "hello from container\n"), 60, f"{b}/web back at {other}")
    assert addr_port(node.status(b), "web") == (other, other_port)

    # Undeploy: nothing of either network stays.
    for svc in (a, b):
        rc, out = node.mcp("undeploy", svc)
        assert rc == 0, out
    assert our_links(node.ns) == []
    assert not any(x.get("addr_info") for x in ip(node.ns, "addr", "show")
                   if x["ifname"] != "lo")
    assert table(node.ns) is None
    assert resolvers(node.state) == [] and qemu_pids_in(node.state) == []
    nets = podman_networks()
    assert f"mcp-{a}" not in nets and f"mcp-{b}" not in nets
    assert sorted(p.name for p in resolver_dir(node.state).iterdir()) == []
    rc, out = node.mcp("node", "health")
    assert f"network: bridge ({CIDR}, 0 service network(s))" in out, out


ROUNDS = int(os.environ.get("MCP_BRIDGE_CRASH_ROUNDS", "6"))


def converged(node: Node, services: set[str]) -> str:
    """"" when the namespace holds exactly the networks of ``services``, else what not."""
    rc, out = node.mcp("--json", "ps")
    if rc != 0:
        return f"ps: {out}"
    have = {r["service"] for r in json.loads(out)}
    if have != services:
        return f"registry has {sorted(have)}, expected {sorted(services)}"
    links = our_links(node.ns)
    bridges = [n for n in links if n.startswith("mcpbr")]
    if len(bridges) != len(services) or [n for n in links if n.startswith("mcpt")]:
        return f"links {links} for {sorted(services)}"
    running = {p.name.removesuffix(".pid") for p in resolver_dir(node.state).glob("*.pid")}
    if running != services or len(resolvers(node.state)) != len(services):
        return f"resolvers {sorted(running)} / {resolvers(node.state)}"
    sides = [n for n in numbers(node) if "." in n[0]]
    if sides or len(numbers(node)) != len(services):
        return f"host numbers {numbers(node)} for {sorted(services)}"
    sock = node.state / "podman" / "podman.sock"
    names = podman_cli("--url", f"unix://{sock}", "ps", "-a", "--format",
                       "{{.Names}}").stdout.split()
    if [n for n in names if n.endswith((".next", ".old"))]:
        return f"side workloads left: {names}"
    rules = table(node.ns)
    if services and (rules is None or any(b not in rules for b in bridges)):
        return f"rules {rules!r} for {bridges}"
    if not services and rules is not None:
        return "rules left"
    for svc in services:
        # An undeploy the restart resumes may end between the listing above and this.
        rc, out = node.mcp("--json", "status", svc)
        if rc != 0:
            return f"status {svc}: {out}"
        c = comp(json.loads(out), "web")
        if c["state"] != "running":
            return f"{svc}/web {c['state']}"
        code, body = get(node.ns, f"http://{c['address']}:{c['routes'][0]['host_port']}/", 3)
        if code != 200:
            return f"{svc}/web at {c['address']}: {code} {body}"
    return ""


def test_sigkill_during_bridged_deploys_and_undeploys_converges(
        node: Node, hello_image: str) -> None:
    """Each round (seed printed): a deploy, a start-first redeploy or an undeploy of a
    container service in bridge mode, the agent SIGKILLed after a random delay within
    it, started again; the next rounds must leave exactly the networks of the services
    the registry has: one address per component, no side workload left."""
    import random

    services: set[str] = set()
    node.start()
    for rnd in range(ROUNDS):
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        print(f"round {rnd}: seed {seed}")
        pick = rng.random()
        if services and pick < 0.3:
            svc, argv = sorted(services)[0], ["undeploy", sorted(services)[0]]
        elif services and pick < 0.65:   # a start-first replace, cut anywhere
            svc = sorted(services)[-1]
            argv = ["deploy", str(start_first(node.tmp, svc, hello_image, f"r{rnd}"))]
        else:
            svc = f"nbk{uuid.uuid4().hex[:5]}"
            argv = ["deploy", str(definition(node.tmp, svc, hello_image, vm=False))]
        done: list[tuple[int, str]] = []
        t = threading.Thread(target=lambda: done.append(node.mcp(*argv)))
        t.start()
        time.sleep(rng.uniform(0.05, 1.5))
        node.kill()
        t.join(30)
        node.start()
        rc, out = node.mcp("--json", "ps")
        assert rc == 0, out
        services = {r["service"] for r in json.loads(out)}
        # An interrupted deploy may have left its record (reconcile finishes it) or not;
        # an interrupted undeploy finishes on start. Either way: converge to the registry.
        last = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rc, out = node.mcp("--json", "ps")
            services = {r["service"] for r in json.loads(out)} if rc == 0 else services
            last = converged(node, services)
            if not last:
                break
            time.sleep(0.5)
        print(f"round {rnd}: {argv[0]} {svc} -> services {sorted(services)}")
        assert not last, f"round {rnd} (seed {seed}, {argv[0]} {svc}): {last}\n" + node.log()
    for svc in sorted(services):
        rc, out = node.mcp("undeploy", svc)
        assert rc == 0, out
    assert converged(node, set()) == ""


def start_first(tmp: Path, svc: str, image: str, message: str, check: str = "",
                deadline_s: float = 20) -> Path:
    path = tmp / f"{svc}.toml"
    path.write_text(
        f'name = "{svc}"\n[update]\norder = "start-first"\ndrain_s = 1\n'
        f'healthy_deadline_s = {deadline_s}\n\n[[components]]\nname = "web"\n'
        f'image = "{image}"\nenv = ["MESSAGE={message}"]\n{check}'
        '[[components.routes]]\nport = 8080\n')
    return path


def numbers(node: Node) -> list[tuple[str, int]]:
    """The registry's host numbers (what a replace must give back)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(node.state / "registry.db")) as db:
        return sorted(db.execute("SELECT component, host FROM network_hosts").fetchall())


def test_start_first_in_bridge_mode_switches_the_names_without_a_gap(
        node: Node, hello_image: str) -> None:
    """A start-first replace of a container on its service network: the new workload
    runs beside the old one at an address of its own; once it passes its check the
    name follows it, the old one drains and goes, and its number comes back. A client
    that asks the service's resolver for ``web`` before every request never misses."""
    svc = f"nbs{uuid.uuid4().hex[:6]}"
    node.start()
    rc, out = node.mcp("deploy", str(start_first(node.tmp, svc, hello_image, "v1")))
    assert rc == 0, out + node.log()
    first, port = addr_port(node.status(svc), "web")   # it listens on its $PORT
    gateway = first.rsplit(".", 1)[0] + ".1"
    wait_for(lambda: get(node.ns, f"http://{first}:{port}/", 3)[0] == 200, 60, "v1")
    assert numbers(node) == [("web", int(first.rsplit(".", 1)[1]))]

    seen: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            addrs = lookup(node.ns, gateway, "web")
            addr = addrs[0] if isinstance(addrs, list) and len(addrs) == 1 else str(addrs)
            try:
                code, body = get(node.ns, f"http://{addr}:{port}/", 3)
            except OSError as exc:
                code, body = 0, str(exc)
            seen.append((addr, code, body))
            time.sleep(0.05)

    load = threading.Thread(target=client)
    load.start()
    try:
        rc, out = node.mcp("deploy", str(start_first(node.tmp, svc, hello_image, "v2")))
        assert rc == 0, out + node.log()
        wait_for(lambda: sum(b == "hello from v2\n" for _, _, b in seen) >= 5, 30,
                 "answers of v2")
    finally:
        stop.set()
        load.join(30)
    second, now = addr_port(node.status(svc), "web")
    assert now == port   # the same port (peers keep theirs), at the new address
    assert second != first and second.rsplit(".", 1)[0] == first.rsplit(".", 1)[0]
    bodies = [b for _, _, b in seen]
    assert all(code == 200 for _, code, _ in seen), [s for s in seen if s[1] != 200]
    assert set(bodies) == {"hello from v1\n", "hello from v2\n"}, set(bodies)
    switch = bodies.index("hello from v2\n")   # one switch, never back
    assert set(bodies[:switch]) == {"hello from v1\n"} and \
        set(bodies[switch:]) == {"hello from v2\n"}, bodies
    assert {a for a, _, _ in seen[:switch]} == {first} and \
        {a for a, _, _ in seen[switch:]} == {second}, seen
    assert lookup(node.ns, gateway, f"web.{svc}.internal") == [second]
    assert get(node.ns, f"http://127.0.0.1:{port}/") == (200, "hello from v2\n")
    # The old one drained and went: its address answers nothing, its number is back.
    wait_for(lambda: numbers(node) == [("web", int(second.rsplit(".", 1)[1]))], 30,
             f"one number left, not {numbers(node)}")

    def gone() -> bool:
        try:
            get(node.ns, f"http://{first}:{port}/", 1)
        except OSError:
            return True
        return False
    wait_for(gone, 30, f"nothing at {first}")

    # A new workload that never passes its check (the hello server answers 502 when
    # it cannot fetch what /get/ names): the current one keeps serving at its address,
    # and the number the replace took comes back.
    rc, out = node.mcp("deploy", str(start_first(
        node.tmp, svc, hello_image, "v3", 'check = "http:/get/127.0.0.1/1"\n', 3)))
    assert rc != 0 and "did not pass its http:/get/127.0.0.1/1 check within 3s" in out, out
    assert addr_port(node.status(svc), "web")[0] == second
    assert get(node.ns, f"http://{second}:{port}/") == (200, "hello from v2\n")
    assert numbers(node) == [("web", int(second.rsplit(".", 1)[1]))]
    # And the next replace takes the lowest free number again: the first one.
    rc, out = node.mcp("deploy", str(start_first(node.tmp, svc, hello_image, "v4")))
    assert rc == 0, out + node.log()
    assert addr_port(node.status(svc), "web")[0] == first
    assert lookup(node.ns, gateway, "web") == [first]
    assert get(node.ns, f"http://{first}:{port}/") == (200, "hello from v4\n")
    assert get(node.ns, f"http://127.0.0.1:{port}/") == (200, "hello from v4\n")
    rc, out = node.mcp("undeploy", svc)
    assert rc == 0, out
    assert our_links(node.ns) == [] and numbers(node) == []
