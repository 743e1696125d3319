"""Pure checks that turn a parsed request body into normalised Certyo records.

Nothing here does I/O: the app parses JSON, these functions say what is wrong with it in
terms a client developer can act on (every problem names the field), and the store only
ever sees records that passed.

The sandbox accepts everything the Certyo API reference documents, including what the
reference's own example programs send. Where it would be stricter than the reference (a
`sourceTimestamp` without a UTC offset, unknown or empty fields, very long idempotency keys),
it accepts the request and notes a leniency, which the app logs as a warning; with `strict`
those requests are refused instead, which our own tests turn on to hold our client to the
stricter form.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import orjson
import rfc8785

from certyo_dagster.prove.hashing import record_hash

MAX_BULK_RECORDS = 1000
MAX_IDEMPOTENCY_KEY_CHARS = 512
OPERATION_TYPES = ("upsert", "insert", "update", "delete")
REQUIRED_STRING_FIELDS = ("tenantId", "database", "collection", "recordId")
OPTIONAL_STRING_FIELDS = ("clientId", "recordVersion", "idempotencyKey")
RECORD_FIELDS = frozenset(
    (
        *REQUIRED_STRING_FIELDS,
        "recordPayload",
        *OPTIONAL_STRING_FIELDS,
        "operationType",
        "sourceTimestamp",
    )
)
DEFAULT_RECORD_VERSION = "1"


@dataclass(frozen=True)
class FieldError:
    """One problem with one field; `index` is the record's position in a bulk call."""

    field: str
    message: str
    index: int | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "message": self.message}
        if self.index is not None:
            out = {"index": self.index, **out}
        return out


@dataclass
class ApiError(Exception):
    """An HTTP error response with the sandbox's uniform JSON error body."""

    status: int
    code: str
    message: str
    errors: list[FieldError] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": self.message,
            "errors": [e.as_json() for e in self.errors],
        }


@dataclass(frozen=True)
class ValidRecord:
    """A record that passed validation, with the values the store needs precomputed.

    `fields` is the record exactly as it will be stored and returned by queries (request
    fields, unknown fields refused, `recordVersion` defaulted). `fingerprint` identifies the
    canonical record for idempotency: equal records give equal fingerprints whatever their
    key order or number spelling.
    """

    fields: dict[str, Any]
    record_hash: str
    fingerprint: bytes

    @property
    def idempotency_key(self) -> str | None:
        return self.fields.get("idempotencyKey")


Leniencies = Counter  # what was accepted beyond our stricter reading, by description

LENIENT_NAIVE_TIMESTAMP = "sourceTimestamp without a UTC offset (read as UTC)"
LENIENT_DATE_TIMESTAMP = "sourceTimestamp that is a date without a time (read as 00:00 UTC)"
LENIENT_UNKNOWN_FIELD = "unknown record field {name!r} (ignored)"
LENIENT_EMPTY_FIELD = "empty {name} (treated as absent)"
LENIENT_LONG_KEY = f"idempotencyKey longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters"


def validate_record(
    raw: Any,
    *,
    tenant: str,
    index: int | None = None,
    inherited_tenant: str | None = None,
    strict: bool = False,
    leniencies: Leniencies | None = None,
) -> tuple[ValidRecord | None, list[FieldError], bool]:
    """Check one record. Returns (record or None, errors, tenant_mismatch).

    `inherited_tenant` is the bulk envelope's tenantId, used when a record omits its own.
    `tenant_mismatch` is True when the only problem is a tenantId other than the key's,
    which the caller answers with 403 rather than 400. Without `strict`, what the reference
    allows but our stricter reading would refuse is accepted and counted in `leniencies`.
    """
    errors: list[FieldError] = []
    noted = leniencies if leniencies is not None else Counter()

    def fail(name: str, message: str) -> None:
        prefix = "" if index is None else f"records[{index}]."
        errors.append(FieldError(prefix + name, message, index))

    def lenient(name: str, message: str, leniency: str) -> None:
        """Refuse under `strict`; otherwise accept and note it."""
        if strict:
            fail(name, message)
        else:
            noted[leniency] += 1

    if not isinstance(raw, dict):
        where = "body" if index is None else f"records[{index}]"
        message = f"a record must be a JSON object, got {_json_type(raw)}"
        return None, [FieldError(where, message, index)], False

    if not RECORD_FIELDS.issuperset(raw):
        for name in raw:
            if name not in RECORD_FIELDS:
                lenient(
                    name,
                    f"unknown field {name!r}; allowed: {', '.join(sorted(RECORD_FIELDS))}",
                    LENIENT_UNKNOWN_FIELD.format(name=name),
                )

    record: dict[str, Any] = {}
    for name in REQUIRED_STRING_FIELDS:
        value = raw.get(name)
        if name == "tenantId" and value is None and inherited_tenant is not None:
            value = inherited_tenant
        if value is None:
            fail(name, f"{name} is required")
        elif not isinstance(value, str):
            fail(name, f"{name} must be a string, got {_json_type(value)}")
        elif not value:
            fail(name, f"{name} must not be empty")
        else:
            record[name] = value

    payload = raw.get("recordPayload")
    if "recordPayload" not in raw or payload is None:
        fail("recordPayload", "recordPayload is required")
    elif not isinstance(payload, dict):
        fail("recordPayload", f"recordPayload must be a JSON object, got {_json_type(payload)}")

    for name in OPTIONAL_STRING_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            fail(name, f"{name} must be a string, got {_json_type(value)}")
        elif not value:
            lenient(
                name, f"{name} must not be empty when given", LENIENT_EMPTY_FIELD.format(name=name)
            )
        else:
            if name == "idempotencyKey" and len(value) > MAX_IDEMPOTENCY_KEY_CHARS:
                lenient(
                    name,
                    f"idempotencyKey is longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                    LENIENT_LONG_KEY,
                )
            record[name] = value
    record.setdefault("recordVersion", DEFAULT_RECORD_VERSION)

    operation = raw.get("operationType")
    if operation is not None:
        if operation not in OPERATION_TYPES:
            fail(
                "operationType",
                f"operationType must be one of {', '.join(OPERATION_TYPES)}, got {operation!r}",
            )
        else:
            record["operationType"] = operation

    timestamp = raw.get("sourceTimestamp")
    if timestamp is not None:
        problem = timestamp_problem(timestamp)
        if problem:
            fail("sourceTimestamp", problem)
        else:
            leniency = timestamp_leniency(timestamp)
            if leniency is not None:
                lenient("sourceTimestamp", strict_timestamp_message(timestamp), leniency)
            record["sourceTimestamp"] = timestamp  # kept exactly as sent

    digest = ""
    if isinstance(payload, dict):
        try:
            digest = record_hash(payload)
        except (rfc8785.CanonicalizationError, RecursionError, TypeError, ValueError) as exc:
            fail("recordPayload", f"recordPayload is not I-JSON: {exc}")
        else:
            record["recordPayload"] = payload

    if errors:
        return None, errors, False
    if record["tenantId"] != tenant:
        fail("tenantId", "tenantId does not belong to this API key")
        return None, errors, True
    ordered = {name: record[name] for name in _FIELD_ORDER if name in record}
    return ValidRecord(ordered, digest, record_fingerprint(ordered, digest)), [], False


_FIELD_ORDER = (
    "tenantId",
    "database",
    "collection",
    "recordId",
    "recordVersion",
    "operationType",
    "sourceTimestamp",
    "clientId",
    "idempotencyKey",
    "recordPayload",
)


def record_fingerprint(fields: dict[str, Any], payload_hash: str) -> bytes:
    """Digest of the canonical record: envelope fields plus the payload's RFC 8785 hash.

    A JSON array of the fields in a fixed order is unambiguous and cheaper than sorting.
    """
    envelope = [fields.get(name) for name in _FIELD_ORDER[:-1]]
    envelope.append(payload_hash)
    return hashlib.sha256(orjson.dumps(envelope)).digest()


def source_time(value: str) -> datetime:
    """The instant an ISO 8601 `sourceTimestamp` names; no offset means UTC.

    Raises ValueError when `value` is not ISO 8601 (a date, or a date and time).
    """
    text = value.strip()
    if "T" not in text and " " not in text:
        day = date.fromisoformat(text)
        return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    if text.endswith(("Z", "z")):  # Python 3.10's fromisoformat does not read "Z"
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def timestamp_problem(value: Any) -> str | None:
    """Why `value` is not an ISO 8601 timestamp at all, or None."""
    if not isinstance(value, str):
        return f"sourceTimestamp must be an ISO 8601 string, got {_json_type(value)}"
    try:
        source_time(value)
    except ValueError:
        return f"sourceTimestamp is not ISO 8601: {value!r}"
    return None


def timestamp_leniency(value: str) -> str | None:
    """The leniency an ISO 8601 `value` needs (no explicit offset, or no time), or None."""
    text = value.strip()
    if "T" not in text and " " not in text:
        return LENIENT_DATE_TIMESTAMP
    if text.endswith(("Z", "z")):
        return None
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        return LENIENT_NAIVE_TIMESTAMP
    return None


def strict_timestamp_message(value: str) -> str:
    return f"sourceTimestamp must carry a UTC offset such as 'Z' or '+00:00', got {value!r}"


def bulk_envelope(body: Any, tenant: str) -> tuple[str, list[Any]]:
    """The bulk body's (tenantId, records), or ApiError naming what is wrong with it."""
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "invalid_body",
            f"body must be a JSON object, got {_json_type(body)}",
            [FieldError("body", "must be a JSON object with tenantId and records")],
        )
    unknown = sorted(set(body) - {"tenantId", "records"})
    if unknown:
        raise ApiError(
            400,
            "validation_failed",
            f"unknown field {unknown[0]!r} in bulk body; allowed: records, tenantId",
            [FieldError(name, "unknown field") for name in unknown],
        )
    envelope_tenant = body.get("tenantId")
    if not isinstance(envelope_tenant, str) or not envelope_tenant:
        raise ApiError(
            400,
            "validation_failed",
            "tenantId is required and must be a non-empty string",
            [FieldError("tenantId", "required non-empty string")],
        )
    if envelope_tenant != tenant:
        raise ApiError(
            403,
            "tenant_forbidden",
            "tenantId does not belong to this API key",
            [FieldError("tenantId", "tenantId does not belong to this API key")],
        )
    records = body.get("records")
    if not isinstance(records, list):
        raise ApiError(
            400,
            "validation_failed",
            f"records must be a JSON array, got {_json_type(records)}",
            [FieldError("records", "required array of records")],
        )
    if not records:
        raise ApiError(
            400,
            "validation_failed",
            "records must hold at least one record",
            [FieldError("records", "empty")],
        )
    if len(records) > MAX_BULK_RECORDS:
        raise ApiError(
            413,
            "too_many_records",
            f"records holds {len(records)} records; a bulk call accepts at most "
            f"{MAX_BULK_RECORDS}, split it into several calls",
            [FieldError("records", f"more than {MAX_BULK_RECORDS} records")],
        )
    return envelope_tenant, records


def validate_bulk(
    records: list[Any],
    tenant: str,
    *,
    strict: bool = False,
    leniencies: Leniencies | None = None,
) -> list[ValidRecord]:
    """All records valid, or ApiError listing every bad record by index (nothing accepted)."""
    valid: list[ValidRecord] = []
    errors: list[FieldError] = []
    forbidden = False
    for i, raw in enumerate(records):
        record, record_errors, mismatch = validate_record(
            raw,
            tenant=tenant,
            index=i,
            inherited_tenant=tenant,
            strict=strict,
            leniencies=leniencies,
        )
        if record is None:
            errors.extend(record_errors)
            forbidden = forbidden or mismatch
        else:
            valid.append(record)
    if errors:
        bad = sorted({e.index for e in errors if e.index is not None})
        shown = ", ".join(str(i) for i in bad[:20]) + (", ..." if len(bad) > 20 else "")
        first = errors[0]
        if forbidden and all(e.field.endswith("tenantId") for e in errors):
            raise ApiError(
                403,
                "tenant_forbidden",
                f"records at index {shown} carry a tenantId that does not belong to this API key",
                errors,
            )
        raise ApiError(
            400,
            "validation_failed",
            f"{len(bad)} of {len(records)} records are invalid (index {shown}); "
            f"nothing was accepted. First problem: {first.field}: {first.message}",
            errors,
        )
    return valid


def validate_single(
    body: Any, tenant: str, *, strict: bool = False, leniencies: Leniencies | None = None
) -> ValidRecord:
    """The one record of `POST /api/v1/records`, or ApiError naming the bad fields."""
    record, errors, mismatch = validate_record(
        body, tenant=tenant, strict=strict, leniencies=leniencies
    )
    if record is not None:
        return record
    if mismatch:
        raise ApiError(403, "tenant_forbidden", errors[0].message, errors)
    first = errors[0]
    raise ApiError(400, "validation_failed", f"{first.field}: {first.message}", errors)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
