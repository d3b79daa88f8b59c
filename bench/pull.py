"""pull: a deploy from a private registry (TLS from the bench's own CA, an htpasswd
login; issue 20) against the same pull and run by hand, same run.

Usage: .venv/bin/python bench/pull.py [ROUNDS]   (default 5)

The registry is Debian's ``docker-registry`` on 127.0.0.1 (tests/registry_env.py). An
image of the bench's own (the test workload plus a random file, so no other image shares
its layers) is pushed there and removed from the node before every timed step, so each
one downloads it:

- agent: ``mcp deploy`` (a fresh process) of one container with ``pull = "always"``,
  through an agent running its own podman service with ``[registries."127.0.0.1:PORT"]``
  (``username``, ``password_file``, ``ca_file``), until the deploy returns (the container
  started);
- by hand: ``podman pull --cert-dir DIR --authfile FILE REF`` + ``podman run -d`` of it.

Sides take turns going first; the figure is the ratio of medians (goal <= 1.2x).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from common import BIN, TOP, hello_image, median, timed

sys.path.insert(0, str(TOP / "tests"))
from daemon_env import Daemon, free_port  # noqa: E402
from egress import no_egress_env  # noqa: E402
from registry_env import USER, Registry  # noqa: E402

ENV = no_egress_env({**os.environ, "CONTAINERS_CONF": str(TOP / "scripts" / "containers.conf")})


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True,
                          check=check, timeout=300)


def own_image(base: str, workdir: Path) -> str:
    """``base``'s files plus a random one: an image (and a layer) of the bench's alone."""
    ref = f"localhost/mcp-bench-pull-{uuid.uuid4().hex[:8]}:v1"
    (workdir / "Containerfile").write_text(
        f"FROM {base}\nCOPY noise /noise\n")
    (workdir / "noise").write_bytes(secrets.token_bytes(1 << 20))
    podman("build", "--pull=never", "-q", "-t", ref, str(workdir))
    return ref


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    work = Path(tempfile.mkdtemp(prefix="mcp-bench-pull-"))
    reg = Registry(work / "registry").start()
    agent: Daemon | None = None
    local = own_image(hello_image(), work)
    ref = ""
    try:
        ref = reg.push(local, "bench/pull:v1")
        podman("rmi", local)   # the registry's name alone is left
        password = work / "password"
        password.write_text(reg.password + "\n")
        password.chmod(0o600)
        conf = work / "agent.toml"
        conf.write_text(
            f'[podman]\ncontainers_conf = "{ENV["CONTAINERS_CONF"]}"\n'
            f"[monitor]\ninterval_s = 5\n"
            f'[registries."{reg.host}"]\nusername = "{USER}"\npassword_file = "{password}"\n'
            f'ca_file = "{reg.ca_file}"\n')
        state = work / "state"
        state.mkdir(mode=0o700)
        agent = Daemon(state, conf, free_port(), ("--log-level", "warning"))
        agent.start()
        env = {**ENV, "MCP_AGENT": agent.url, "MCP_TOKEN_FILE": str(state / "token"),
               "XDG_CONFIG_HOME": str(work / "cfg")}
        defn = work / "svc.toml"
        defn.write_text(f'name = "pullbench"\n[[components]]\nname = "web"\nimage = "{ref}"\n'
                        'pull = "always"\n[[components.routes]]\nport = 8080\n')

        def gone() -> None:
            podman("rmi", ref, check=False)
            assert podman("image", "exists", ref, check=False).returncode != 0, ref

        def agent_side() -> None:
            subprocess.run([str(BIN / "mcp"), "deploy", str(defn)], env=env, check=True,
                           capture_output=True)

        def agent_undo() -> None:
            subprocess.run([str(BIN / "mcp"), "undeploy", "pullbench"], env=env, check=True,
                           capture_output=True)

        def hand_side() -> None:
            podman("pull", "-q", "--cert-dir", str(reg.cert_dir / reg.host), "--authfile",
                   str(reg.auth_file), ref)
            podman("run", "-d", "--name", "mcp-bench-pull-hand", "-p",
                   f"127.0.0.1:{free_port()}:8080", ref)

        def hand_undo() -> None:
            podman("rm", "-f", "-t", "0", "mcp-bench-pull-hand")

        agent_t: list[float] = []
        hand_t: list[float] = []
        agent_side()   # warm-up: the agent's first pull starts its podman service
        agent_undo()
        sides = [(agent_t, agent_side, agent_undo), (hand_t, hand_side, hand_undo)]
        for i in range(rounds):
            for times, run, undo in sides[i % 2:] + sides[:i % 2]:
                gone()
                times.append(timed(run))
                undo()
        a, h = median(agent_t), median(hand_t)
        print(f"pull: {rounds} rounds, each downloading {ref} (1 MiB layer of its own)")
        print(f"  mcp deploy (pull = always, own podman service): {a * 1000:8.1f} ms "
              f"(all: {', '.join(f'{t * 1000:.0f}' for t in agent_t)})")
        print(f"  podman pull + podman run -d by hand:           {h * 1000:8.1f} ms "
              f"(all: {', '.join(f'{t * 1000:.0f}' for t in hand_t)})")
        print(f"  ratio mcp deploy / by hand = {a / h:.2f}x (goal <= 1.2x)")
    finally:
        if agent is not None:
            agent.stop()
            agent.remove_containers()
        podman("rm", "-f", "-t", "0", "mcp-bench-pull-hand", check=False)
        if ref:
            podman("rmi", ref, check=False)
        podman("rmi", local, check=False)
        reg.stop()


if __name__ == "__main__":
    main()
