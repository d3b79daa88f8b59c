"""clifollow.logs decides what an ended log stream means from the component's status:
driven here with a client that answers as the agent would, in each order that occurs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mcp_node import clifollow
from mcp_node.errors import AgentUnreachable


class DummyClient:
    """Streams and statuses handed out in order; the last status repeats. A status is
    (state, desired state, the run's start in seconds after the dummy was made)."""

    base_url = "http://127.0.0.1:1"

    def __init__(self, streams: list[list[bytes] | Exception],
                 statuses: list[tuple[str, str, int] | Exception]) -> None:
        self.streams, self.statuses, self.opened = streams, statuses, 0
        self.t0 = time.time()

    def stream(self, path: str) -> Iterator[bytes]:
        assert "follow=1" in path
        self.opened += 1
        item = self.streams.pop(0)
        return self._raise_after(item) if isinstance(item, list) else self._raise_after(
            [], item)

    @staticmethod
    def _raise_after(chunks: list[bytes], exc: Exception | None = None) -> Iterator[bytes]:
        yield from chunks
        if exc is not None:
            raise exc

    def get(self, path: str) -> dict[str, Any]:
        item = self.statuses[0] if len(self.statuses) == 1 else self.statuses.pop(0)
        if isinstance(item, Exception):
            raise item
        state, desired, started = item
        uptime = time.time() - (self.t0 + started) if state == "running" else 0
        return {"components": [{"component": "web", "state": state, "desired_state": desired,
                                "uptime_s": uptime}]}


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    notes: list[str] = []
    monkeypatch.setattr(clifollow, "POLL_S", 0.01)
    monkeypatch.setattr(clifollow, "SAME_RUN_S", 0.2)
    monkeypatch.setattr(clifollow, "RECONNECT_S", 2.0)
    monkeypatch.setattr(clifollow, "note", notes.append)
    return notes


def follow(client: DummyClient) -> bytes:
    return b"".join(clifollow.logs(client, "svc", None, None))  # type: ignore[arg-type]


def test_stopped_for_good_ends_saying_so(quick: list[str]) -> None:
    c = DummyClient([[b"a\n"]], [("running", "running", 0), ("exited", "stopped", 0)])
    assert follow(c) == b"a\n" and c.opened == 1
    assert quick == ["svc is exited (desired stopped): its output ended"]


def test_a_new_run_is_followed(quick: list[str]) -> None:
    c = DummyClient([[b"a\n"], [b"b\n"]],
                    [("running", "running", 0), ("running", "running", 0),
                     ("running", "running", 30), ("exited", "stopped", 0)])
    assert follow(c) == b"a\nb\n" and c.opened == 2
    assert quick[0] == "the component was replaced or restarted; following its new run"


def test_a_stream_ended_while_the_same_run_goes_on_is_opened_again(quick: list[str]) -> None:
    """The same run keeps running after its stream ended: after SAME_RUN_S it is opened
    again (the run stops for good only once the second stream is open)."""
    c = DummyClient([[b"a\n"], [b"b\n"]], [])
    real = c.get

    def get(path: str) -> dict[str, Any]:
        c.statuses = [("running", "running", 0)] if c.opened < 2 else [
            ("exited", "stopped", 0)]
        return real(path)

    c.get = get  # type: ignore[method-assign]
    assert follow(c) == b"a\nb\n" and c.opened == 2
    assert quick[0] == ("the stream ended while the same run goes on; "
                        "following from the next line")


def test_an_agent_that_went_away_is_reconnected(quick: list[str]) -> None:
    c = DummyClient([AgentUnreachable("connection reset"), [b"b\n"]],
                    [("running", "running", 0), ("exited", "stopped", 0)])
    assert follow(c) == b"b\n" and c.opened == 2
    assert "broke off (connection reset" in quick[0]
    assert quick[1] == "reconnected; following from the next line"


def test_no_new_run_within_the_limit_ends_saying_so(quick: list[str]) -> None:
    c = DummyClient([[b"a\n"]], [("running", "running", 0), ("exited", "running", 0)])
    assert follow(c) == b"a\n"
    assert quick == ["its output ended and no new run began within 2 s (it is exited)"]
