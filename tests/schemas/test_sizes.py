"""hypeman-compatible size strings: datasize parsing and HumanReadable printing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.sizes import (
    EIB,
    GIB,
    KIB,
    MAX_BYTES,
    MIB,
    PIB,
    TIB,
    SizeError,
    format_rate,
    format_size,
    parse_bandwidth,
    parse_rate,
    parse_size,
)

UNITS = {
    "": 1,
    "b": 1,
    "byte": 1,
    "k": KIB,
    "kb": KIB,
    "kib": KIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": TIB,
    "tb": TIB,
    "tib": TIB,
    "p": PIB,
    "pb": PIB,
    "e": EIB,
    "eb": EIB,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1GB", 1073741824),
        ("1gb", GIB),
        ("1G", GIB),
        ("1GiB", GIB),
        ("512MB", 512 * MIB),
        ("3GB", 3 * GIB),
        ("10GB", 10 * GIB),
        ("100", 100),
        ("1 GB", GIB),
        ("1GB ", GIB),
        ("1gB", GIB),
        ("0", 0),
        ("15EB", 15 * EIB),
        ("1 kilobytes", KIB),
    ],
)
def test_parse_size_accepts_datasize_syntax(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1.5GB", "invalid syntax"),
        ("-1GB", "invalid syntax"),
        ("+1GB", "invalid syntax"),
        (" 1GB", "invalid syntax"),
        ("GB", "invalid syntax"),
        ("1XB", "invalid syntax"),
        ("1Gb", "bits, not bytes"),
        ("1Mb", "bits, not bytes"),
        ("16EB", "value out of range"),
        ("18446744073709551616", "value out of range"),
        ("\u0661GB", "invalid syntax"),  # non-ASCII digits are not digits to datasize
    ],
)
def test_parse_size_rejects_with_go_compatible_message(text: str, reason: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert str(info.value).startswith('strconv.UnmarshalText: parsing "')
    assert reason in str(info.value)
    assert info.value.hint


def test_parse_size_rejects_empty_string() -> None:
    with pytest.raises(ValueError, match="empty"):
        parse_size("")


def test_parse_size_max_uint64_is_in_range() -> None:
    assert parse_size(str(MAX_BYTES)) == MAX_BYTES


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (GIB, "1024.0 MB"),
        (3 * GIB, "3.0 GB"),
        (10 * GIB, "10.0 GB"),
        (512 * MIB, "512.0 MB"),
        (250 * MIB, "250.0 MB"),
        (125_000_000, "119.2 MB"),
        (1536 * MIB, "1.5 GB"),
        (0, "0 B"),
        (512, "512 B"),
        (KIB, "1024 B"),
        (KIB + 1, "1.0 KB"),
        (MAX_BYTES, "16.0 EB"),
    ],
)
def test_format_size_matches_humanreadable(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_size(-1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100MB/s", 100 * MIB), ("100MBps", 100 * MIB), ("100MB", 100 * MIB), ("1G/s", GIB)],
)
def test_parse_rate_strips_suffix(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


def test_parse_rate_rejects_other_suffixes() -> None:
    with pytest.raises(SizeError):
        parse_rate("100MB/S")


def test_format_rate() -> None:
    assert format_rate(250 * MIB) == "250.0 MB/s"
    assert format_rate(125_000_000) == "119.2 MB/s"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1Gbps", 125_000_000),
        ("500Mbps", 62_500_000),
        ("100kbps", 12_500),
        ("8bps", 1),
        ("125MB/s", 131_072_000),
        (" 1GB ", GIB),
    ],
)
def test_parse_bandwidth(text: str, expected: int) -> None:
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["1.5Gbps", "-8bps", "bps", "fast", "1.5GB/s"])
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(SizeError):
        parse_bandwidth(text)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_whole_units_round_trip(n: int, unit: str) -> None:
    text = f"{n}{unit}"
    if n * UNITS[unit] > MAX_BYTES:
        with pytest.raises(SizeError, match="out of range"):
            parse_size(text)
        return
    assert parse_size(text) == n * UNITS[unit]
    assert parse_size(text.upper()) == n * UNITS[unit]


@given(st.integers(min_value=2, max_value=1023), st.sampled_from(["KB", "MB", "GB", "TB", "PB"]))
def test_format_then_parse_whole_units(n: int, unit: str) -> None:
    printed = format_size(parse_size(f"{n}{unit}"))
    assert printed == f"{n}.0 {unit}"
    number, label = printed.split(" ")
    assert parse_size(number.removesuffix(".0") + label) == parse_size(f"{n}{unit}")


@given(st.integers(min_value=0, max_value=MAX_BYTES))
def test_format_size_is_well_formed(n: int) -> None:
    number, _, label = format_size(n).partition(" ")
    assert label in {"B", "KB", "MB", "GB", "TB", "PB", "EB"}
    assert float(number) >= 0


@given(st.text())
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (parse_size, parse_rate, parse_bandwidth):
        with contextlib.suppress(ValueError):
            assert parse(text) >= 0
