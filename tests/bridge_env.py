"""An agent process in a network namespace, and calls from inside it (issue 23's tests
and bench/vm_net.py). ``ip netns exec`` remounts /sys, which takes podman's cgroup mounts
away, so the agent starts under ``nsenter --net``; the test's own HTTP, DNS and CLI calls
run on a thread that joined the namespace (setns moves only the calling thread)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from daemon_env import Daemon, free_port
from egress import no_egress_env
from netns import in_netns
from podman_env import containers_conf

from mcp_node.cli import cli
from mcp_node.netplan import resolver_dir

CIDR = "10.213.0.0/16"


def get(ns: str, url: str, timeout: float = 10) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    urllib.request.install_opener(opener)
    return in_netns(ns, fetch)


def lookup(ns: str, server: str, name: str) -> list[str] | str:
    """An A query to ``server`` from inside ``ns`` (dnspython)."""
    import dns.resolver

    def ask() -> list[str] | str:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.lifetime = [server], 5
        try:
            return sorted(a.address for a in r.resolve(name, "A"))
        except dns.resolver.NXDOMAIN:
            return "NXDOMAIN"
    return in_netns(ns, ask)


def ip(ns: str, *args: str) -> Any:
    p = subprocess.run(["ip", "netns", "exec", ns, "ip", "-j", *args], capture_output=True,
                       text=True, timeout=20, check=True)
    return json.loads(p.stdout or "[]")


def our_links(ns: str) -> list[str]:
    return sorted(d["ifname"] for d in ip(ns, "link", "show")
                  if d["ifname"].startswith(("mcpbr", "mcpt")))


def table(ns: str) -> str | None:
    p = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet",
                        "mcp_node"], capture_output=True, text=True, timeout=20)
    return p.stdout if p.returncode == 0 else None


def processes(*marks: bytes) -> list[int]:
    """Live processes whose command line holds every one of ``marks``."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and proc.name != str(os.getpid()):
                argv = (proc / "cmdline").read_bytes()
                if all(m in argv for m in marks):
                    pids.append(int(proc.name))
    return pids


def resolvers(state: Path) -> list[int]:
    """Live dnsmasqs of the agent on ``state`` (by their files' directory)."""
    return processes(str(resolver_dir(state)).encode(), b"dnsmasq")


class Node(Daemon):
    """An agent process in ``ns`` on ``state``; the CLI and HTTP calls go there too."""

    def __init__(self, ns: str, tmp: Path, nanos: Path, mode: str = "bridge") -> None:
        self.ns, self.tmp = ns, tmp
        state = tmp / "state"
        state.mkdir(mode=0o700, parents=True)
        conf = tmp / "agent.toml"
        conf.write_text(
            f'[podman]\ncontainers_conf = "{containers_conf()}"\n'
            f'[qemu]\nnanos_dir = "{nanos}"\n'
            'accel = "tcg"\n[monitor]\ninterval_s = 0.3\n'
            f'[network]\nmode = "{mode}"\ncidr = "{CIDR}"\n')
        super().__init__(state, conf, free_port())

    def start(self) -> None:  # type: ignore[override]  # its calls go through in_netns
        with open(self.tmp / "agent.log", "ab") as logf:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.ns}",
                 str(Path(sys.executable).parent / "mcp-agent"), "--config", str(self.config),
                 "--state-dir", str(self.state), "--listen", f"127.0.0.1:{self.port}"],
                env=no_egress_env(), stdout=subprocess.DEVNULL, stderr=logf)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log()
            if (self.state / "token").exists():
                with contextlib.suppress(OSError):
                    if get(self.ns, f"{self.url}/v1/health", 2)[0] in (200, 401):
                        return
            assert time.monotonic() < deadline, "agent did not come up\n" + self.log()
            time.sleep(0.2)

    def clean_up(self, network_prefix: str) -> None:
        """What the agent leaves running by design (so an agent restart adopts it): its
        VMs, resolvers, podman service and containers, and the podman networks named
        ``network_prefix``*; then the namespace."""
        from podman_env import podman_cli
        from qemu_env import qemu_pids_in

        self.stop()
        if (self.state / "node_id").exists():   # removed through the namespace's podman,
            owner = (self.state / "node_id").read_text().strip()   # so CNI tears down there
            sock = self.state / "podman" / "podman.sock"
            url = ["--url", f"unix://{sock}"] if sock.exists() else []
            ids = podman_cli(*url, "ps", "-aq", "--filter",
                             f"label=mcp.owner={owner}").stdout.split()
            if ids:
                podman_cli(*url, "rm", "-f", "-t", "0", *ids)
        for pid in qemu_pids_in(self.state) + resolvers(self.state) + processes(
                b"podman", str(self.state / "podman").encode()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in podman_cli("network", "ls", "--format", "{{.Name}}").stdout.split():
            if name.startswith(network_prefix):
                podman_cli("network", "rm", "-f", name)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(resolver_dir(self.state), ignore_errors=True)

    def mcp(self, *args: str) -> tuple[int, str]:
        def invoke() -> tuple[int, str]:
            r = CliRunner().invoke(cli, ["--agent", self.url, "--token-file",
                                         str(self.state / "token"), *args],
                                   catch_exceptions=False)
            return r.exit_code, r.output
        return in_netns(self.ns, invoke, timeout=180)

    def status(self, svc: str) -> dict[str, Any]:
        rc, out = self.mcp("--json", "status", svc)
        assert rc == 0, out
        st: dict[str, Any] = json.loads(out)
        return st


