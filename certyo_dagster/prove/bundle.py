"""The proof bundle: everything needed to prove one document version, in one JSON file.

The format is specified in docs/proof-bundle.md and docs/proof-bundle.schema.json. A bundle
file is the RFC 8785 canonical JSON of the bundle object followed by one line feed, so every
byte of it is determined by its content; `bundleDigest` is the SHA-256 of the canonical JSON
of the object without `bundleDigest`. This module only builds, writes and reads bundles;
`certyo_dagster.prove.verifier` checks them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from certyo_dagster.prove.hashing import HASH_PREFIX, canonical_json

FORMAT = "certyo-proof-bundle"
FORMAT_VERSION = 1
DIGEST_FIELD = "bundleDigest"
SUFFIX = ".proof.json"

# Matched whole (fullmatch): the same patterns as docs/proof-bundle.schema.json.
HEX64 = re.compile(r"[0-9a-f]{64}")
RECORD_HASH = re.compile(r"sha256:[0-9a-f]{64}")
TX_HASH = re.compile(r"0x[0-9a-f]{64}")
# RFC 3339 date-time with an explicit offset or Z, as Certyo writes its times.
TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
)
MAX_SAFE_INT = 2**53 - 1


class BundleFormatError(ValueError):
    """A bundle that does not have the shape docs/proof-bundle.md specifies."""


def build_bundle(
    *,
    database: str,
    collection: str,
    document_id: Any,
    record_id: str,
    version: int,
    timestamp_field: str,
    payload: Any,
    record_hash: str,
    leaf_index: int,
    tree_size: int,
    audit_path: list[str],
    root: str,
    chain_id: int | None,
    transaction_hash: str,
    block_number: int,
    ipfs_cid: str | None,
    ingested_at: str,
    anchored_at: str,
) -> dict[str, Any]:
    """A bundle object (with its digest) for one anchored version.

    `payload` is the sanitized recordPayload; it is stored as its canonical JSON text, the
    exact bytes whose SHA-256 is `record_hash`.
    """
    bundle: dict[str, Any] = {
        "format": FORMAT,
        "formatVersion": FORMAT_VERSION,
        "document": {
            "database": database,
            "collection": collection,
            "id": document_id,
            "recordId": record_id,
            "version": version,
            "timestampField": timestamp_field,
        },
        "record": {
            "canonicalPayload": canonical_json(payload).decode("utf-8"),
            "recordHash": record_hash,
        },
        "inclusionProof": {
            "leafIndex": leaf_index,
            "treeSize": tree_size,
            "auditPath": [node.lower() for node in audit_path],
            "root": root.lower(),
        },
        "anchor": {
            "chainId": chain_id,
            "transactionHash": transaction_hash.lower(),
            "blockNumber": block_number,
            "ipfsCid": ipfs_cid,
        },
        "times": {"ingestedAt": ingested_at, "anchoredAt": anchored_at},
    }
    bundle[DIGEST_FIELD] = bundle_digest(bundle)
    return bundle


def bundle_digest(bundle: dict[str, Any]) -> str:
    """`sha256:<hex>` of the canonical JSON of `bundle` without its digest field."""
    body = {k: v for k, v in bundle.items() if k != DIGEST_FIELD}
    return HASH_PREFIX + hashlib.sha256(canonical_json(body)).hexdigest()


def encode_bundle(bundle: dict[str, Any]) -> bytes:
    """The exact bytes of a bundle file."""
    return canonical_json(bundle) + b"\n"


def decode_bundle(data: bytes) -> dict[str, Any]:
    """Parse bundle bytes into an object; raises BundleFormatError when that fails."""
    try:
        bundle = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BundleFormatError(f"not valid UTF-8 JSON ({exc})") from None
    if not isinstance(bundle, dict):
        raise BundleFormatError("the bundle is not a JSON object")
    return bundle


# -- shape -------------------------------------------------------------------------------------

_SECTIONS = {
    "format",
    "formatVersion",
    "document",
    "record",
    "inclusionProof",
    "anchor",
    "times",
    DIGEST_FIELD,
}


def check_shape(bundle: dict[str, Any]) -> None:
    """Raise BundleFormatError naming the first field that breaks the format.

    The same rules as docs/proof-bundle.schema.json (tests/prove/test_bundle_schema.py keeps
    the two in step), written out so verifying needs no JSON Schema library.
    """
    _fields(bundle, "", _SECTIONS)
    if bundle["format"] != FORMAT:
        raise BundleFormatError(f"format is {bundle['format']!r}, expected {FORMAT!r}")
    if bundle["formatVersion"] != FORMAT_VERSION or type(bundle["formatVersion"]) is not int:
        raise BundleFormatError(
            f"formatVersion {bundle['formatVersion']!r} is not supported (this verifier reads "
            f"version {FORMAT_VERSION})"
        )
    _string(bundle, DIGEST_FIELD, "", RECORD_HASH)

    document = _section(bundle, "document", {"database", "collection", "id", "recordId",
                                              "version", "timestampField"})  # fmt: skip
    for name in ("database", "collection", "recordId", "timestampField"):
        _string(document, name, "document.")
    _integer(document, "version", "document.", minimum=-MAX_SAFE_INT)

    record = _section(bundle, "record", {"canonicalPayload", "recordHash"})
    _string(record, "canonicalPayload", "record.")
    _string(record, "recordHash", "record.", RECORD_HASH)

    proof = _section(bundle, "inclusionProof", {"leafIndex", "treeSize", "auditPath", "root"})
    _integer(proof, "leafIndex", "inclusionProof.", minimum=0)
    _integer(proof, "treeSize", "inclusionProof.", minimum=1)
    _string(proof, "root", "inclusionProof.", HEX64)
    path = proof["auditPath"]
    if not isinstance(path, list) or len(path) > 64:
        raise BundleFormatError("inclusionProof.auditPath must be a list of at most 64 nodes")
    for i, node in enumerate(path):
        if not isinstance(node, str) or not HEX64.fullmatch(node):
            raise BundleFormatError(
                f"inclusionProof.auditPath[{i}] must be 64 lowercase hex digits"
            )

    anchor = _section(bundle, "anchor", {"chainId", "transactionHash", "blockNumber", "ipfsCid"})
    if anchor["chainId"] is not None:
        _integer(anchor, "chainId", "anchor.", minimum=1)
    _string(anchor, "transactionHash", "anchor.", TX_HASH)
    _integer(anchor, "blockNumber", "anchor.", minimum=0)
    if anchor["ipfsCid"] is not None:
        _string(anchor, "ipfsCid", "anchor.")

    times = _section(bundle, "times", {"ingestedAt", "anchoredAt"})
    _string(times, "ingestedAt", "times.", TIMESTAMP)
    _string(times, "anchoredAt", "times.", TIMESTAMP)


def _fields(obj: dict[str, Any], where: str, expected: set[str]) -> None:
    missing = sorted(expected - obj.keys())
    if missing:
        raise BundleFormatError(f"{where}{missing[0]} is missing")
    unknown = sorted(obj.keys() - expected)
    if unknown:
        raise BundleFormatError(f"{where}{unknown[0]} is not a field of this format")


def _section(bundle: dict[str, Any], name: str, expected: set[str]) -> dict[str, Any]:
    section = bundle[name]
    if not isinstance(section, dict):
        raise BundleFormatError(f"{name} must be an object")
    _fields(section, name + ".", expected)
    return section


def _string(obj: dict[str, Any], name: str, where: str, pattern: re.Pattern | None = None) -> None:
    value = obj[name]
    if not isinstance(value, str) or not value:
        raise BundleFormatError(f"{where}{name} must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(value):
        raise BundleFormatError(f"{where}{name} {value[:80]!r} is not in the required form")


def _integer(obj: dict[str, Any], name: str, where: str, *, minimum: int) -> None:
    value = obj[name]
    if type(value) is not int or not minimum <= value <= MAX_SAFE_INT:
        raise BundleFormatError(
            f"{where}{name} must be a whole number from {minimum} to {MAX_SAFE_INT}, got {value!r}"
        )
