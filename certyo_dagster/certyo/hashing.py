"""The Certyo record hash: SHA-256 over the RFC 8785 (JCS) canonical JSON of a payload.

The sandbox computes `recordHash` with this same function, which is what lets the pipeline
check a MongoDB document against the hash that was anchored.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

HASH_PREFIX = "sha256:"


def canonical_json(payload: Any) -> bytes:
    """RFC 8785 canonical bytes. Raises rfc8785.CanonicalizationError for non-I-JSON input."""
    return rfc8785.dumps(payload)


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
