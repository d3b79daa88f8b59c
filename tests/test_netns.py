"""What a killed test run leaves (a namespace, its veth pair, a server inside) must not
fail the next run on the machine, and what a live run or the host holds is never taken."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
from netns import VethNetns

ADDR, PEER = "100.64.9.1", "100.64.9.2"


def pair() -> VethNetns:
    tag = secrets.token_hex(3)
    return VethNetns(f"mcptest{tag}", f"mct{tag}h", ADDR, PEER)


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def made(netns_owners: Path) -> Iterator[list[VethNetns]]:
    pairs: list[VethNetns] = []
    yield pairs
    for p in pairs:
        p.stop()
    for dev in netns.holders(ADDR):
        subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=20)


def test_what_a_killed_run_left_is_reaped(made: list[VethNetns], netns_owners: Path) -> None:
    old = pair().start()
    inside = subprocess.Popen(["ip", "netns", "exec", old.name, "sleep", "600"])
    # The run that made it is gone (SIGKILLed: no stop ran); its server lives on.
    (netns_owners / old.name).write_text(f"{dead_pid()} {old.name} {old.link}\n")
    new = pair().start()
    made.append(new)
    assert inside.wait(timeout=10) == -9
    assert old.name not in namespaces() and new.name in namespaces()
    assert netns.holders(ADDR) == [new.link]
    assert sorted(p.name for p in netns_owners.iterdir()) == [new.name]


def test_a_pair_without_a_record_is_ours_by_its_name(made: list[VethNetns]) -> None:
    tag = secrets.token_hex(3)
    subprocess.run(["ip", "link", "add", f"mcz{tag}h", "type", "veth", "peer", "name",
                    f"mcz{tag}n"], check=True, timeout=20)
    subprocess.run(["ip", "addr", "add", f"{ADDR}/30", "dev", f"mcz{tag}h"], check=True,
                   timeout=20)
    new = pair().start()
    made.append(new)
    assert netns.holders(ADDR) == [new.link]


def test_a_live_runs_pair_is_not_taken(made: list[VethNetns]) -> None:
    live = pair().start()
    made.append(live)
    with pytest.raises(RuntimeError) as e:
        pair().start()
    assert str(e.value) == (f"{ADDR} is held by {live.link}, made by the live test run pid "
                            f"{os.getpid()} (namespace {live.name})")
    assert netns.holders(ADDR) == [live.link] and live.name in namespaces()


def test_a_host_interface_is_named_and_kept(made: list[VethNetns]) -> None:
    tag = secrets.token_hex(3)
    dev = f"host{tag}a"
    subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", f"host{tag}b"],
                   check=True, timeout=20)
    try:
        subprocess.run(["ip", "addr", "add", f"{ADDR}/30", "dev", dev], check=True, timeout=20)
        before = namespaces()
        with pytest.raises(RuntimeError) as e:
            pair().start()
        assert str(e.value) == (f"{ADDR} is held by {dev}, which no test fixture made; "
                                "these tests need it free")
        assert netns.holders(ADDR) == [dev] and namespaces() == before
    finally:
        subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=20)
