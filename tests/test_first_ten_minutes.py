"""The README's "first ten minutes" (issue 22), run as written: each command of that
block, in its order, against a real agent process on real podman, must exit with the
status the block gives and print the text it quotes (NODE, PORT, <time> and ... stand
for what varies). A README that drifts from the tool, or a tool that drifts from it,
fails here."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from daemon_env import daemon_on

from mcp_node.agent_cli import main as agent_main
from mcp_node.cli import cli

TOP = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<cmd>mcp(?:-agent)? [^#]+?)\s+# rc (?P<rc>\d)(?::\s*(?P<say>.*))?$")


def walkthrough() -> list[tuple[list[str], int, str]]:
    text = (TOP / "README.md").read_text()
    start = text.index("### The first ten minutes")
    block = text[text.index("```sh\n", start) + 6:]
    block = block[:block.index("```")]
    steps = []
    for line in block.splitlines():
        m = LINE.match(line.strip())
        assert m, f"README first-ten-minutes line not in the form 'cmd  # rc N: ...': {line!r}"
        quoted = re.match(r'"(.*?)"', m["say"] or "")   # the first quoted text, if first
        steps.append((shlex.split(m["cmd"]), int(m["rc"]), quoted[1] if quoted else ""))
    assert len(steps) >= 10
    return steps


def pattern(said: str, node: str) -> re.Pattern[str]:
    rx = re.escape(said)
    for word, sub in (("NODE", re.escape(node)), ("PORT", r"\d+"), ("<time>", r"\S+"),
                      (re.escape("..."), ".*")):
        rx = rx.replace(word, sub)
    return re.compile(rx)


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path, hello_image: str,
                                                podman_socket: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert hello_image == "localhost/mcp-hello:v1"   # what examples/hello.toml names
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[state]\ndir = "{state}"\n[podman]\nsocket = "{podman_socket}"\n'
                    '[monitor]\ninterval_s = 0.3\n')
    work = tmp_path / "work"
    (work / "examples").mkdir(parents=True)
    shutil.copy(TOP / "examples" / "hello.toml", work / "examples" / "hello.toml")
    monkeypatch.chdir(work)
    node = socket.gethostname()
    with daemon_on(state, conf) as d:
        d.start()
        monkeypatch.setenv("MCP_AGENT_CONFIG", str(conf))
        monkeypatch.setenv("MCP_AGENT", d.url)
        monkeypatch.setenv("MCP_TOKEN_FILE", str(state / "token"))
        try:
            for argv, rc, said in walkthrough():
                entry = agent_main if argv[0] == "mcp-agent" else cli
                r = CliRunner().invoke(entry, argv[1:], catch_exceptions=False)
                shown = r.stdout + r.stderr
                assert r.exit_code == rc, f"{shlex.join(argv)}: rc {r.exit_code}\n{shown}"
                if said:
                    assert pattern(said, node).search(shown), \
                        f"{shlex.join(argv)}: no {said!r} in\n{shown}"
        finally:
            CliRunner().invoke(cli, ["undeploy", "hello"])
