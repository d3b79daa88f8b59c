"""logtime: the one spelling of a line's time, and ``--since`` exactly as the OpenAPI
document's pattern admits it (schemathesis found a pattern-less ``since`` refused)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_node.errors import ValidationError
from mcp_node.logtime import (
    SINCE_PATTERN,
    Relined,
    Stamped,
    kept,
    key_at,
    key_of,
    parse_since,
    split_stamp,
)

NOW = 1_800_000_000.0


@given(st.from_regex(SINCE_PATTERN, fullmatch=True))
def test_every_since_the_schema_admits_is_taken(text: str) -> None:
    if text:
        key = parse_since(text, NOW)
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", key), key


@given(st.text(max_size=40).filter(lambda s: not re.fullmatch(SINCE_PATTERN, s)))
def test_every_since_it_refuses_is_a_validation_error_naming_since(text: str) -> None:
    with pytest.raises(ValidationError) as e:
        parse_since(text, NOW)
    assert e.value.field == "since"


@pytest.mark.parametrize("text", ["2026-02-29T00:00:00Z", "2100-02-29T00:00:00Z",
                                  "2026-04-31T00:00:00Z", "2026-01-02T24:00:00Z",
                                  "0000-01-01T00:00:00Z", "2026-01-02T00:00:00+24:00",
                                  " 10m", "10", "1e3s", "١٠m", "yesterday"])
def test_what_is_not_a_time_or_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="neither a duration"):
        parse_since(text, NOW)


def test_durations_count_back_from_now_and_never_before_1970() -> None:
    assert parse_since("1h30m", NOW) == key_at(NOW - 5400)
    assert parse_since("250ms", NOW) == key_at(NOW - 0.25)
    assert parse_since("99999999999d", NOW) == b"1970-01-01T00:00:00.000000000Z"


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
       st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
       st.integers(min_value=0, max_value=999_999_999))
def test_any_offset_becomes_the_same_instant_in_utc(
        t: datetime, offset_min: int, ns: int) -> None:
    zone = timedelta(minutes=offset_min)
    sign = "-" if offset_min < 0 else "+"
    h, m = divmod(abs(offset_min), 60)
    stamp = f"{t.replace(microsecond=0).isoformat()}.{ns:09d}{sign}{h:02d}:{m:02d}".encode()
    key = key_of(stamp)
    utc = (t - zone).replace(tzinfo=UTC)
    assert key == f"{utc.replace(microsecond=0, tzinfo=None).isoformat()}.{ns:09d}Z".encode()


def test_kept_drops_lines_before_since_and_the_stamp_unless_asked() -> None:
    lines = [b"2026-01-01T00:00:0%d.000000000Z line %d\n" % (i, i) for i in range(3)]
    since = b"2026-01-01T00:00:01.000000000Z"
    assert b"".join(Relined(iter([b"".join(lines)]), kept(since, False))) == \
        b"line 1\nline 2\n"
    assert b"".join(Relined(iter([b"".join(lines)[:50], b"".join(lines)[50:]]),
                            kept(None, True))) == b"".join(lines)
    # the byte cap's notice has no stamp: kept, whatever since says
    assert b"".join(Relined(iter([b"[mcp: cut]\n"]), kept(since, False))) == b"[mcp: cut]\n"


def test_a_console_without_times_is_stamped_with_the_run_start_then_as_read() -> None:
    """The snapshot's lines cannot be older than the run; followed ones are read now."""
    chunks = iter([b"boot\nready\n", b"[mcp: cut]\n", b"later\n"])
    snapshot = iter([True, True, False])
    out = list(Stamped(chunks, lambda: next(snapshot), 1_000_000_000.0))
    start = key_at(1_000_000_000.0)
    assert out[:2] == [start + b" boot\n" + start + b" ready\n", b"[mcp: cut]\n"]
    key, text = split_stamp(out[2])
    assert text == b"later\n" and key > start, out
