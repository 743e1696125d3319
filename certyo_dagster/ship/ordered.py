"""Ship encoded records to Certyo strictly in order and say what happened to each.

The change-stream capture ships through this one function, so its order guarantee (a
record is acknowledged only after every record before it) lives in one place. Ten records
or fewer go to the single-record endpoint one by one, more go in bulk requests of at most
1000 records and `max_request_bytes`.

A record Certyo refuses as invalid is `rejected` (a dead letter); one whose idempotency key
was already used for another payload is `recorded`: Certyo stored that change before, when
`updateLookup` read another state of the document. Anything else (outage, 429 after
retries, auth) stops shipping: `ShipStoppedError.acks` holds the acknowledged prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import orjson

from certyo_dagster.capture.change_events import Ack
from certyo_dagster.sanitize.records import EncodedRecord
from certyo_dagster.ship.errors import (
    CertyoError,
    CertyoIdempotencyConflictError,
    CertyoValidationError,
)
from certyo_dagster.ship.ingest import BULK_MAX_RECORDS, SINGLE_ENDPOINT_MAX

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


class OrderedClient(Protocol):
    def ingest_record(self, record: dict) -> dict: ...

    def post_bulk_body(self, body: bytes, count: int) -> dict: ...


class ShipStoppedError(Exception):
    """Certyo failed part way; `acks` covers records 0..len(acks)-1, in order."""

    def __init__(self, cause: CertyoError, acks: list[Ack], requests: int):
        super().__init__(str(cause))
        self.cause = cause
        self.acks = acks
        self.requests = requests


def _ack(index: int, result: dict) -> Ack:
    status = "replayed" if result.get("idempotencyReplayed") else "accepted"
    return Ack(index, status, record_hash=result.get("recordHash"))


def _problem(exc: CertyoValidationError, entry: dict | None) -> tuple[str, str]:
    if entry:
        message = f"{entry.get('field') or 'record'}: {entry.get('message', 'invalid')}"
    else:
        message = str(exc)
    conflict = isinstance(exc, CertyoIdempotencyConflictError) and (
        entry is None or "idempotencyKey" in str(entry.get("field", ""))
    )
    return ("recorded" if conflict else "rejected"), message


def ship_in_order(
    client: OrderedClient,
    tenant_id: str,
    records: Sequence[EncodedRecord],
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> tuple[list[Ack], int]:
    """(one Ack per record, in order; requests made). Raises ShipStoppedError."""
    acks: list[Ack] = []
    requests = 0
    prefix = b'{"tenantId":' + orjson.dumps(tenant_id) + b',"records":['
    try:
        if len(records) <= SINGLE_ENDPOINT_MAX:
            requests += _single(client, records, range(len(records)), acks)
            return acks, requests
        for lo, hi in _chunks(records, max_request_bytes):
            requests += _bulk(client, prefix, records, lo, hi, acks)
    except CertyoError as exc:
        raise ShipStoppedError(exc, acks, max(requests, len(acks))) from exc
    return acks, requests


def _single(
    client: OrderedClient, records: Sequence[EncodedRecord], indexes: Sequence[int], acks: list[Ack]
) -> int:
    for i in indexes:
        try:
            acks.append(_ack(i, client.ingest_record(records[i].as_record())))
        except CertyoValidationError as exc:
            status, message = _problem(exc, None)
            acks.append(Ack(i, status, reason=message))
    return len(indexes)


def _chunks(records: Sequence[EncodedRecord], max_bytes: int) -> list[tuple[int, int]]:
    chunks = []
    lo, size = 0, 0
    for i, record in enumerate(records):
        if i > lo and (i - lo >= BULK_MAX_RECORDS or size + len(record.json) > max_bytes):
            chunks.append((lo, i))
            lo, size = i, 0
        size += len(record.json) + 1
    if lo < len(records):
        chunks.append((lo, len(records)))
    return chunks


def _bulk(
    client: OrderedClient,
    prefix: bytes,
    records: Sequence[EncodedRecord],
    lo: int,
    hi: int,
    acks: list[Ack],
    indexes: list[int] | None = None,
) -> int:
    """Ship records[lo:hi] (or the given indexes); append their acks in index order."""
    wanted = indexes if indexes is not None else list(range(lo, hi))
    if len(wanted) <= SINGLE_ENDPOINT_MAX:
        return _single(client, records, wanted, acks)
    body = b"".join((prefix, b",".join([records[i].json for i in wanted]), b"]}"))
    try:
        response = client.post_bulk_body(body, len(wanted))
    except CertyoValidationError as exc:
        if exc.status_code == 413:
            half = len(wanted) // 2
            return (
                1
                + _bulk(client, prefix, records, 0, 0, acks, wanted[:half])
                + _bulk(client, prefix, records, 0, 0, acks, wanted[half:])
            )
        bad = {
            e["index"]: e
            for e in exc.errors
            if isinstance(e.get("index"), int) and 0 <= e["index"] < len(wanted)
        }
        if not bad:
            raise
        # Refused because of some records: set those aside and send the rest again, then
        # merge so the acks stay in order.
        settled = {}
        for j, entry in bad.items():
            status, message = _problem(exc, entry)
            settled[wanted[j]] = Ack(wanted[j], status, reason=message)
        rest = [i for j, i in enumerate(wanted) if j not in bad]
        sub: list[Ack] = []
        requests = 1
        if rest:
            requests += _bulk(client, prefix, records, 0, 0, sub, rest)
        merged = {a.index: a for a in sub} | settled
        acks.extend(merged[i] for i in wanted)
        return requests
    for i, result in zip(wanted, response["results"], strict=True):
        acks.append(_ack(i, result))
    return 1
