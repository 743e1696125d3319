"""Floats in the record hash's orjson fast path must print exactly as RFC 8785 prints them.

Catalog documents carry prices, weights and tax rates as doubles; sending every such document
through the pure-Python encoder made the sandbox hash at a few thousand records per second.
"""

from __future__ import annotations

import math

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from certyo_dagster.prove.hashing import canonical_json, record_hash

FINITE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=3000, deadline=None)
@given(FINITE)
def test_any_finite_float_matches_rfc8785(value):
    assert canonical_json({"v": value, "w": [value]}) == rfc8785.dumps({"v": value, "w": [value]})


@settings(max_examples=1000, deadline=None)
@given(st.integers(-(2**53) + 1, 2**53 - 1))
def test_integral_floats_print_as_integers(n):
    value = float(n)
    assert canonical_json([value]) == rfc8785.dumps([value]) == f"[{int(value)}]".encode()


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 50.0, 0.07, 1e-5, 1e-6, 3.5e-6, 1e-7, 5e-324, 2.0**53, 1e16, 1e21, 1e300, -1e-5],
)
def test_edges_of_the_fast_range_match_rfc8785(value):
    payload = {"dimensions": {"widthCm": value, "tags": [value, 1, "x"]}, "taxRate": 0.2}
    assert canonical_json(payload) == rfc8785.dumps(payload)


def test_the_caller_payload_is_not_changed():
    payload = {"weightKg": 50.0, "nested": [{"x": 2.0}]}
    record_hash(payload)
    assert type(payload["weightKg"]) is float and type(payload["nested"][0]["x"]) is float


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_still_refused(value):
    with pytest.raises(rfc8785.CanonicalizationError):
        canonical_json({"v": value})
