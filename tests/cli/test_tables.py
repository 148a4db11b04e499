"""The plain-text formatting of the client commands: tables, ages, sizes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cli.tables import age, human_bytes, parse_time, render_table, short_id

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def test_table_aligns_columns_without_trailing_blanks() -> None:
    table = render_table(("ID", "NAME", "STATE"), [("abc", "web", "Running"), ("d", "", "x")])
    assert table.splitlines() == [
        "ID   NAME  STATE",
        "abc  web   Running",
        "d          x",
    ]


def test_empty_table_is_its_header() -> None:
    assert render_table(("ID", "NAME"), []) == "ID  NAME"


@pytest.mark.parametrize(
    ("delta", "shown"),
    [
        (timedelta(seconds=0), "0s"),
        (timedelta(seconds=59), "59s"),
        (timedelta(seconds=60), "1m"),
        (timedelta(minutes=59, seconds=59), "59m"),
        (timedelta(hours=1), "1h"),
        (timedelta(hours=23, minutes=59), "23h"),
        (timedelta(hours=47), "1d"),
        (timedelta(days=2, hours=5), "2d"),
        (timedelta(seconds=-3), "0s"),  # a clock a little ahead of ours
    ],
)
def test_age_in_the_largest_whole_unit(delta: timedelta, shown: str) -> None:
    assert age(NOW - delta, NOW) == shown


def test_age_of_a_wire_timestamp() -> None:
    assert age("2026-12-01T11:55:00.123456789Z", NOW) == "4m"
    assert age("2026-12-01T13:00:00+02:00", NOW) == "1h"
    assert age(None, NOW) == "-"


def test_parse_time_cuts_nanoseconds() -> None:
    assert parse_time("2025-01-15T10:30:00.123456789Z") == datetime(
        2025, 1, 15, 10, 30, 0, 123456, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0B"),
        (512, "512B"),
        (256 << 20, "256MB"),
        (1 << 30, "1GB"),
        (3 << 29, "1.5GB"),
        (24 << 30, "24GB"),
        (None, "-"),
    ],
)
def test_human_bytes(n: int | None, shown: str) -> None:
    assert human_bytes(n) == shown


def test_short_id_is_a_prefix() -> None:
    assert short_id("k3j2h1g0f9e8d7c6b5a4z3y2") == "k3j2h1g0f9e8"
