"""The record mapping: one MongoDB document version as a Certyo ingest record.

Every capture mode maps documents through here, so a version has one recordId, one
recordVersion and one idempotency key whichever way it was read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from bson import Int64, ObjectId

from certyo_dagster.prove.hashing import canonical_json
from certyo_dagster.sanitize.documents import (
    DEFAULT_MAX_DEPTH,
    PoisonDocumentError,
    _object,
    _text,
    _type_name,
    iso_utc,
    sanitize_value,
    version_ms,
)
from certyo_dagster.settings import CollectionSpec

DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
MAX_IDEMPOTENCY_KEY_BYTES = 200


def record_id_of(doc_id: Any) -> str:
    """Certyo `recordId` of a MongoDB `_id`.

    Caveat: distinct `_id`s of different types can share a recordId (string "1" and int 1,
    an ObjectId and its hex string, float 1.0 and int 1). docs/sanitize.md explains why this
    is accepted.
    """
    cls = type(doc_id)
    if cls is str:
        return _text(doc_id)
    if cls is ObjectId:
        return str(doc_id)
    if cls is int or cls is Int64:
        return str(int(doc_id))
    sanitized = sanitize_value(doc_id)
    if type(sanitized) is str:
        return sanitized
    if type(sanitized) is int:
        return str(sanitized)
    return canonical_json(sanitized).decode("utf-8")


def idempotency_key(spec: CollectionSpec, record_id: str, version: int) -> str:
    """Certyo idempotency key of one document version.

    It includes the version (pitfall 4), so a second update on the same day is a new key and
    a retry of the same version, at any time, is the same key. Keys over 200 UTF-8 bytes carry
    a SHA-256 of the recordId instead of the recordId itself.
    """
    key = f"mongo:{spec.database}.{spec.collection}:{record_id}:{version}"
    if len(key) > MAX_IDEMPOTENCY_KEY_BYTES or (
        not key.isascii() and len(key.encode("utf-8")) > MAX_IDEMPOTENCY_KEY_BYTES
    ):
        digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()
        key = f"mongo:{spec.database}.{spec.collection}:sha256-{digest}:{version}"
    return key


def _timestamp_of(doc: Mapping, spec: CollectionSpec) -> datetime:
    field_path = spec.timestamp_field
    if type(doc) is dict and "." not in field_path:
        value = doc.get(field_path)
        if type(value) is datetime:
            return value
    value: Any = doc
    for part in field_path.split(".") if "." in field_path else (field_path,):
        if not isinstance(value, Mapping) or part not in value:
            raise PoisonDocumentError(
                "missing_timestamp",
                f"the timestamp field is missing (collection {spec.collection} versions "
                "documents by it)",
                list(reversed(field_path.split("."))),
            )
        value = value[part]
    if not isinstance(value, datetime):
        raise PoisonDocumentError(
            "bad_timestamp",
            f"the timestamp field must hold a date, found {_type_name(value)}",
            list(reversed(field_path.split("."))),
        )
    return value


def document_version(doc: Mapping, spec: CollectionSpec) -> int:
    """The recordVersion (epoch ms of the timestamp field) without sanitizing the document.

    Lets the ingest path skip versions Certyo already acknowledged before paying for the walk.
    """
    return version_ms(_timestamp_of(doc, spec))


def _record_parts(
    doc: Mapping, spec: CollectionSpec, max_payload_bytes: int
) -> tuple[str, datetime, dict, bytes]:
    """(recordId, timestamp, payload, payload JSON) of one document version."""
    if type(doc) is not dict and not isinstance(doc, Mapping):
        raise PoisonDocumentError(
            "unsupported_type", f"a document must be a mapping, got {_type_name(doc)}"
        )
    if "_id" not in doc:
        raise PoisonDocumentError("missing_id", "the document has no _id")
    try:
        record_id = record_id_of(doc["_id"])
    except PoisonDocumentError as exc:
        exc._reversed_path.append("_id")
        raise
    try:
        ts = _timestamp_of(doc, spec)
        # sanitize_document without its argument checks: `doc` is a mapping, the depth default.
        payload = _object(doc, DEFAULT_MAX_DEPTH, drop_certyo=True)
        payload_json = orjson.dumps(payload)
        check_payload_size(payload_json, max_payload_bytes)
    except PoisonDocumentError as exc:
        exc.record_id = record_id
        raise
    return record_id, ts, payload, payload_json


def check_payload_size(payload_json: bytes, max_payload_bytes: int) -> None:
    """PoisonDocumentError `too_large` when the payload's JSON exceeds the limit."""
    if len(payload_json) > max_payload_bytes:
        raise PoisonDocumentError(
            "too_large",
            f"the payload is {len(payload_json)} bytes as JSON, over the "
            f"{max_payload_bytes}-byte limit",
        )


def to_certyo_record(
    doc: Mapping,
    spec: CollectionSpec,
    tenant_id: str,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> dict:
    """The Certyo ingest record of one MongoDB document version. Raises PoisonDocumentError."""
    record_id, ts, payload, _ = _record_parts(doc, spec, max_payload_bytes)
    version = version_ms(ts)
    return {
        "tenantId": tenant_id,
        "database": spec.database,
        "collection": spec.collection,
        "recordId": record_id,
        "recordVersion": str(version),
        "operationType": "upsert",
        "sourceTimestamp": iso_utc(ts),
        "idempotencyKey": idempotency_key(spec, record_id, version),
        "recordPayload": payload,
    }


class EncodedRecord(NamedTuple):
    """A Certyo record as the JSON it is sent as, with the fields write-back needs."""

    record_id: str
    version: int | str  # epoch ms for polling, a change position for streams
    source_timestamp: str
    json: bytes

    def as_record(self) -> dict:
        return orjson.loads(self.json)


class CertyoRecordEncoder:
    """One collection's documents straight to the JSON of their Certyo records.

    The bytes equal `orjson.dumps(to_certyo_record(doc, spec, tenant_id))`, but the payload
    is encoded once (the size check reuses it) and the envelope's constant part is encoded
    once per collection, not once per record.
    """

    def __init__(
        self,
        spec: CollectionSpec,
        tenant_id: str,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.spec = spec
        self.max_payload_bytes = max_payload_bytes
        envelope = {"tenantId": tenant_id, "database": spec.database, "collection": spec.collection}
        self._head = orjson.dumps(envelope)[:-1] + b',"recordId":'

    def encode(self, doc: Mapping) -> EncodedRecord:
        """Raises PoisonDocumentError like `to_certyo_record`."""
        record_id, ts, _, payload_json = _record_parts(doc, self.spec, self.max_payload_bytes)
        version = version_ms(ts)
        source_timestamp = iso_utc(ts)  # digits and punctuation only: no JSON escaping
        body = b"".join(
            (
                self._head,
                orjson.dumps(record_id),
                b',"recordVersion":"%d","operationType":"upsert","sourceTimestamp":"' % version,
                source_timestamp.encode("ascii"),
                b'","idempotencyKey":',
                orjson.dumps(idempotency_key(self.spec, record_id, version)),
                b',"recordPayload":',
                payload_json,
                b"}",
            )
        )
        return EncodedRecord(record_id, version, source_timestamp, body)


# -- one mapping for every capture mode ----------------------------------------------------

OPERATION_TYPES = ("upsert", "insert", "update", "delete")
DELETED_MARKER = "_deleted"


def deleted_payload(doc_id: Any) -> dict:
    """The `recordPayload` of a delete: the `_id` and nothing else to attest."""
    return {"_id": sanitize_value(doc_id), DELETED_MARKER: True}


def bounded_key(prefix: str, record_id: str, position: str) -> str:
    """`<prefix>:<recordId>:<position>`, with the recordId as a SHA-256 when it is too long.

    The position is kept whole (a prefix of it could be shared by two changes).
    """
    key = f"{prefix}:{record_id}:{position}"
    if len(key) > MAX_IDEMPOTENCY_KEY_BYTES or (
        not key.isascii() and len(key.encode("utf-8")) > MAX_IDEMPOTENCY_KEY_BYTES
    ):
        digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()
        key = f"{prefix}:sha256-{digest}:{position}"
    return key


def encode_record(
    spec: CollectionSpec,
    tenant_id: str,
    *,
    doc_id: Any,
    operation: str,
    document: Mapping | None,
    source_time: datetime,
    version: str,
    idempotency_key: str,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> EncodedRecord:
    """The Certyo record of one document version, whichever capture mode read it.

    `document` None is a delete: its payload is `{"_id": <id>, "_deleted": true}`. The bytes
    have the same layout as `CertyoRecordEncoder.encode` (which keeps its own faster path for
    polling). Raises PoisonDocumentError with the recordId set.
    """
    if operation not in OPERATION_TYPES:
        raise ValueError(f"operationType must be one of {', '.join(OPERATION_TYPES)}")
    try:
        record_id = record_id_of(doc_id)
    except PoisonDocumentError as exc:
        exc._reversed_path.append("_id")
        raise
    try:
        if document is None:
            payload = deleted_payload(doc_id)
        else:
            if not isinstance(document, Mapping):
                raise PoisonDocumentError(
                    "unsupported_type", f"a document must be a mapping, got {_type_name(document)}"
                )
            payload = _object(document, DEFAULT_MAX_DEPTH, drop_certyo=True)
        payload_json = orjson.dumps(payload)
        check_payload_size(payload_json, max_payload_bytes)
    except PoisonDocumentError as exc:
        exc.record_id = record_id
        raise
    source_timestamp = iso_utc(source_time)
    envelope = orjson.dumps(
        {"tenantId": tenant_id, "database": spec.database, "collection": spec.collection}
    )
    body = b"".join(
        (
            envelope[:-1],
            b',"recordId":',
            orjson.dumps(record_id),
            b',"recordVersion":',
            orjson.dumps(version),
            b',"operationType":',
            orjson.dumps(operation),
            b',"sourceTimestamp":',
            orjson.dumps(source_timestamp),
            b',"idempotencyKey":',
            orjson.dumps(idempotency_key),
            b',"recordPayload":',
            payload_json,
            b"}",
        )
    )
    return EncodedRecord(record_id, version, source_timestamp, body)
