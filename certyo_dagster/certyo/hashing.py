"""The Certyo record hash: SHA-256 over the RFC 8785 (JCS) canonical JSON of a payload.

The sandbox computes `recordHash` with this same function, which is what lets the pipeline
check a MongoDB document against the hash that was anchored.
"""

from __future__ import annotations

import hashlib
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
_HAS_INTEGRAL_FLOATS = 2  # truthy: canonical through orjson once integral floats are ints


def canonical_json(payload: Any) -> bytes:
    """RFC 8785 canonical bytes. Raises rfc8785.CanonicalizationError for non-I-JSON input.

    The pure-Python `rfc8785` encoder costs ~50 us per 1 KB document, which would cap the
    sandbox's ingest rate. When `payload` provably canonicalises the same way through
    orjson, orjson does the work; everything else (floats below 1e-5, big integers, exotic
    keys or types, deep nesting) goes through `rfc8785`. tests/test_sandbox_hashing.py and
    tests/test_hashing_floats.py prove the two agree.
    """
    fast = _orjson_is_canonical(payload)
    if fast:
        try:
            if fast == _HAS_INTEGRAL_FLOATS:
                return orjson.dumps(_integral_floats_as_ints(payload), option=orjson.OPT_SORT_KEYS)
            return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        except (orjson.JSONEncodeError, RecursionError):  # lone surrogates, very deep nesting
            pass
    return rfc8785.dumps(payload)


def _orjson_is_canonical(payload: Any) -> int | bool:
    """True when orjson's sorted output equals RFC 8785's for `payload`.

    That holds for exact dict/list/str/int/bool/None/float values (no subclasses, which
    orjson and rfc8785 may serialise differently), integers within I-JSON's safe range,
    non-integral floats of magnitude at least 1e-5, and keys whose UTF-8 and UTF-16 orders
    agree. Integral floats below 2**53 make it return `_HAS_INTEGRAL_FLOATS`: canonical once
    they are written as ints (`_integral_floats_as_ints`).
    String escaping already matches: both escape only '"', '\\' and U+0000..U+001F, using
    the short forms for \\b \\t \\n \\f \\r and lowercase \\u00xx otherwise.
    """
    stack = [payload]
    push = stack.append
    budget = _MAX_FAST_NODES  # a self-containing list would otherwise never end
    integral_floats = False
    while stack:
        container = stack.pop()
        kind = type(container)
        if kind is dict:
            try:
                keys = "".join(container)
            except TypeError:  # a key that is not a string
                return False
            if not keys.isascii() and max(keys) >= _UTF16_SAFE_LIMIT:
                return False
            items = container.values()
        elif kind is list:
            items = container
        else:
            items = (container,)
        budget -= len(items)
        if budget < 0:
            return False
        for item in items:
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int:
                if -_MAX_SAFE_INT <= item <= _MAX_SAFE_INT:
                    continue
                return False
            if (kind is dict or kind is list) and item is not container:
                push(item)
                continue
            if kind is float:
                if item.is_integer():
                    if -_MAX_SAFE_INT <= item <= _MAX_SAFE_INT:
                        integral_floats = True
                        continue
                # Every non-integral double is below 2**52; the bound keeps out infinities.
                elif _MIN_FAST_FLOAT <= abs(item) <= _MAX_SAFE_INT:  # False for NaN
                    continue
            return False
    return _HAS_INTEGRAL_FLOATS if integral_floats else True


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
