"""Properties of the wire shapes and the size parser, on generated input.

* Every Struct of ``schemas/`` (HTTP bodies, NATS payloads, KV records) survives
  encode → decode unchanged. Values are drawn from each Struct's own description
  (``msgspec.inspect``), constraints included, so a field added tomorrow is covered and a
  type the generator does not know fails here instead of being skipped.
* Decoding arbitrary bytes, arbitrary JSON, or a valid body with one field replaced by
  arbitrary JSON into a request Struct raises ``msgspec.ValidationError`` or
  ``msgspec.DecodeError`` and nothing else: the gateway turns exactly those into a 400.
* The size parser raises only ``SizeError`` on any text, and printing follows datasize's
  ``HumanReadable`` (``schemas/sizes.py``; the examples are in ``tests/schemas/test_sizes.py``).
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any, Final

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import api, autostandby, codec, errors, messages
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

# -- values from a Struct's own description ------------------------------------------------

_ZONES: Final = (UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)))
_INT64: Final = 1 << 63


#: Any JSON document: what a field typed ``Any`` (kept raw, checked by the gateway) decodes.
_JSON: Final = st.recursive(
    st.none() | st.booleans() | st.integers(-_INT64, _INT64 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def strategy(t: mi.Type) -> st.SearchStrategy[Any]:
    """Values of the msgspec type ``t`` that satisfy its constraints."""
    match t:
        case mi.Metadata():
            return strategy(t.type)
        case mi.StrType(pattern=str(pattern)):
            # Generated with fullmatch: a value is valid for hypeman's validator too.
            return st.from_regex(pattern, fullmatch=True).filter(lambda s: _fits(s, t))
        case mi.StrType():
            return st.text(min_size=t.min_length or 0, max_size=min(t.max_length or 12, 12))
        case mi.IntType():
            low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -_INT64)
            high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else _INT64 - 1)
            return st.integers(min_value=low, max_value=high)
        case mi.FloatType():
            return st.floats(allow_nan=False, allow_infinity=False)
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.DateTimeType():
            zones = st.sampled_from(_ZONES) if t.tz else st.none()
            return st.datetimes(
                min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=zones
            )
        case mi.EnumType():
            return st.sampled_from(list(t.cls))
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.ListType():
            return st.lists(strategy(t.item_type), max_size=3)
        case mi.VarTupleType():
            return st.lists(strategy(t.item_type), max_size=3).map(tuple)
        case mi.DictType():
            return st.dictionaries(strategy(t.key_type), strategy(t.value_type), max_size=3)
        case mi.UnionType():
            return st.one_of([strategy(member) for member in t.types])
        case mi.StructType():
            return struct_strategy(t)
        case mi.AnyType():
            return _JSON
    raise TypeError(f"no strategy for {t!r}: teach tests/fuzz/test_schemas.py this type")


def _fits(value: str, t: mi.StrType) -> bool:
    return len(value) >= (t.min_length or 0) and (
        t.max_length is None or len(value) <= t.max_length
    )


def struct_strategy(t: mi.StructType) -> st.SearchStrategy[Any]:
    """Instances of a Struct; fields with a default (or UNSET) are left out at random."""
    required = {f.name: strategy(f.type) for f in t.fields if f.required}
    optional = {f.name: strategy(f.type) for f in t.fields if not f.required}
    fields = st.fixed_dictionaries(required, optional=optional)
    return fields.map(lambda values: t.cls(**values))


def _structs(*modules: object) -> list[type[msgspec.Struct]]:
    found = []
    for module in modules:
        for name in module.__all__:  # type: ignore[attr-defined]
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, msgspec.Struct):
                found.append(value)
    return found


#: Every Struct that goes over HTTP or NATS, or into a KV bucket.
STRUCTS: Final = _structs(api, messages, errors, autostandby)


def test_every_wire_struct_is_covered() -> None:
    names = {cls.__name__ for cls in STRUCTS}
    assert {"CreateInstanceRequest", "Instance", "Create", "InstanceRecord", "ErrorInfo"} <= names


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_encode_then_decode_is_the_same_value(
    cls: type[msgspec.Struct], data: st.DataObject
) -> None:
    value = data.draw(struct_strategy(mi.type_info(cls)))  # type: ignore[arg-type]
    assert msgspec.json.decode(codec.encode(value), type=cls) == value


#: The decoders of ``schemas.codec`` and the type each one returns.
CODEC: Final[list[tuple[Any, Any]]] = [
    (codec.decode_create_instance_request, api.CreateInstanceRequest),
    (codec.decode_create_volume_request, api.CreateVolumeRequest),
    (codec.decode_attach_volume_request, api.AttachVolumeRequest),
    (codec.decode_create_image_request, api.CreateImageRequest),
    (codec.decode_start_instance_request, api.StartInstanceRequest),
    (codec.decode_drain_request, api.DrainRequest),
    (codec.decode_instance, api.Instance),
    (codec.decode_instances, list[api.Instance]),
    (codec.decode_image, api.Image),
    (codec.decode_images, list[api.Image]),
    (codec.decode_volume, api.Volume),
    (codec.decode_volumes, list[api.Volume]),
    (codec.decode_error, api.Error),
    (codec.decode_command, messages.AnyCommand),
    (codec.decode_command_result, messages.CommandResult),
    (codec.decode_state_event, messages.StateEvent),
    (codec.decode_log_line, messages.LogLine),
    (codec.decode_host_record, messages.HostRecord),
    (codec.decode_drain_record, messages.DrainRecord),
    (codec.decode_instance_record, messages.InstanceRecord),
    (codec.decode_volume_record, messages.VolumeRecord),
    (codec.decode_image_record, messages.ImageRecord),
    (codec.decode_name_claim, messages.NameClaim),
]


def test_every_codec_decoder_is_listed() -> None:
    listed = {decode.__name__ for decode, _ in CODEC}
    assert listed == {name for name in codec.__all__ if name.startswith("decode_")}


@pytest.mark.parametrize(("decode", "shape"), CODEC, ids=lambda x: getattr(x, "__name__", ""))
@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data())
def test_codec_decoders_read_what_encode_writes(
    decode: Any, shape: Any, data: st.DataObject
) -> None:
    """The tagged command union too: each command comes back as its own class."""
    value = data.draw(strategy(mi.type_info(shape)))
    decoded = decode(codec.encode(value))
    assert decoded == value
    assert type(decoded) is type(value)


# -- request bodies from the outside ---------------------------------------------------------

#: What the gateway decodes request bodies with (all in ``schemas.codec``).
REQUESTS: Final[list[tuple[Any, type[msgspec.Struct]]]] = [
    (codec.decode_create_instance_request, api.CreateInstanceRequest),
    (codec.decode_create_volume_request, api.CreateVolumeRequest),
    (codec.decode_attach_volume_request, api.AttachVolumeRequest),
    (codec.decode_create_image_request, api.CreateImageRequest),
    (codec.decode_start_instance_request, api.StartInstanceRequest),
    (codec.decode_drain_request, api.DrainRequest),
]

JSON: Final = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _refused_cleanly(decode: Any, body: bytes) -> None:
    with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
        decode(body)


@pytest.mark.parametrize(("decode", "shape"), REQUESTS, ids=lambda x: getattr(x, "__name__", ""))
@settings(max_examples=60, deadline=None, derandomize=True)
@given(body=st.binary(max_size=64) | JSON.map(lambda v: msgspec.json.encode(v)))
def test_arbitrary_bytes_are_refused_only_as_invalid(
    decode: Any, shape: type[msgspec.Struct], body: bytes
) -> None:
    _refused_cleanly(decode, body)


@pytest.mark.parametrize(("decode", "shape"), REQUESTS, ids=lambda x: getattr(x, "__name__", ""))
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), replacement=JSON)
def test_a_valid_body_with_one_field_replaced_is_refused_only_as_invalid(
    decode: Any, shape: type[msgspec.Struct], data: st.DataObject, replacement: object
) -> None:
    """Closer to the schema than random bytes: every field in turn gets a wrong value."""
    valid = msgspec.to_builtins(data.draw(struct_strategy(mi.type_info(shape))))  # type: ignore[arg-type]
    fields = [f.encode_name for f in msgspec.structs.fields(shape)]
    field = data.draw(st.sampled_from(fields))
    _refused_cleanly(decode, msgspec.json.encode({**valid, field: replacement}))


# hypeman's validator (Go regexp) anchors ``$`` at the very end of the value; Python's ``$``
# (and so msgspec's ``pattern``, a re.search) also matches before a final newline.
@settings(max_examples=100, deadline=None, derandomize=True)
@given(name=st.from_regex(api.NAME_PATTERN) | st.text(max_size=8))
def test_decoded_names_are_names_hypeman_accepts(name: str) -> None:
    body = msgspec.json.encode({"name": name, "image": "busybox"})
    try:
        decoded = codec.decode_create_instance_request(body)
    except msgspec.ValidationError:
        return
    assert re.fullmatch(api.NAME_PATTERN, decoded.name), decoded.name


# -- sizes ------------------------------------------------------------------------------------

#: datasize's unit spellings (case-insensitive) and what they multiply by.
UNITS: Final = {
    **dict.fromkeys(("", "b", "byte"), 1),
    **dict.fromkeys(("k", "kb", "kib", "kilo", "kilobyte", "kilobytes"), KIB),
    **dict.fromkeys(("m", "mb", "mib", "mega", "megabyte", "megabytes"), MIB),
    **dict.fromkeys(("g", "gb", "gib", "giga", "gigabyte", "gigabytes"), GIB),
    **dict.fromkeys(("t", "tb", "tib", "tera", "terabyte", "terabytes"), TIB),
    **dict.fromkeys(("p", "pb", "pib", "peta", "petabyte", "petabytes"), PIB),
    **dict.fromkeys(("e", "eb", "eib", "exa", "exabyte", "exabytes"), EIB),
}
#: HumanReadable's labels, smallest first.
LABELS: Final = {"KB": KIB, "MB": MIB, "GB": GIB, "TB": TIB, "PB": PIB, "EB": EIB}
_PRINTED = re.compile(r"(?P<whole>[0-9]+) B|(?P<number>[0-9]+\.[0-9]) (?P<label>[KMGTPE]B)")


def _spelled(unit: str) -> st.SearchStrategy[str]:
    """``unit`` in any letter case (bit units ``Kb``... are not byte units: left out)."""
    cases = st.tuples(*(st.sampled_from(sorted({c.lower(), c.upper()})) for c in unit)).map("".join)
    return cases.filter(lambda u: not re.fullmatch(r"[KMGTPE]b", u))


@st.composite
def size_texts(draw: st.DrawFn) -> tuple[str, int]:
    """A size string datasize accepts, and its value (leading zeros, spaces, any case)."""
    unit = draw(st.sampled_from(sorted(UNITS)))
    n = draw(st.integers(min_value=0, max_value=2000) | st.integers(min_value=0, max_value=1 << 64))
    zeros = "0" * draw(st.integers(min_value=0, max_value=2))
    space = draw(st.sampled_from(["", " ", "  "])) if unit else ""
    trail = draw(st.sampled_from(["", " ", "\t"]))
    return f"{zeros}{n}{space}{draw(_spelled(unit))}{trail}", n * UNITS[unit]


SIZE_LIKE: Final = st.text() | st.from_regex(
    r"[0-9]{0,22} ?[a-zA-Z]{0,9}(/s|ps|bps)?", fullmatch=True
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=SIZE_LIKE)
def test_parsers_raise_only_size_error(text: str) -> None:
    """Never IndexError, OverflowError, a bare ValueError...; sizes and byte rates stay
    within datasize's uint64. A bit rate has no upper bound: hypeman's int64 product would
    wrap, Python's does not (nothing downstream limits bandwidth yet)."""
    for parse in (parse_size, parse_rate, parse_bandwidth):
        try:
            value = parse(text)
        except SizeError as exc:
            assert str(exc) and exc.hint
        else:
            assert value >= 0
            assert parse is parse_bandwidth or value <= MAX_BYTES


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=size_texts())
def test_every_spelling_parses_to_its_value(case: tuple[str, int]) -> None:
    text, value = case
    if value > MAX_BYTES:
        with pytest.raises(SizeError, match="value out of range"):
            parse_size(text)
        return
    assert parse_size(text) == value
    assert parse_rate(text.rstrip() + "/s") == value
    assert parse_rate(text.rstrip() + "ps") == value


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    n=st.integers(min_value=0, max_value=MAX_BYTES) | st.integers(min_value=0, max_value=4 * KIB)
)
def test_printing_is_humanreadable(n: int) -> None:
    """``"%d B"`` up to 1 KiB, then the largest unit the value is *strictly* above, as %.1f."""
    printed = format_size(n)
    match = _PRINTED.fullmatch(printed)
    assert match, printed
    if match["whole"] is not None:
        assert n <= KIB and int(match["whole"]) == n
        return
    unit = LABELS[match["label"]]
    assert n > unit and all(n <= bigger for bigger in LABELS.values() if bigger > unit)
    # %.1f of the float quotient: within half a tenth of the exact value, float error aside.
    assert abs(Fraction(match["number"]) - Fraction(n, unit)) <= Fraction(1, 20) + Fraction(
        1, 10**9
    )
    assert format_rate(n) == printed + "/s"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=size_texts())
def test_format_of_parse_is_the_same_for_every_spelling(case: tuple[str, int]) -> None:
    """What a client sends in any spelling comes back as one string, and the plain-bytes
    form (up to 1 KiB) parses back to the same value."""
    text, value = case
    if value > MAX_BYTES:
        return
    printed = format_size(parse_size(text))
    assert printed == format_size(value)
    if value <= KIB:
        assert parse_size(printed) == value


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    k=st.integers(min_value=2, max_value=1024),
    label=st.sampled_from(sorted(LABELS)),
)
def test_whole_units_print_as_they_were_written(k: int, label: str) -> None:
    """``"3GB"`` → ``"3.0 GB"``; a whole 1024 stays in the smaller unit (not strictly
    greater than the next): ``"1024MB"`` → ``"1024.0 MB"``; and it parses back."""
    value = k * LABELS[label]
    if value > MAX_BYTES:
        return
    printed = format_size(parse_size(f"{k}{label}"))
    assert printed == f"{k}.0 {label}"
    number, unit = printed.split(" ")
    assert parse_size(number.removesuffix(".0") + unit) == value


@settings(max_examples=200, deadline=None, derandomize=True)
@given(n=st.integers(min_value=0, max_value=10**12), prefix=st.sampled_from(["", "k", "m", "g"]))
def test_bit_rates_are_decimal(n: int, prefix: str) -> None:
    """``…bps`` is decimal bits (``1Gbps`` → 125,000,000 bytes/s), any letter case."""
    multiplier = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}[prefix]
    assert parse_bandwidth(f"{n}{prefix.upper()}bps") == n * multiplier // 8
    assert parse_bandwidth(f" {n}{prefix}BPS ") == n * multiplier // 8
