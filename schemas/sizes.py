"""Byte sizes and rates, parsed and printed exactly as hypeman does.

hypeman parses every size string with ``c2h5oh/datasize`` (``ByteSize.UnmarshalText``) and
prints every size with ``ByteSize.HumanReadable``. Clients compare these strings, so vmfleet
reproduces both byte for byte instead of inventing its own notation:

* Parsing: an unsigned ASCII integer, then an optional unit (surrounding spaces allowed after
  the number), case-insensitive, **binary** multiples: ``b``/``byte``; ``k``, ``kb``, ``kib``,
  ``kilo``, ``kilobyte(s)``; the same for ``m``/``mega``, ``g``/``giga``, ``t``/``tera``,
  ``p``/``peta``, ``e``/``exa``. So ``"1GB"`` is 1 GiB. ``"Kb"``, ``"Mb"``, ``"Gb"``, ``"Tb"``,
  ``"Pb"``, ``"Eb"`` (capital prefix, lower ``b``) are bit units and rejected; decimals and
  signs are rejected; values above 2**64-1 are out of range.
* Printing (``HumanReadable``): a unit is chosen only when the value is *strictly greater*
  than it, then ``%.1f`` and a space: 1 GiB -> ``"1024.0 MB"``, 3 GiB -> ``"3.0 GB"``. At or
  below 1 KiB datasize prints the plain integer with ``" B"``: 512 -> ``"512 B"``,
  1024 -> ``"1024 B"``, 0 -> ``"0 B"`` (read from datasize.go: ``default: "%d B"``).

Error messages equal Go's ``strconv.NumError`` text (``strconv.UnmarshalText: parsing "1.5GB":
invalid syntax``) so that ``invalid size format: <err>`` matches hypeman's response; the
exception also carries a ``hint`` for humans.

One deliberate difference: datasize accepts ``""`` as 0, but hypeman never passes an empty
string to it (empty means "use the default"). ``parse_size("")`` raises, so a caller that forgets
the default gets an error instead of a silent zero.
"""

from __future__ import annotations

__all__ = [
    "EIB",
    "GIB",
    "KIB",
    "MAX_BYTES",
    "MIB",
    "PIB",
    "TIB",
    "SizeError",
    "format_rate",
    "format_size",
    "parse_bandwidth",
    "parse_rate",
    "parse_size",
]

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
PIB = 1 << 50
EIB = 1 << 60
MAX_BYTES = (1 << 64) - 1

_HINT = 'expected an unsigned integer and an optional binary unit (B, KB, MB, GB, TB), e.g. "512MB"'

_UNIT_NAMES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, ("", "b", "byte")),
    (KIB, ("k", "kb", "kib", "kilo", "kilobyte", "kilobytes")),
    (MIB, ("m", "mb", "mib", "mega", "megabyte", "megabytes")),
    (GIB, ("g", "gb", "gib", "giga", "gigabyte", "gigabytes")),
    (TIB, ("t", "tb", "tib", "tera", "terabyte", "terabytes")),
    (PIB, ("p", "pb", "pib", "peta", "petabyte", "petabytes")),
    (EIB, ("e", "eb", "eib", "exa", "exabyte", "exabytes")),
)
_MULTIPLIERS: dict[str, int] = {name: mult for mult, names in _UNIT_NAMES for name in names}
_BIT_UNITS = frozenset({"Kb", "Mb", "Gb", "Tb", "Pb", "Eb"})
# HumanReadable's thresholds, largest first: (unit size, label).
_HR_UNITS: tuple[tuple[int, str], ...] = (
    (EIB, "EB"),
    (PIB, "PB"),
    (TIB, "TB"),
    (GIB, "GB"),
    (MIB, "MB"),
    (KIB, "KB"),
)
_ASCII_DIGITS = frozenset("0123456789")
_MAX_INT64 = (1 << 63) - 1
# Go's unicode.IsSpace set, used by strings.TrimSpace (Python's str.strip() differs slightly).
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Longest digit string worth converting: anything longer is out of range anyway, and Python
# refuses int() on more than 4300 digits.
_MAX_DIGITS = 20


class SizeError(ValueError):
    """A size or rate string that hypeman would reject.

    ``str(err)`` is Go's error text (wire compatible); ``hint`` says what was expected.
    """

    def __init__(self, message: str, *, text: str, hint: str = _HINT) -> None:
        super().__init__(message)
        self.text = text
        self.hint = hint


def _go_quote(text: str) -> str:
    """Approximate Go's ``%q`` so error messages read like hypeman's."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    out = []
    for ch in escaped:
        out.append(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(out) + '"'


def _num_error(text: str, reason: str) -> SizeError:
    """Build the ``strconv.NumError`` text datasize returns."""
    return SizeError(f"strconv.UnmarshalText: parsing {_go_quote(text)}: {reason}", text=text)


def _split_number(text: str) -> tuple[int, str]:
    """Split the leading ASCII digits from the unit, as datasize's parse loop does."""
    i = 0
    while i < len(text) and text[i] in _ASCII_DIGITS:
        i += 1
    if i == 0:
        raise _num_error(text, "invalid syntax")
    digits = text[:i].lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS or int(digits) > MAX_BYTES:
        raise _num_error(text, "value out of range")
    return int(digits), text[i:].strip(_GO_SPACE)


def parse_size(text: str) -> int:
    """Parse a datasize string such as ``"1GB"`` into bytes (binary units).

    Raises SizeError (a ValueError) for anything datasize rejects, and for ``""``.
    """
    if text == "":
        raise SizeError("empty size", text=text)
    value, unit = _split_number(text)
    if unit in _BIT_UNITS:
        raise _num_error(
            text, "unit with capital unit prefix and lower case unit (b) - bits, not bytes "
        )
    multiplier = _MULTIPLIERS.get(unit.lower())
    if multiplier is None:
        raise _num_error(text, "invalid syntax")
    if value * multiplier > MAX_BYTES:
        raise _num_error(text, "value out of range")
    return value * multiplier


def format_size(n: int) -> str:
    """Format bytes like datasize ``HumanReadable``: ``"1024.0 MB"``, ``"3.0 GB"``, ``"512 B"``."""
    if n < 0:
        raise ValueError(f"size must be non-negative, got {n}")
    for unit, label in _HR_UNITS:
        if n > unit:
            # datasize computes whole + remainder/unit in float64; keep the same arithmetic so
            # the rounding of %.1f matches.
            value = float(n // unit) + float(n % unit) / float(unit)
            return f"{value:.1f} {label}"
    return f"{n} B"


def parse_rate(text: str) -> int:
    """Parse a byte rate such as ``"100MB/s"`` (hypeman's ``disk_io_bps`` rule).

    hypeman trims a ``"/s"`` suffix, then a ``"ps"`` suffix (both case-sensitive), then
    parses the rest with datasize.
    """
    stripped = text.removesuffix("/s").removesuffix("ps")
    return parse_size(stripped)


def format_rate(bytes_per_second: int) -> str:
    """Format a byte rate as hypeman does: ``HumanReadable + "/s"`` (e.g. ``"200.0 MB/s"``)."""
    return format_size(bytes_per_second) + "/s"


def _is_int64_digits(digits: str) -> bool:
    """True when ``digits`` is a non-empty ASCII integer that fits Go's int64."""
    if not digits or not set(digits) <= _ASCII_DIGITS:
        return False
    significant = digits.lstrip("0") or "0"
    return len(significant) <= _MAX_DIGITS and int(significant) <= _MAX_INT64


def _parse_bits(num_part: str) -> int:
    """Parse the ``<n>[k|m|g]`` part of a ``...bps`` bandwidth into bytes per second."""
    multiplier = 1
    for suffix, mult in (("g", 1_000_000_000), ("m", 1_000_000), ("k", 1_000)):
        if num_part.endswith(suffix):
            multiplier, num_part = mult, num_part.removesuffix(suffix)
            break
    digits = num_part.strip(_GO_SPACE)
    if not _is_int64_digits(digits):
        raise SizeError(
            f"invalid number: {num_part}",
            text=num_part,
            hint='expected an unsigned integer and kbps, mbps or gbps, e.g. "1Gbps"',
        )
    return (int(digits) * multiplier) // 8


def parse_bandwidth(text: str) -> int:
    """Parse a network bandwidth into bytes per second (hypeman ``resources.ParseBandwidth``).

    After trimming and lower-casing, ``...bps`` is a *decimal bit* rate (``"1Gbps"`` ->
    125,000,000); anything else is a byte rate parsed like ``parse_rate`` with binary units
    (``"125MB/s"`` -> 131,072,000). Unlike Go's ParseInt, a sign is rejected.
    """
    limit = text.strip(_GO_SPACE).lower()
    if limit.endswith("bps"):
        return _parse_bits(limit.removesuffix("bps").strip(_GO_SPACE))
    try:
        return parse_rate(limit)
    except SizeError as exc:
        raise SizeError(f"parse as bytes: {exc}", text=text, hint=exc.hint) from exc
