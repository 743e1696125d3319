"""Shipping: an ordered stream of encoded records to Certyo, acknowledged batch by batch in order.

Every capture mode hands its records to `Shipper.ship` in the order it read them, each with a
context of its own (a document, a resume token, a Kafka offset). The shipper groups them into
batches and sends each batch by the shipping rules:

- a batch of at most SINGLE_ENDPOINT_MAX records goes one by one to the single-record
  endpoint (reference rule 2); a larger one to the bulk endpoint, in chunks of at most
  BULK_MAX_RECORDS records and BULK_MAX_BYTES of body;
- a chunk refused with 413 is halved until it fits (a gateway in front of Certyo may take
  less than we send); a chunk refused because of some of its records is sent again without
  them, and those records come back rejected;
- up to `max_in_flight` batches are in flight at once on the client's pooled session.

Batches come back in stream order whatever order their requests finish in, so a caller that
advances its saved position over each batch it receives never passes a record Certyo has not
acknowledged (pitfalls 1 and 7). The first batch that fails ends the stream with
`ShippingFailedError`. Memory holds at most `max_in_flight + 1` batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import orjson

from certyo_dagster.sanitize.records import EncodedRecord
from certyo_dagster.ship.errors import CertyoError, CertyoValidationError

# Reference rule 2: more records than this go to the bulk endpoint.
SINGLE_ENDPOINT_MAX = 10
# The bulk endpoint's limit per call.
BULK_MAX_RECORDS = 1000
# Our own limit on one bulk body, well under what Certyo accepts, so a chunk of large records
# is split before a gateway has to refuse it.
BULK_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 4

# What a record's outcome can be.
ACCEPTED = "accepted"  # stored by Certyo now
REPLAYED = "replayed"  # stored before: Certyo answered with the idempotent replay
REJECTED = "rejected"  # refused as invalid; `rejection` says why (a dead letter)

# Failures that end a stream. Anything else is a bug and propagates unchanged.
SHIPPING_FAILURES: tuple[type[BaseException], ...] = (CertyoError, OSError)

C = TypeVar("C")


class ShipClient(Protocol):
    """What shipping needs from the Certyo client (`CertyoClient` is one)."""

    def ingest_record(self, record: dict) -> dict: ...

    def post_bulk_body(self, body: bytes, count: int) -> dict: ...


@dataclass(frozen=True)
class Checkpoint:
    """Ends the current batch; `position` comes back, in order, on the batch it closes.

    A capture mode sends one where its own position moves without a record to ship (a
    document already acknowledged, an event that maps to nothing), or where a batch should
    go out now rather than wait for more records. The shipper never looks inside `position`
    (which must not be None).
    """

    position: Any


class Shipped(NamedTuple, Generic[C]):
    """One record as Certyo answered it."""

    record: EncodedRecord
    context: C
    receipt: dict | None  # Certyo's receipt; None when rejected
    rejection: str | None  # Certyo's reason when rejected

    @property
    def outcome(self) -> str:
        if self.receipt is None:
            return REJECTED
        return REPLAYED if self.receipt.get("idempotencyReplayed") else ACCEPTED


@dataclass(frozen=True)
class ShippedBatch(Generic[C]):
    """A batch Certyo acknowledged: every record accepted, replayed or rejected.

    Parallel lists, one entry per record in stream order; iterate for `Shipped` records.
    `checkpoint` is the position of the `Checkpoint` that closed it, or None. `requests` is
    how many HTTP calls it took (each 413 halving and each resend is one more).
    """

    records: list[EncodedRecord]
    contexts: list[C]
    receipts: list[dict | None]  # Certyo's receipt; None where rejected
    rejections: dict[int, str]  # index → Certyo's reason, for the rejected records
    checkpoint: Any
    requests: int

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Shipped[C]]:
        rejections = self.rejections
        for i, (record, context, receipt) in enumerate(
            zip(self.records, self.contexts, self.receipts, strict=True)
        ):
            rejection = rejections[i] if receipt is None else None
            yield Shipped(record, context, receipt, rejection)


class ShippingFailedError(Exception):
    """A batch could not be shipped; nothing from it on was delivered in order.

    `delivered_batches` and `delivered_records` count what was acknowledged and delivered
    before it, and `last_checkpoint` is the last position delivered. `later_batches` were
    acknowledged by Certyo after the failed one: their records may be written back, but a
    saved position must not move over them. `cause` is the underlying error.
    """

    def __init__(
        self,
        cause: BaseException,
        *,
        delivered_batches: int,
        delivered_records: int,
        last_checkpoint: Any,
        later_batches: list[ShippedBatch],
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.delivered_batches = delivered_batches
        self.delivered_records = delivered_records
        self.last_checkpoint = last_checkpoint
        self.later_batches = later_batches


@dataclass
class _Answer:
    """What Certyo said about one batch, record by record."""

    receipts: list[dict | None]  # None where rejected
    rejected: dict[int, str]  # index → Certyo's reason
    requests: int


@dataclass
class _InFlight:
    records: list[EncodedRecord]
    contexts: list[Any]
    checkpoint: Any
    future: Future | None  # None: no records, only a position to hand back in order


class Shipper:
    """Ships record streams for one tenant through one client. `ship` may be called again
    after a stream ends; one stream at a time."""

    def __init__(
        self,
        client: ShipClient,
        tenant_id: str,
        *,
        batch_size: int = BULK_MAX_RECORDS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_request_bytes: int = BULK_MAX_BYTES,
    ) -> None:
        if not 1 <= batch_size <= BULK_MAX_RECORDS:
            raise ValueError(f"batch_size must be between 1 and {BULK_MAX_RECORDS}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if max_request_bytes < 1:
            raise ValueError("max_request_bytes must be at least 1")
        self.client = client
        self.tenant_id = tenant_id
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.max_request_bytes = max_request_bytes
        self._bulk_prefix = b'{"tenantId":' + orjson.dumps(tenant_id) + b',"records":['

    # -- the stream ----------------------------------------------------------------------------

    def ship(
        self, items: Iterable[tuple[EncodedRecord, C] | Checkpoint]
    ) -> Iterator[ShippedBatch[C]]:
        """Ship `(record, context)` pairs, in order; yield each batch once acknowledged.

        A batch closes at a `Checkpoint`, or when one more record would exceed `batch_size`,
        or at the end of `items`. Batches are yielded in the order they closed. If a batch
        fails, the batches still in flight are awaited and `ShippingFailedError` is raised
        in its place. If `items` itself raises, everything it handed over before is shipped and
        yielded first, then its error is raised again. Closing the generator early waits for
        the requests in flight and drops their answers.
        """
        queue: deque[_InFlight] = deque()
        in_flight = 0  # entries of `queue` with a request
        delivered_batches = delivered_records = 0
        last_checkpoint: Any = None
        pairs: list[tuple[EncodedRecord, C]] = []
        input_errors: list[Exception] = []
        batch_size, max_in_flight = self.batch_size, self.max_in_flight
        pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="certyo-ship")

        def close(checkpoint: Any) -> None:
            nonlocal pairs, in_flight
            records = [record for record, _ in pairs]
            future = pool.submit(self.ship_batch, records) if records else None
            queue.append(_InFlight(records, [c for _, c in pairs], checkpoint, future))
            if future is not None:
                in_flight += 1
            pairs = []

        def deliver() -> ShippedBatch:
            nonlocal in_flight, delivered_batches, delivered_records, last_checkpoint
            head = queue.popleft()
            if head.future is None:
                batch = ShippedBatch([], [], [], {}, head.checkpoint, 0)
            else:
                in_flight -= 1
                try:
                    answer = head.future.result()
                except SHIPPING_FAILURES as exc:
                    raise ShippingFailedError(
                        exc,
                        delivered_batches=delivered_batches,
                        delivered_records=delivered_records,
                        last_checkpoint=last_checkpoint,
                        later_batches=_acknowledged_later(queue),
                    ) from exc
                batch = _batch(head, answer)
            delivered_batches += 1
            delivered_records += len(batch.records)
            if batch.checkpoint is not None:
                last_checkpoint = batch.checkpoint
            return batch

        try:
            for item in _guarded(items, input_errors):
                if type(item) is not Checkpoint:
                    if len(pairs) < batch_size:
                        pairs.append(item)
                        continue
                    close(None)
                    pairs.append(item)
                else:
                    close(item.position)
                # Positions without records go out as soon as nothing is ahead of them;
                # otherwise wait for the oldest request only when all slots are taken.
                while queue and (queue[0].future is None or in_flight >= max_in_flight):
                    yield deliver()
            if pairs:
                close(None)
            while queue:
                yield deliver()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if input_errors:
            raise input_errors[0]

    # -- one batch (worker threads) ------------------------------------------------------------

    def ship_batch(self, records: list[EncodedRecord]) -> _Answer:
        """Send one batch by the shipping rules; Certyo's answer for each record, in order."""
        if len(records) <= SINGLE_ENDPOINT_MAX:
            return self._ship_single(records)
        receipts: list[dict | None] = []
        rejected: dict[int, str] = {}
        requests = 0
        for lo, hi in self.chunks(records):
            answer = self._post_chunk(records[lo:hi])
            requests += answer.requests
            receipts.extend(answer.receipts)
            rejected.update({lo + i: msg for i, msg in answer.rejected.items()})
        return _Answer(receipts, rejected, requests)

    def chunks(self, records: list[EncodedRecord]) -> Iterator[tuple[int, int]]:
        """Index ranges of at most BULK_MAX_RECORDS records and `max_request_bytes` each."""
        lo, size = 0, 0
        for i, record in enumerate(records):
            item_size = len(record.json)
            if i > lo and (i - lo >= BULK_MAX_RECORDS or size + item_size > self.max_request_bytes):
                yield lo, i
                lo, size = i, 0
            size += item_size + 1
        if lo < len(records):
            yield lo, len(records)

    def bulk_body(self, records: list[EncodedRecord]) -> bytes:
        """The bulk request body: the records' JSON joined, never encoded again."""
        return b"".join((self._bulk_prefix, b",".join([r.json for r in records]), b"]}"))

    def _ship_single(self, records: list[EncodedRecord]) -> _Answer:
        receipts: list[dict | None] = []
        rejected: dict[int, str] = {}
        for i, record in enumerate(records):
            try:
                receipts.append(self.client.ingest_record(record.as_record()))
            except CertyoValidationError as exc:
                receipts.append(None)
                rejected[i] = _validation_message(exc, None)
        return _Answer(receipts, rejected, len(records))

    def _post_chunk(self, records: list[EncodedRecord]) -> _Answer:
        if len(records) <= SINGLE_ENDPOINT_MAX:
            return self._ship_single(records)
        try:
            response = self.client.post_bulk_body(self.bulk_body(records), len(records))
            return _Answer(list(response["results"]), {}, 1)
        except CertyoValidationError as exc:
            if exc.status_code == 413:
                # Halve until it fits; a single record still too large is rejected.
                half = len(records) // 2
                left = self._post_chunk(records[:half])
                right = self._post_chunk(records[half:])
                merged = {**left.rejected, **{half + i: m for i, m in right.rejected.items()}}
                return _Answer(
                    left.receipts + right.receipts, merged, 1 + left.requests + right.requests
                )
            # The whole chunk was refused because of some records. Set those aside and send
            # the rest again; without per-record errors nothing can be attributed, so the
            # failure propagates.
            bad = {
                e["index"]: _validation_message(exc, e)
                for e in exc.errors
                if isinstance(e.get("index"), int) and 0 <= e["index"] < len(records)
            }
            if not bad:
                raise
            keep = [i for i in range(len(records)) if i not in bad]
            receipts: list[dict | None] = [None] * len(records)
            requests = 1
            if keep:
                answer = self._post_chunk([records[i] for i in keep])
                requests += answer.requests
                for j, i in enumerate(keep):
                    receipts[i] = answer.receipts[j]
                    if j in answer.rejected:
                        bad[i] = answer.rejected[j]
            return _Answer(receipts, bad, requests)


def _acknowledged_later(queue: deque[_InFlight]) -> list[ShippedBatch]:
    """After a failure: wait for what is still in flight and keep what Certyo acknowledged."""
    later: list[ShippedBatch] = []
    while queue:
        entry = queue.popleft()
        if entry.future is None:
            continue
        try:
            later.append(_batch(entry, entry.future.result()))
        except SHIPPING_FAILURES:
            continue
    return later


def _batch(entry: _InFlight, answer: _Answer) -> ShippedBatch:
    return ShippedBatch(
        entry.records,
        entry.contexts,
        answer.receipts,
        answer.rejected,
        entry.checkpoint,
        answer.requests,
    )


def _guarded(items: Iterable[Any], errors: list[Exception]) -> Iterator[Any]:
    """`items`, ending early (with the error noted) if iterating them raises."""
    try:
        yield from items
    except Exception as exc:  # the caller's read failed: ship what it handed over
        errors.append(exc)


def _validation_message(exc: CertyoValidationError, entry: dict | None) -> str:
    if entry:
        field_name = entry.get("field") or "record"
        return f"{field_name}: {entry.get('message', 'invalid')}"
    return str(exc)
