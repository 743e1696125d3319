"""Ship encoded records to Certyo strictly in order and say what happened to each.

The change-stream capture ships through this one function, so its order guarantee (a
record is acknowledged only after every record before it) lives in one place. The shipping
rules themselves (single endpoint or bulk, chunking, 413 halving) are the shared `Shipper`'s,
run one request at a time so an acknowledgement never overtakes an earlier record.

A record Certyo refuses as invalid is `rejected` (a dead letter); one whose idempotency key
was already used for another payload is `recorded`: Certyo stored that change before, when
`updateLookup` read another state of the document. Anything else (outage, 429 after
retries, auth) stops shipping: `ShipStoppedError.acks` holds the acknowledged prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

from certyo_dagster.capture.change_events import Ack
from certyo_dagster.sanitize.records import EncodedRecord
from certyo_dagster.ship.errors import CertyoError
from certyo_dagster.ship.shipping import (
    BULK_MAX_BYTES,
    REJECTED,
    ShipClient,
    Shipper,
    ShippingFailedError,
)

DEFAULT_MAX_REQUEST_BYTES = BULK_MAX_BYTES


class ShipStoppedError(Exception):
    """Certyo failed part way; `acks` covers records 0..len(acks)-1, in order."""

    def __init__(self, cause: BaseException, acks: list[Ack], requests: int):
        super().__init__(str(cause))
        self.cause = cause
        self.acks = acks
        self.requests = requests


def _ack(index: int, outcome: str, receipt: dict | None, rejection: str | None) -> Ack:
    if outcome == REJECTED:
        # A reused idempotency key with another payload: Certyo stored that change before,
        # when `updateLookup` read another state of the document.
        recorded = "idempotencyKey" in (rejection or "")
        return Ack(index, "recorded" if recorded else "rejected", reason=rejection)
    return Ack(index, outcome, record_hash=(receipt or {}).get("recordHash"))


def ship_in_order(
    client: ShipClient,
    tenant_id: str,
    records: Sequence[EncodedRecord],
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> tuple[list[Ack], int]:
    """(one Ack per record, in order; requests made). Raises ShipStoppedError."""
    shipper = Shipper(client, tenant_id, max_in_flight=1, max_request_bytes=max_request_bytes)
    acks: list[Ack] = []
    requests = 0
    try:
        for batch in shipper.ship((record, i) for i, record in enumerate(records)):
            requests += batch.requests
            for shipped in batch:
                acks.append(
                    _ack(shipped.context, shipped.outcome, shipped.receipt, shipped.rejection)
                )
    except ShippingFailedError as exc:
        cause = exc.cause if isinstance(exc.cause, CertyoError) else exc
        raise ShipStoppedError(cause, acks, max(requests + 1, len(acks))) from exc
    return acks, requests
