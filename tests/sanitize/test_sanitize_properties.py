"""Property tests: whatever BSON a document holds, the sanitizer either rejects it with a
PoisonDocumentError or returns I-JSON that both encoders accept, and it is a fixed point."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import orjson
import rfc8785
from bson import (
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
)
from bson.datetime_ms import DatetimeMS
from bson.son import SON
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certyo_dagster.sanitize.documents import PoisonDocumentError, sanitize_document, sanitize_value

REASONS = {"unsupported_type", "invalid_unicode", "too_deep", "bad_key"}
_OFFSETS = [
    None,
    timezone.utc,
    timezone(timedelta(hours=5, minutes=30)),
    timezone(-timedelta(hours=8)),
]

texts = st.one_of(
    st.text(max_size=12), st.sampled_from(["", "certyo_x", "a.b", "$x", "😀", "\ue000"])
)
# Text that is not I-JSON: lone surrogates and noncharacters.
bad_texts = st.one_of(
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["\uffff", "a\ufdd0", "\U0010fffe"]),
)
decimals = st.one_of(
    st.builds(
        lambda sign, coefficient, exponent: Decimal128(f"{sign}{coefficient}E{exponent}"),
        st.sampled_from(["", "-"]),
        st.integers(0, 10**34 - 1),
        st.integers(-6176, 6111 - 33),
    ),
    st.sampled_from([Decimal128("NaN"), Decimal128("-Infinity"), Decimal128("Infinity")]),
)
valid_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.floats(),
    texts,
    st.binary(max_size=20),
    st.builds(Binary, st.binary(max_size=20), st.sampled_from([0, 3, 4, 5, 128])),
    st.builds(Binary, st.binary(min_size=16, max_size=16), st.just(4)),
    st.uuids(),
    st.binary(min_size=12, max_size=12).map(ObjectId),
    st.builds(
        lambda ts, tz: ts.replace(tzinfo=tz),
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
        st.sampled_from(_OFFSETS),
    ),
    st.integers(-(2**63), 2**63 - 1).map(DatetimeMS),
    decimals,
    st.builds(Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(Regex, texts, st.sampled_from(["", "i", "ms", "imsux"])),
    st.builds(Code, texts),
    st.just(MinKey()),
    st.just(MaxKey()),
)
# One leaf in forty has no JSON form, so that most documents still sanitize.
scalars = st.integers(1, 40).flatmap(
    lambda n: (
        st.one_of(bad_texts, st.sets(st.integers(), max_size=2), st.just(1j))
        if n == 1
        else valid_scalars
    )
)
# One key in twenty is not a valid I-JSON name.
keys = st.integers(1, 20).flatmap(
    lambda n: st.one_of(bad_texts, st.integers(0, 3)) if n == 1 else texts
)


def _containers(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(texts, children, max_size=3).map(lambda d: SON(list(d.items()))),
        st.builds(Code, texts, st.dictionaries(texts, children, max_size=2)),
        st.builds(DBRef, texts, children, st.one_of(st.none(), texts)),
    )


values = st.recursive(scalars, _containers, max_leaves=25)
documents = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_sanitized_documents_are_i_json_or_poison(doc) -> None:
    try:
        payload = sanitize_document(doc)
    except PoisonDocumentError as error:
        assert error.reason in REASONS
        str(error).encode("utf-8")  # the message is loggable
        return

    canonical = rfc8785.dumps(payload)
    assert orjson.loads(orjson.dumps(payload)) == payload
    # JCS writes 5.388263495976233e16 as 53882634959762330: read numbers as doubles, like
    # any I-JSON reader.
    assert json.loads(canonical, parse_int=float) == payload
    assert not any(key.startswith("certyo_") for key in payload)
    # Sanitizing the output changes nothing, and sanitizing twice gives the same bytes.
    assert sanitize_document(payload) == payload
    assert orjson.dumps(sanitize_document(doc)) == orjson.dumps(payload)


@settings(max_examples=300, deadline=None)
@given(decimals)
def test_fast_decimal128_form_matches_bson(value) -> None:
    assert sanitize_value(value) == str(value)


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1))
def test_every_bson_date_is_an_iso_string_with_utc_offset(ms) -> None:
    text = sanitize_value(DatetimeMS(ms))

    assert text.endswith("+00:00")
    if -62135596800000 <= ms <= 253402300799999:
        parsed = datetime.fromisoformat(text)
        assert parsed == datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ms)


def test_uuid_forms_agree() -> None:
    value = uuid.uuid4()
    assert sanitize_value(value) == sanitize_value(Binary.from_uuid(value)) == str(value)
