"""The offline verifier: check a proof bundle with nothing but the bundle (and, optionally, a
chain node).

It imports only the bundle format, the record hash (RFC 8785) and RFC 9162 Merkle code from
this folder, never the pipeline, so an auditor needs no MongoDB, no Certyo account and none
of our configuration (tests/prove/test_verifier_imports.py keeps it that way). Each bundle
goes through the steps below, in order; the first that fails rejects the bundle and names
itself:

1. `read`: the file is UTF-8 JSON holding an object.
2. `format`: the object has exactly the fields of docs/proof-bundle.md, in their forms.
3. `canonical-form`: the file is byte for byte the RFC 8785 form of that object plus "\\n".
4. `digest`: `bundleDigest` is the SHA-256 of the rest (catches a changed field that no
   later step covers; it is a checksum, not a signature).
5. `record-hash`: SHA-256 of `canonicalPayload` is `recordHash`, and the payload is in
   RFC 8785 form.
6. `identity`: the payload's `_id` is `document.id` and gives `document.recordId`; its
   timestamp field gives `document.version`.
7. `inclusion`: the RFC 9162 audit path leads from the record hash to `root`.
8. `chain` (only with an RPC URL): the transaction exists on the named chain, succeeded, is in
   the named block and carries exactly the root as its calldata.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from certyo_dagster.prove.bundle import (
    DIGEST_FIELD,
    BundleFormatError,
    bundle_digest,
    check_shape,
    decode_bundle,
    encode_bundle,
)
from certyo_dagster.prove.chain import ChainRpcError, EvmRpc, check_anchor
from certyo_dagster.prove.hashing import HASH_PREFIX, canonical_json
from certyo_dagster.prove.merkle import InvalidProofError, root_from_inclusion_proof

STEPS = (
    "read",
    "format",
    "canonical-form",
    "digest",
    "record-hash",
    "identity",
    "inclusion",
    "chain",
)
VERIFIED = "verified"
REJECTED = "rejected"
# The bundle held up as far as it could be checked, but the chain could not be asked.
UNCHECKED = "unchecked"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)


class StepFailed(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.message = message


@dataclass
class Verdict:
    """The outcome for one bundle: `verdict` is verified, rejected or unchecked."""

    source: str
    verdict: str
    step: str | None = None
    message: str = ""
    passed: list[str] = field(default_factory=list)
    document: dict[str, Any] | None = None
    anchor: dict[str, Any] | None = None
    chain_checked: bool = False

    @property
    def ok(self) -> bool:
        return self.verdict == VERIFIED

    def line(self) -> str:
        """One line for a person."""
        if self.verdict == REJECTED:
            return f"REJECTED {self.source}: {self.step} failed: {self.message}"
        doc = self.document or {}
        anchor = self.anchor or {}
        what = (
            f"{doc.get('database')}.{doc.get('collection')} recordId {doc.get('recordId')} "
            f"version {doc.get('version')}, in transaction {anchor.get('transactionHash')} "
            f"block {anchor.get('blockNumber')}"
        )
        if self.verdict == UNCHECKED:
            return f"UNCHECKED {self.source}: {what}; proof holds but {self.step}: {self.message}"
        chain = (
            f"checked on chain {anchor.get('chainId')}"
            if self.chain_checked
            else "chain not checked (no --rpc)"
        )
        return f"VERIFIED {self.source}: {what}; {chain}"

    def as_json(self) -> dict[str, Any]:
        return {
            "bundle": self.source,
            "verdict": self.verdict,
            "failedStep": self.step,
            "message": self.message,
            "passedSteps": self.passed,
            "chainChecked": self.chain_checked,
            "document": self.document,
            "anchor": self.anchor,
        }


def verify_bundle_bytes(
    data: bytes, source: str = "<bundle>", rpc: EvmRpc | None = None
) -> Verdict:
    """Run every step over one bundle's bytes; `rpc` adds the chain step."""
    verdict = Verdict(source, REJECTED)
    try:
        bundle = _step(verdict, "read", lambda: decode_bundle(data))
        _step(verdict, "format", lambda: check_shape(bundle))
        verdict.document = dict(bundle["document"])
        verdict.anchor = dict(bundle["anchor"])
        _step(verdict, "canonical-form", lambda: _check_canonical(bundle, data))
        _step(verdict, "digest", lambda: _check_digest(bundle))
        payload = _step(verdict, "record-hash", lambda: _check_record_hash(bundle["record"]))
        _step(verdict, "identity", lambda: _check_identity(bundle["document"], payload))
        _step(verdict, "inclusion", lambda: _check_inclusion(bundle))
    except StepFailed as failure:
        verdict.step, verdict.message = failure.step, failure.message
        return verdict
    if rpc is None:
        verdict.verdict = VERIFIED
        return verdict
    try:
        problem = _check_chain(bundle, rpc)
    except ChainRpcError as exc:
        verdict.verdict, verdict.step = UNCHECKED, "chain"
        verdict.message = f"the node could not be asked ({exc})"
        return verdict
    if problem is not None:
        verdict.step, verdict.message = "chain", problem
        return verdict
    verdict.passed.append("chain")
    verdict.verdict, verdict.chain_checked = VERIFIED, True
    return verdict


def verify_bundle_file(path: str, rpc: EvmRpc | None = None) -> Verdict:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return Verdict(path, REJECTED, "read", f"cannot read the file ({exc.strerror})")
    return verify_bundle_bytes(data, path, rpc)


def _step(verdict: Verdict, name: str, check: Callable[[], Any]) -> Any:
    try:
        result = check()
    except StepFailed:
        raise
    except (BundleFormatError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise StepFailed(name, str(exc) or type(exc).__name__) from None
    verdict.passed.append(name)
    return result


def _check_canonical(bundle: dict[str, Any], data: bytes) -> None:
    expected = encode_bundle(bundle)
    if data != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b),
            min(len(data), len(expected)),
        )
        raise ValueError(
            f"the file differs from the RFC 8785 form of its content at byte {at} "
            f"({len(data)} bytes, canonical form {len(expected)})"
        )


def _check_digest(bundle: dict[str, Any]) -> None:
    computed = bundle_digest(bundle)
    if computed != bundle[DIGEST_FIELD]:
        raise ValueError(
            f"{DIGEST_FIELD} is {bundle[DIGEST_FIELD]}, but the bundle's content hashes to "
            f"{computed}: a field was changed after the bundle was written"
        )


def _check_record_hash(record: dict[str, Any]) -> Any:
    text = record["canonicalPayload"]
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("canonicalPayload is not valid Unicode") from None
    computed = HASH_PREFIX + hashlib.sha256(raw).hexdigest()
    if computed != record["recordHash"]:
        raise ValueError(
            f"canonicalPayload hashes to {computed}, not to recordHash {record['recordHash']}"
        )
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"canonicalPayload is not JSON ({exc})") from None
    if canonical_json(payload) != raw:
        raise ValueError("canonicalPayload is not in RFC 8785 canonical form")
    return payload


def record_id_for(document_id: Any) -> str:
    """Certyo's recordId for a sanitized `_id`: a string as it is, an integer in decimal,
    anything else as its RFC 8785 JSON (docs/proof-bundle.md)."""
    if type(document_id) is str:
        return document_id
    if type(document_id) is int:
        return str(document_id)
    return canonical_json(document_id).decode("utf-8")


def _check_identity(document: dict[str, Any], payload: Any) -> None:
    if not isinstance(payload, dict) or "_id" not in payload:
        raise ValueError("the payload has no _id")
    if canonical_json(payload["_id"]) != canonical_json(document["id"]):
        raise ValueError(
            f"document.id is {_short(document['id'])}, but the payload's _id is "
            f"{_short(payload['_id'])}"
        )
    derived = record_id_for(payload["_id"])
    if derived != document["recordId"]:
        raise ValueError(
            f"document.recordId is {document['recordId']!r}, but the payload's _id gives "
            f"{derived!r}"
        )
    value: Any = payload
    for part in document["timestampField"].split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"the payload has no {document['timestampField']!r} field")
        value = value[part]
    if not isinstance(value, str):
        raise ValueError(f"the payload's {document['timestampField']!r} is not a timestamp")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"the payload's {document['timestampField']!r} ({value!r}) is not ISO 8601"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"the payload's {document['timestampField']!r} has no UTC offset")
    version = (moment - _EPOCH) // _ONE_MS
    if version != document["version"]:
        raise ValueError(
            f"document.version is {document['version']}, but the payload's "
            f"{document['timestampField']!r} ({value}) is version {version}"
        )


def _check_inclusion(bundle: dict[str, Any]) -> None:
    proof = bundle["inclusionProof"]
    leaf = bytes.fromhex(bundle["record"]["recordHash"][len(HASH_PREFIX) :])
    try:
        computed = root_from_inclusion_proof(
            proof["leafIndex"],
            proof["treeSize"],
            leaf,
            [bytes.fromhex(node) for node in proof["auditPath"]],
        )
    except InvalidProofError as exc:
        raise ValueError(f"the audit path is not a valid RFC 9162 proof: {exc}") from None
    if computed.hex() != proof["root"]:
        raise ValueError(
            f"the audit path (leaf {proof['leafIndex']} of {proof['treeSize']}) leads to root "
            f"{computed.hex()}, not to the bundle's root {proof['root']}"
        )


def _check_chain(bundle: dict[str, Any], rpc: EvmRpc) -> str | None:
    anchor = bundle["anchor"]
    result = check_anchor(
        rpc,
        root=bytes.fromhex(bundle["inclusionProof"]["root"]),
        transaction_hash=anchor["transactionHash"],
        block_number=anchor["blockNumber"],
        chain_id=anchor["chainId"],
    )
    return result.problem


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode("utf-8")
    return text if len(text) <= 80 else text[:80] + "…"
