"""Every skip goes through conftest.lacking (via need or need_module), which fails
instead under MCP_REQUIRE_INTEGRATION=1: no test module skips on its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import lacking

TESTS = Path(__file__).parent
OWN_SKIP = re.compile(r"pytest\.skip\(|importorskip\(|mark\.skip|skipif\(|\.skipTest\(")


def test_no_module_skips_on_its_own() -> None:
    offenders = [f"{p.name}:{n}" for p in sorted(TESTS.glob("*.py")) if p.name != "conftest.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if OWN_SKIP.search(line) and p.name != Path(__file__).name]
    assert offenders == []


def test_lacking_skips_and_fails_when_integration_is_required(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lacking()                                   # nothing missing: nothing happens
    monkeypatch.delenv("MCP_REQUIRE_INTEGRATION", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs a thing"):
        lacking("a thing")
    monkeypatch.setenv("MCP_REQUIRE_INTEGRATION", "1")
    with pytest.raises(pytest.fail.Exception, match="needs a thing, another"):
        lacking("a thing", "another")
