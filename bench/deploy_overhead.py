"""deploy_overhead: `mcp deploy` of one container through the agent vs `podman run -d`
of the same container from the shell (target <= 1.2x), beside a direct podman-py run
(the earlier baseline, target <= 1.3x); and a five-component service vs the slowest
of its components deployed alone (target <= 1.5x: components start in parallel);
and `mcp deploy` vs a minimal click+tomllib client sending the same POST
(common.MINIMAL_CLI, target <= 1.1x), with their start-ups alone (exec to the
request's first byte, common.start_up).

Both sides are measured as a user meets them, from a fresh process until the
container runs: the `mcp` CLI talking to the agent, and a Python process that
imports podman-py and runs the container. The in-process API figure (client
call only) is printed too, to show where the time goes.
Run: .venv/bin/python bench/deploy_overhead.py [ROUNDS]
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from common import BIN, MINIMAL_CLI, bed, hello_image, median, start_up, timed

DIRECT = """
import sys
from podman import PodmanClient
name, image, port, url = sys.argv[1:5]
with PodmanClient(base_url=url) as c:
    ctr = c.containers.create(image, name=name, environment={"PORT": port},
        ports={f"{port}/tcp": ("127.0.0.1", int(port))},
        labels={"mcp.managed": "true", "mcp.owner": sys.argv[5]})
    ctr.start()
"""



def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    image = hello_image()
    with bed() as b:
        client = b.start_agent()
        owner = b.owner
        tmp = b.dir
        from podman import PodmanClient

        pc = PodmanClient(base_url=b.podman.url)
        cli_t, api_t, direct_t, inproc_t, shell_t, minimal_t = [], [], [], [], [], []
        five_t, single_t, floor_t = [], [], []
        up_mcp, up_min = [], []
        for i in range(rounds):
            svc = f"bench{uuid.uuid4().hex[:6]}"
            path = tmp / f"{svc}.toml"
            path.write_text(f'name = "{svc}"\n[[components]]\nname = "web"\n'
                            f'image = "{image}"\n[[components.routes]]\nport = 8080\n')
            shell = f"mcp-shell-{svc}"

            def mcp_side(p: Path = path, svc: str = svc) -> None:
                cli_t.append(timed(lambda: b.mcp("deploy", str(p))))
                b.mcp("undeploy", svc)

            def minimal_side(p: Path = path, svc: str = svc) -> None:
                minimal_t.append(timed(lambda: subprocess.run(
                    [str(BIN / "python"), "-c", MINIMAL_CLI, str(b.port),
                     str(b.state / "token"), str(p)], check=True, capture_output=True)))
                b.mcp("undeploy", svc)

            def shell_side(n: str = shell, p: str = str(22000 + i)) -> None:
                shell_t.append(timed(lambda: subprocess.run(
                    ["podman", "run", "-d", "--name", n, "-e", f"PORT={p}", "-p",
                     f"127.0.0.1:{p}:{p}", "--label", f"mcp.owner={owner}", image],
                    check=True, capture_output=True)))
                subprocess.run(["podman", "rm", "-f", "-t", "0", n], capture_output=True)

            # The three shell-side figures take turns going first: the first after the
            # previous round's removals meets podman still busy with them.
            sides = [mcp_side, minimal_side, shell_side]
            for side in sides[i % 3:] + sides[:i % 3]:
                side()
            m_up, x_up = start_up(b, path, 3)
            up_mcp += m_up
            up_min += x_up

            body = {"name": svc, "components": [{"name": "web", "image": image,
                                                 "routes": [{"port": 8080}]}]}
            api_t.append(timed(lambda body=body: client.post("/v1/services", body)))
            client.delete(f"/v1/services/{svc}")

            name = f"mcp-direct-{svc}"
            port = str(20000 + i)
            direct_t.append(timed(lambda n=name, p=port: subprocess.run(
                [str(BIN / "python"), "-c", DIRECT, n, image, p, b.podman.url, owner],
                check=True)))
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)

            comps = [{"name": f"c{k}", "image": image, "routes": [{"port": 8080}]}
                     for k in range(5)]
            singles = []
            for k, comp in enumerate(comps):
                one = {"name": f"{svc}-one{k}", "components": [comp]}
                singles.append(timed(lambda one=one: client.post("/v1/services", one)))
                client.delete(f"/v1/services/{one['name']}")
            single_t.append(max(singles))
            # The floor: five containers created and started in parallel by hand.
            import threading

            def by_hand(k: int, tag: str = svc) -> None:
                ctr = pc.containers.create(image, name=f"mcp-floor-{tag}-{k}",
                                           environment={"PORT": str(24000 + k)},
                                           ports={f"{24000 + k}/tcp": ("127.0.0.1", 24000 + k)},
                                           labels={"mcp.managed": "true", "mcp.owner": owner})
                ctr.start()

            ths = [threading.Thread(target=by_hand, args=(k,)) for k in range(5)]
            floor_t.append(timed(lambda: ([t.start() for t in ths], [t.join() for t in ths])))
            for k in range(5):
                subprocess.run(["podman", "rm", "-f", "-t", "0", f"mcp-floor-{svc}-{k}"],
                               capture_output=True)
            five = {"name": f"{svc}-five", "components": comps}
            five_t.append(timed(lambda five=five: client.post("/v1/services", five)))
            client.delete(f"/v1/services/{five['name']}")

            def inproc(n: str = name + "-i", p: int = 21000 + i) -> None:
                ctr = pc.containers.create(image, name=n, environment={"PORT": str(p)},
                                           ports={f"{p}/tcp": ("127.0.0.1", p)},
                                           labels={"mcp.managed": "true", "mcp.owner": owner})
                ctr.start()
            inproc_t.append(timed(inproc))
            subprocess.run(["podman", "rm", "-f", "-t", "0", name + "-i"], capture_output=True)
    cli, api, direct = median(cli_t), median(api_t), median(direct_t)
    inp = median(inproc_t)
    shell, five, single = median(shell_t), median(five_t), median(single_t)
    print(f"deploy_overhead rounds={rounds}")
    print(f"  podman run -d (shell):                {shell * 1000:8.1f} ms")
    print(f"  direct podman-py run (fresh process): {direct * 1000:8.1f} ms")
    print(f"  mcp deploy via agent (fresh process): {cli * 1000:8.1f} ms")
    print(f"  POST /v1/services (client in-process): {api * 1000:8.1f} ms")
    print(f"  direct podman-py run (in-process):    {inp * 1000:8.1f} ms")
    print(f"  minimal Python CLI (click+tomllib, one POST): {median(minimal_t) * 1000:6.1f} ms")
    print(f"  ratio mcp deploy / podman run -d = {cli / shell:.2f}x (target <= 1.2x)")
    print(f"  ratio minimal Python CLI / podman run -d = {median(minimal_t) / shell:.2f}x "
          "(the floor for a click CLI through this agent)")
    print(f"  ratio mcp deploy / direct podman-py = {cli / direct:.2f}x (target <= 1.3x)")
    print(f"  ratio mcp deploy / minimal Python CLI = {cli / median(minimal_t):.2f}x "
          "(target <= 1.1x)")
    m_up, x_up = median(up_mcp), median(up_min)
    print(f"  start-up, exec to the request's first byte ({len(up_mcp)} each): mcp --json "
          f"deploy {m_up * 1000:.1f} ms, minimal {x_up * 1000:.1f} ms = {m_up / x_up:.2f}x")
    floor = median(floor_t)
    print(f"  five components {five * 1000:.1f} ms vs slowest single {single * 1000:.1f} ms: "
          f"{five / single:.2f}x (target <= 1.5x)")
    print(f"  five podman-py creates+starts (with their ports) in parallel by hand: "
          f"{floor * 1000:.1f} ms = "
          f"{floor / single:.2f}x the single deploy (podman's own floor); agent / floor = "
          f"{five / floor:.2f}x")
    print(f"  ratio POST /v1/services / in-process podman-py = {api / inp:.2f}x")


if __name__ == "__main__":
    main()
