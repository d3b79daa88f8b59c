"""logtail: a log's end read in bounded steps, on real files. Each answer is compared with
a reference that reads the whole file (random logs, chunks made tiny so every boundary
case is met), and follow is driven by appending, rotating and closing."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from mcp_node import logtail
from mcp_node.logtail import LogTail, keep_last, notice


def ref_plain(data: bytes, tail: int | None, cap: int) -> bytes:
    lines = data.split(b"\n")
    pieces = [x + b"\n" for x in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    if tail is not None:
        pieces = pieces[len(pieces) - tail:] if tail else []
    out = b"".join(pieces)
    budget = cap - len(notice(cap))
    if len(out) > budget:
        out = notice(cap) + out[len(out) - budget:]
    return out.replace(b"\r\n", b"\n")


def ref_k8s(entries: list[tuple[bytes, bool]], tail: int | None, cap: int) -> bytes:
    """entries: complete ones only; (text, ends the line)."""
    line_of, n = [], 0          # a line is P entries then an F one, or P entries at the end
    for _, full in entries:
        line_of.append(n)
        n += full
    total = n + (1 if entries and not entries[-1][1] else 0)
    keep = [e for e, ln in zip(entries, line_of, strict=True)
            if tail is None or ln >= total - tail]
    texts = [t + (b"\n" if full else b"") for t, full in keep]
    budget = cap - len(notice(cap))
    cut = False
    while sum(map(len, texts)) > budget:
        texts.pop(0)
        cut = True
    return (notice(cap) if cut else b"") + b"".join(texts)


def k8s_line(text: bytes, full: bool, stream: bytes = b"stdout") -> bytes:
    return b"2026-12-01T23:18:09.287128788+00:00 " + stream + (b" F " if full else b" P ") \
        + text + b"\n"


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logtail, "CHUNK", 7)


def read(paths: list[Path], fmt: logtail.Format, tail: int | None, cap: int) -> bytes:
    return b"".join(LogTail(paths, fmt, tail, cap))


@pytest.mark.parametrize("seed", range(40))
def test_plain_matches_the_whole_file_reading(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    data = bytes(rnd.choice(b"ab\r\n\n") for _ in range(rnd.randrange(0, 300)))
    rotated = bytes(rnd.choice(b"xy\n") for _ in range(rnd.randrange(0, 60)))
    (tmp_path / "c.log.1").write_bytes(rotated)
    (tmp_path / "c.log").write_bytes(data)
    paths = [tmp_path / "c.log.1", tmp_path / "c.log"]
    for tail in (None, 0, 1, 2, 5, 1000):
        for cap in (len(notice(10**9)) + 3, 150, 10**9):
            assert read(paths, "plain", tail, cap) == ref_plain(rotated + data, tail, cap), \
                (tail, cap)


@pytest.mark.parametrize("seed", range(40))
def test_k8s_matches_the_whole_file_reading(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    entries = [(bytes(rnd.choice(b"abc ") for _ in range(rnd.randrange(0, 12))),
                rnd.random() < 0.6) for _ in range(rnd.randrange(0, 40))]
    raw = b"".join(k8s_line(t, f, rnd.choice((b"stdout", b"stderr"))) for t, f in entries)
    if rnd.random() < 0.5:
        raw += b"2026-12-01T23:18:09.3+00:00 stdout F being writ"   # no newline yet: left out
    path = tmp_path / "ctr.log"
    path.write_bytes(raw)
    for tail in (None, 0, 1, 2, 5, 1000):
        for cap in (len(notice(10**9)) + 9, 120, 10**9):
            assert read([path], "k8s", tail, cap) == ref_k8s(entries, tail, cap), (tail, cap)


def test_a_cut_answer_says_so_and_holds_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"".join(b"line %06d\n" % i for i in range(100_000)))   # 1.2 MB
    out = read([path], "plain", None, 4096)
    assert len(out) <= 4096 and out.startswith(notice(4096))
    assert out.endswith(b"line 099999\n")
    assert read([path], "plain", 3, 4096) == b"line 099997\nline 099998\nline 099999\n"


def test_follow_reads_what_comes_and_ends_when_the_writer_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    path.write_bytes(k8s_line(b"old", True) + k8s_line(b"half", False)[:20])
    alive = threading.Event()
    alive.set()
    it = LogTail([path], "k8s", 1, 1 << 20, follow=True, alive=alive.is_set)
    assert next(it) == b"old\n"
    with path.open("ab") as f:       # the half-written entry completes, a new one follows
        f.write(k8s_line(b"half", False)[20:] + k8s_line(b" done", True))
    got = b""
    while got != b"half done\n":
        got += next(it)
    with path.open("ab") as f:
        f.write(k8s_line(b"last words", True))
    alive.clear()
    assert b"".join(it) == b"last words\n"


def test_follow_goes_on_while_the_writer_cannot_be_asked_for_a_while(tmp_path: Path) -> None:
    """podman busy for a moment (alive() None) does not end a follow; unknown for longer
    than the limit does, and False at once does."""
    path = tmp_path / "ctr.log"
    path.write_bytes(b"")
    answers = iter([None, None, True, None])
    it = LogTail([path], "plain", 0, 1 << 20, follow=True,
                 alive=lambda: next(answers, None), alive_every_s=0.0, unknown_limit_s=1.0)
    reader = threading.Thread(target=lambda: got.extend(it), daemon=True)
    got: list[bytes] = []
    reader.start()
    reader.join(timeout=0.8)
    assert reader.is_alive()              # still following after two unknowns and a True
    with path.open("ab") as f:
        f.write(b"more\n")
    reader.join(timeout=10)
    assert not reader.is_alive() and b"".join(got) == b"more\n"   # then 1 s unknown: ended
    gone = LogTail([path], "plain", 0, 1 << 20, follow=True, alive=lambda: False,
                   alive_every_s=0.0, unknown_limit_s=60.0)
    assert list(gone) == []


def test_follow_after_a_rotation_and_closed_from_another_thread(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"one\r\n")
    it = LogTail([tmp_path / "c.log.1", path], "plain", None, 1 << 20, follow=True,
                 alive=lambda: True)
    assert next(it) == b"one\n"
    path.write_bytes(b"")            # truncated in place, as console_rotate does
    path.write_bytes(b"two\r")
    got = next(it)
    with path.open("ab") as f:
        f.write(b"\n")
    got += next(it)
    assert got == b"two\n"
    rest: list[bytes] = []
    reader = threading.Thread(target=lambda: rest.extend(it), daemon=True)
    reader.start()
    it.close()                       # the reader waits for lines that never come
    reader.join(timeout=10)
    assert not reader.is_alive() and rest == []


def test_keep_last_holds_only_the_cap() -> None:
    chunks = iter([b"x" * 1000] * 50 + [b"end\n"])
    out = b"".join(keep_last(chunks, 500))
    assert out.startswith(notice(500)) and out.endswith(b"end\n") and len(out) == 500
    assert b"".join(keep_last(iter([b"small\n"]), 500)) == b"small\n"


def test_max_log_bytes_is_a_checked_live_key(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mcp_node.agent_cli import main
    from mcp_node.config import from_dict
    from mcp_node.daemon import is_live

    conf = tmp_path / "agent.toml"
    for bad in ("10", "2e30", '"4M"'):
        conf.write_text(f"[server]\nmax_log_bytes = {bad}\n")
        res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
        assert res.exit_code == 1 and ": server.max_log_bytes: " in res.stderr, res.output
    conf.write_text("[server]\nmax_log_bytes = 65536\n")
    assert CliRunner().invoke(main, ["--config", str(conf), "check-config"]).exit_code == 0
    assert from_dict({}).server.max_log_bytes == 4 << 20
    assert is_live("server.max_log_bytes")
