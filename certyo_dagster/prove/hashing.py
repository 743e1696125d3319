"""The Certyo record hash: SHA-256 over the RFC 8785 (JCS) canonical JSON of a payload.

The sandbox computes `recordHash` with this same function, which is what lets the pipeline
check a MongoDB document against the hash that was anchored.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import orjson
import rfc8785

HASH_PREFIX = "sha256:"

_MAX_SAFE_INT = 2**53 - 1
# Below U+E000, UTF-16 code units and code points order strings identically.
_UTF16_SAFE_LIMIT = "\ue000"
_MAX_FAST_NODES = 1_000_000
# orjson writes a non-integral float exactly as ECMAScript does (shortest round trip) from
# 1e-5 up; below that it switches to exponent form earlier than ECMAScript. Integral floats
# print as integers in ECMAScript ("50", not "50.0"), so they are sent to orjson as ints.
_MIN_FAST_FLOAT = 1e-5
_FLOAT_ENDS = b",]}"
_NEEDS_COPY = -1  # a -0.0: copy the payload with ints for integral floats


def canonical_json(payload: Any) -> bytes:
    """RFC 8785 canonical bytes. Raises rfc8785.CanonicalizationError for non-I-JSON input.

    The pure-Python `rfc8785` encoder costs ~50 us per 1 KB document, which would cap the
    sandbox's ingest rate. When `payload` provably canonicalises the same way through
    orjson, orjson does the work; everything else (floats below 1e-5, big integers, exotic
    keys or types, deep nesting) goes through `rfc8785`. tests/sandbox/test_sandbox_hashing.py and
    tests/prove/test_hashing_floats.py prove the two agree.
    """
    form = _orjson_form(payload)
    if form is not None:
        try:
            if form == _NEEDS_COPY:
                return orjson.dumps(_integral_floats_as_ints(payload), option=orjson.OPT_SORT_KEYS)
            out = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
            if not form:
                return out
            fixed = _drop_integral_suffixes(out, form)
            if fixed is not None:
                return fixed
            return orjson.dumps(_integral_floats_as_ints(payload), option=orjson.OPT_SORT_KEYS)
        except (orjson.JSONEncodeError, RecursionError):  # lone surrogates, very deep nesting
            pass
    return rfc8785.dumps(payload)


def _drop_integral_suffixes(out: bytes, integral_floats: int) -> bytes | None:
    """orjson's output with every integral float's ".0" removed, or None when unsure.

    In a container each float is followed by ',', ']' or '}', so each integral float gives
    exactly one ".0" followed by one of them outside strings. When `out` holds no more of
    those than there are integral floats, none sits inside a string and dropping them all
    is exact; copying the payload with ints instead costs ~7 us per 1.5 KB payload.
    """
    pieces = out.split(b".0")
    joined = [pieces[0]]
    dropped = 0
    for piece in pieces[1:]:
        if piece and piece[0] in _FLOAT_ENDS:
            dropped += 1
            joined.append(piece)
        else:
            joined.append(b".0" + piece)
    return b"".join(joined) if dropped == integral_floats else None


def _orjson_form(payload: Any) -> int | None:
    """How `payload` canonicalises through orjson: None when it cannot, else the number
    of integral floats to print as ints (0: orjson's sorted output is already RFC 8785's),
    or `_NEEDS_COPY` when a negative zero must lose its sign too.

    That holds for exact dict/list/str/int/bool/None/float values (no subclasses, which
    orjson and rfc8785 may serialise differently), integers within I-JSON's safe range,
    non-integral floats of magnitude at least 1e-5, integral floats below 2**53, and keys
    whose UTF-8 and UTF-16 orders agree.
    String escaping already matches: both escape only '"', '\\' and U+0000..U+001F, using
    the short forms for \\b \\t \\n \\f \\r and lowercase \\u00xx otherwise.
    """
    stack = [payload]
    push = stack.append
    budget = _MAX_FAST_NODES  # a self-containing list would otherwise never end
    integral_floats = 0
    negative_zero = False
    while stack:
        container = stack.pop()
        kind = type(container)
        if kind is dict:
            try:
                keys = "".join(container)
            except TypeError:  # a key that is not a string
                return None
            if not keys.isascii() and max(keys) >= _UTF16_SAFE_LIMIT:
                return None
            items = container.values()
        elif kind is list:
            items = container
        else:
            items = (container,)
        budget -= len(items)
        if budget < 0:
            return None
        for item in items:
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int:
                if -_MAX_SAFE_INT <= item <= _MAX_SAFE_INT:
                    continue
                return None
            if (kind is dict or kind is list) and item is not container:
                push(item)
                continue
            if kind is float:
                if item.is_integer():
                    if -_MAX_SAFE_INT <= item <= _MAX_SAFE_INT:
                        integral_floats += 1
                        if not item and math.copysign(1.0, item) < 0:
                            negative_zero = True
                        continue
                # Every non-integral double is below 2**52; the bound keeps out infinities.
                elif _MIN_FAST_FLOAT <= abs(item) <= _MAX_SAFE_INT:  # False for NaN
                    continue
            return None
    return _NEEDS_COPY if negative_zero else integral_floats


def _integral_floats_as_ints(value: Any) -> Any:
    """A copy of a checked payload with integral floats as ints (50.0 → 50, -0.0 → 0)."""
    kind = type(value)
    if kind is float:
        return int(value) if value.is_integer() else value
    if kind is dict:
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if kind is list:
        return [_integral_floats_as_ints(v) for v in value]
    return value


def record_hash(payload: Any) -> str:
    """`sha256:<hex>` of the canonical JSON of `payload`."""
    return HASH_PREFIX + hashlib.sha256(canonical_json(payload)).hexdigest()


def record_hash_bytes(record_hash_value: str) -> bytes:
    """The raw 32 digest bytes of a `sha256:<hex>` record hash (the Merkle leaf data)."""
    if not isinstance(record_hash_value, str) or not record_hash_value.startswith(HASH_PREFIX):
        raise ValueError(f"record hash must look like 'sha256:<64 hex>', got {record_hash_value!r}")
    hex_part = record_hash_value[len(HASH_PREFIX) :]
    if len(hex_part) != 64:
        raise ValueError(f"record hash must carry 64 hex digits, got {len(hex_part)}")
    return bytes.fromhex(hex_part)
