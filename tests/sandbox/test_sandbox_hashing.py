"""The orjson fast path of `canonical_json` must produce exactly RFC 8785's bytes."""

from __future__ import annotations

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from certyo_dagster.prove.hashing import canonical_json, record_hash

# Keys and strings mix ASCII, control characters, quotes, backslashes, BMP characters on
# both sides of the surrogate range and astral characters, where UTF-8 and UTF-16 orders
# part ways.
TRICKY_CHARS = st.sampled_from(
    ["a", "B", "\x00", "\x1f", "\x7f", '"', "\\", "\b", "\t", "\n", "\f", "\r", "é", "€",
     "\u2028", "\ud7ff", "\ue000", "\uffff", "\U0001f600", "\U00010000", "\u0080"]
)  # fmt: skip
TEXT = st.one_of(st.text(), st.text(TRICKY_CHARS, max_size=6))
INTS = st.one_of(
    st.integers(-(2**53) + 1, 2**53 - 1),
    st.sampled_from([2**53, -(2**53), 2**53 - 1, -(2**53) + 1, 2**63, 0]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, TEXT, st.floats(allow_nan=False, allow_infinity=False)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=5)),
    max_leaves=40,
)


def rfc8785_outcome(value):
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        return type(exc)


def our_outcome(value):
    try:
        return canonical_json(value)
    except rfc8785.CanonicalizationError as exc:
        return type(exc)


@settings(max_examples=1500, deadline=None)
@given(JSON)
def test_canonical_json_matches_rfc8785_for_any_json_value(value):
    assert our_outcome(value) == rfc8785_outcome(value)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(TRICKY_CHARS, min_size=1, max_size=3), st.integers(0, 9)))
def test_key_order_follows_utf16_like_rfc8785(value):
    assert canonical_json(value) == rfc8785.dumps(value)


def test_utf16_order_differs_from_code_point_order_and_rfc8785_wins():
    # U+E000 sorts after U+1F600 in UTF-16 (0xD83D...) but before it by code point.
    value = {"\ue000": 1, "\U0001f600": 2}
    assert canonical_json(value) == rfc8785.dumps(value)
    assert canonical_json(value).index("\U0001f600".encode()) < canonical_json(value).index(
        "\ue000".encode()
    )


@pytest.mark.parametrize("value", [2**53, -(2**53), 2**64, {"n": [1, 2**60]}])
def test_integers_beyond_ijson_range_are_refused(value):
    with pytest.raises(rfc8785.CanonicalizationError):
        canonical_json(value)


def test_non_json_types_still_go_through_rfc8785():
    class Label(str):
        pass

    assert canonical_json({"k": Label("v"), "t": (1, 2)}) == rfc8785.dumps({"k": "v", "t": [1, 2]})
    with pytest.raises(rfc8785.CanonicalizationError):
        canonical_json({"when": object()})


def test_record_hash_is_sha256_of_rfc8785_bytes():
    import hashlib

    payload = {"b": [1, "x", None, True], "a": {"é": "\u2028"}, "price": "19.99"}
    expected = "sha256:" + hashlib.sha256(rfc8785.dumps(payload)).hexdigest()
    assert record_hash(payload) == expected


# Integral floats are fixed up in orjson's bytes ("50.0," -> "50,"), which is only exact
# when no string holds the same bytes; these strings are made to hold them.
FLOAT_LOOKALIKES = st.text(st.sampled_from([".", "0", "1", ",", "]", "}", "-", "a"]), max_size=8)
INTEGRAL_MIX = st.recursive(
    st.one_of(
        st.integers(-(10**6), 10**6).map(float),
        st.sampled_from([0.0, -0.0, 1.5, 2.0**52]),
        FLOAT_LOOKALIKES,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(FLOAT_LOOKALIKES, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=800, deadline=None)
@given(INTEGRAL_MIX)
def test_integral_floats_next_to_lookalike_strings_match_rfc8785(value):
    assert our_outcome(value) == rfc8785_outcome(value)


@pytest.mark.parametrize(
    "value",
    [
        {"price": 50.0, "note": "was 40.0, now 50.0]"},
        {"a.0}": 1.0, "b": [2.0, -0.0, 0.0]},
        [10.0, 1.05, "x.0]"],
        50.0,
    ],
)
def test_integral_float_fixups_never_touch_strings(value):
    assert canonical_json(value) == rfc8785.dumps(value)
