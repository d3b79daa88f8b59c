"""Issue 22 row 15: `mcp status <TAB>` and `mcp deploy sv<TAB>` complete service names
(from the agent's ps), component names, and definitions of the services dir beside
files; with no agent answering, nothing and no error. Click's bash protocol, exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from live_server import LiveServer, fake_live

from mcp_node.cli import cli
from mcp_node.servicedef import from_dict


def complete(words: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """What bash gets for ``words`` (the last one being completed, maybe empty)."""
    cword = len(words.split(" ")) - 1
    r = CliRunner().invoke(cli, [], prog_name="mcp", env={
        "_MCP_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword),
        **(env or {})})
    return r.exit_code, r.output


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    with fake_live(tmp_path) as live:
        for name, comps in (("duo", ("web", "db")), ("shop", ("api",))):
            live.agent.deploy(from_dict({"name": name, "components": [
                {"name": c, "image": "img:v1"} for c in comps]}))
        tok = tmp_path / "tok"
        tok.write_text(live.token("reader"))
        tok.chmod(0o600)
        yield live


def test_service_and_component_names_complete(live: LiveServer, tmp_path: Path) -> None:
    at = f"mcp --agent {live.url} --token-file {tmp_path / 'tok'}"
    assert complete(f"{at} status ") == (0, "plain,duo\nplain,shop\n")
    assert complete(f"{at} status s") == (0, "plain,shop\n")
    assert complete(f"{at} logs duo ") == (0, "plain,db\nplain,web\n")
    assert complete(f"{at} stop duo w") == (0, "plain,web\n")
    assert complete(f"{at} restart shop ") == (0, "plain,api\n")
    assert complete(f"{at} history d") == (0, "plain,duo\n")
    assert complete(f"{at} undeploy ") == (0, "plain,duo\nplain,shop\n")


def test_deploy_completes_the_services_dir_and_files(live: LiveServer, tmp_path: Path) -> None:
    sdir = tmp_path / "services"
    sdir.mkdir()
    for n in ("svc-a", "svc-b", "other"):
        (sdir / f"{n}.toml").write_text(f'name = "{n}"\n')
    conf = tmp_path / "mcp.toml"
    conf.write_text(f'services_dir = "{sdir}"\n')
    env = {"MCP_CLI_CONFIG": str(conf)}
    assert complete("mcp deploy sv", env) == (0, "plain,svc-a\nplain,svc-b\nfile,sv\n")
    assert complete("mcp plan o", env) == (0, "plain,other\nfile,o\n")
    assert complete("mcp validate ex", env) == (0, "file,ex\n")   # a file, never a name


def test_no_agent_answering_completes_nothing_and_says_nothing(tmp_path: Path) -> None:
    # (click's bash protocol prints one empty line for no items)
    assert complete("mcp --agent http://127.0.0.1:9 status ") == (0, "\n")
    assert complete("mcp --agent http://127.0.0.1:9 logs duo ") == (0, "\n")
