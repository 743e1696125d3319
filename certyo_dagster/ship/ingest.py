"""Ingestion: ship the unacknowledged versions of a time window to Certyo, then write back.

The window is streamed batch by batch: extract → sanitize → encode once → POST, with up to
`max_in_flight` bulk requests overlapping on the client's pooled session. Batches complete in
order, so write-backs and the acknowledged position only ever advance over records Certyo
accepted, and a failure of an earlier batch stops the position there even if later batches
succeeded (pitfalls 1 and 7). Memory holds at most `max_in_flight + 1` batches.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson
from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from certyo_dagster.capture.polling import VersionKey, iter_window_batches, timestamp_of
from certyo_dagster.fields import (
    ANCHORED,
    DEAD_LETTERS_COLLECTION,
    FAILURE_REASON,
    INGESTED_AT,
    PENDING,
    RECORD_HASH,
    REJECTED,
    STATUS,
    STATUSES,
    VERIFICATION_FIELDS,
    VERSION,
)
from certyo_dagster.sanitize.documents import PoisonDocumentError, iso_utc, version_ms
from certyo_dagster.sanitize.records import (
    CertyoRecordEncoder,
    EncodedRecord,
    document_version,
    record_id_of,
)
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.errors import CertyoError, CertyoValidationError
from certyo_dagster.source.mongo import bulk_update, upsert_with_retry

# Statuses that mean "this version was handled": shipped and accepted, anchored, rejected
# into the dead-letter queue, or failed verification. A plain re-run skips them; `force`
# re-sends them (Certyo answers with idempotent replays).
HANDLED_STATUSES = frozenset(STATUSES)
SINGLE_ENDPOINT_MAX = 10
BULK_MAX_RECORDS = 1000
PREVIEW_ROWS = 10
_UNSET_VERIFICATION = {f: "" for f in VERIFICATION_FIELDS}
_UNSET_FOR_REJECTED = {
    f: "" for f in VERIFICATION_FIELDS + (RECORD_HASH, INGESTED_AT) if f != FAILURE_REASON
}


class IngestClient(Protocol):
    """What ingestion needs from the Certyo client."""

    def ingest_record(self, record: dict) -> dict: ...

    def post_bulk_body(self, body: bytes, count: int) -> dict: ...


class IngestFailedError(Exception):
    """Certyo or MongoDB failed mid-window. Everything acknowledged before it was written back."""

    def __init__(self, message: str, report: IngestReport):
        super().__init__(message)
        self.report = report


@dataclass
class IngestReport:
    """Counts a person can read in the Dagster UI."""

    window_start: datetime
    window_end: datetime
    extracted: int = 0
    skipped_acknowledged: int = 0
    sent: int = 0
    accepted: int = 0
    replayed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    requests: int = 0
    min_ts: datetime | None = None
    max_ts: datetime | None = None
    elapsed_seconds: float = 0.0
    acknowledged_through: VersionKey | None = None
    preview: list[dict] = field(default_factory=list)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def docs_per_second(self) -> float:
        return self.extracted / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


def is_acknowledged(
    doc: dict, version: int, ts: Any, handoff_before: datetime | None = None
) -> bool:
    """True when this exact version was already handled.

    `handoff_before` is the position a predecessor (the reference poller) had reached when
    this project took over: versions before it that carry none of our fields were shipped by
    that predecessor and are not sent again.
    """
    if doc.get(VERSION) == version and doc.get(STATUS) in HANDLED_STATUSES:
        return True
    return (
        handoff_before is not None
        and VERSION not in doc
        and isinstance(ts, datetime)
        and ts < handoff_before
    )


@dataclass
class _Pending:
    """One shipped batch: the records in flight and what write-back needs for each."""

    future: Future
    docs: list[dict]
    timestamps: list[Any]  # each doc's timestamp value, the write-back's condition
    records: list[EncodedRecord]
    last_key: VersionKey


@dataclass
class _Shipped:
    results: list[dict | None]  # per record, None where Certyo rejected it
    rejected: dict[int, str]  # index → Certyo's validation message
    requests: int


class WindowIngestor:
    """Streams one window of one collection into Certyo. Not thread-safe; one per run."""

    def __init__(
        self,
        *,
        database: Any,
        spec: CollectionSpec,
        client: IngestClient,
        tenant_id: str,
        run_id: str,
        partition_key: str | None = None,
        force: bool = False,
        batch_size: int = 1000,
        max_in_flight: int = 4,
        max_payload_bytes: int = 1_000_000,
        max_request_bytes: int = 8 * 1024 * 1024,
        handoff_before: datetime | None = None,
        log: Callable[[str], None] | None = None,
        progress_every: int = 10,
    ):
        if not 1 <= batch_size <= BULK_MAX_RECORDS:
            raise ValueError(f"batch_size must be between 1 and {BULK_MAX_RECORDS}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.database = database
        self.collection = database[spec.collection]
        self.dead_letters = database[DEAD_LETTERS_COLLECTION]
        self.spec = spec
        self.client = client
        self.tenant_id = tenant_id
        self.run_id = run_id
        self.partition_key = partition_key
        self.force = force
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.max_payload_bytes = max_payload_bytes
        self.max_request_bytes = max_request_bytes
        self.handoff_before = handoff_before
        self.log = log or (lambda _msg: None)
        self.progress_every = progress_every
        self._open_letters = False
        self._bulk_prefix = b'{"tenantId":' + orjson.dumps(tenant_id) + b',"records":['
        self._encoder = CertyoRecordEncoder(spec, tenant_id, max_payload_bytes=max_payload_bytes)

    # -- the window loop -------------------------------------------------------------------

    def run(self, start: datetime, end: datetime) -> IngestReport:
        # A newer version accepted for a dead-lettered document resolves its letter. The
        # document usually still says `rejected`, but a whole-document replace drops our
        # fields, so while any letter of the collection is open, every accepted document is
        # checked (one query per batch; none at all when there are no open letters).
        self._open_letters = (
            self.dead_letters.find_one(
                {"collection": self.spec.collection, "resolvedAt": None}, {"_id": 1}
            )
            is not None
        )
        report = IngestReport(window_start=start, window_end=end)
        began = time.perf_counter()
        in_flight: deque[_Pending] = deque()
        failure: BaseException | None = None
        with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="certyo-ingest") as pool:
            try:
                for docs in iter_window_batches(
                    self.collection, self.spec, start, end, batch_size=self.batch_size
                ):
                    report.batches += 1
                    batch_key = self._key(docs[-1])
                    to_ship = self._prepare(docs, report)
                    if to_ship:
                        ship_docs, timestamps, records = to_ship
                        future = pool.submit(self._ship, records)
                        in_flight.append(
                            _Pending(future, ship_docs, timestamps, records, batch_key)
                        )
                    elif not in_flight:
                        report.acknowledged_through = batch_key
                    while len(in_flight) >= self.max_in_flight:
                        self._complete(in_flight.popleft(), report)
                    if report.batches % self.progress_every == 0:
                        self.log(
                            f"{self.spec.collection}: {report.extracted} documents read, "
                            f"{report.sent} sent, {report.accepted} accepted, "
                            f"{report.replayed} replayed so far"
                        )
            except (CertyoError, PyMongoError, OSError) as exc:
                failure = exc
            # Drain in order. After a failure, later batches that Certyo accepted are still
            # written back (they are acknowledged), but the acknowledged position stays put.
            while in_flight:
                pending = in_flight.popleft()
                try:
                    self._complete(pending, report, advance=failure is None)
                except (CertyoError, PyMongoError, OSError) as exc:
                    failure = failure or exc
        report.elapsed_seconds = time.perf_counter() - began
        if failure is not None:
            raise IngestFailedError(_describe(failure, report), report) from failure
        return report

    def _key(self, doc: dict) -> VersionKey:
        return VersionKey(timestamp_of(doc, self.spec), doc["_id"])

    # -- sanitize and encode (main thread) -------------------------------------------------

    def _prepare(
        self, docs: list[dict], report: IngestReport
    ) -> tuple[list[dict], list[Any], list[EncodedRecord]] | None:
        ship_docs: list[dict] = []
        timestamps: list[Any] = []
        records: list[EncodedRecord] = []
        encode = self._encoder.encode
        spec = self.spec
        field_name = spec.timestamp_field
        plain_field = "." not in field_name
        check_acknowledged = not self.force
        handoff_before = self.handoff_before
        # Counted in locals (this loop runs once per document) and stored even if a dead
        # letter's write fails half way through the batch.
        extracted = 0
        min_ts, max_ts = report.min_ts, report.max_ts
        try:
            for doc in docs:
                extracted += 1
                ts = (
                    doc.get(field_name)
                    if plain_field and type(doc) is dict
                    else timestamp_of(doc, spec)
                )
                if isinstance(ts, datetime):
                    if min_ts is None or ts < min_ts:
                        min_ts = ts
                    if max_ts is None or ts > max_ts:
                        max_ts = ts
                    version = version_ms(ts)  # what document_version reads from the same field
                else:
                    try:
                        version = document_version(doc, spec)
                    except PoisonDocumentError as exc:
                        self._dead_letter(doc, None, exc.reason, str(exc), "sanitize", report)
                        continue
                if (
                    check_acknowledged
                    # is_acknowledged is False without either of these; skip the call then.
                    and (VERSION in doc or handoff_before is not None)
                    and is_acknowledged(doc, version, ts, handoff_before)
                ):
                    report.skipped_acknowledged += 1
                    continue
                try:
                    # Encoded once, here; the bulk body only joins these bytes.
                    record = encode(doc)
                except PoisonDocumentError as exc:
                    self._dead_letter(doc, version, exc.reason, str(exc), "sanitize", report)
                    continue
                records.append(record)
                ship_docs.append(doc)
                timestamps.append(ts)
        finally:
            report.extracted += extracted
            report.min_ts, report.max_ts = min_ts, max_ts
        if not records:
            return None
        report.sent += len(records)
        return ship_docs, timestamps, records

    # -- shipping (worker threads) ---------------------------------------------------------

    def _ship(self, records: list[EncodedRecord]) -> _Shipped:
        if len(records) <= SINGLE_ENDPOINT_MAX:
            return self._ship_single(records)
        results: list[dict | None] = []
        rejected: dict[int, str] = {}
        requests = 0
        for lo, hi in self._chunks(records):
            chunk_results, chunk_rejected, n = self._post_chunk(records[lo:hi])
            requests += n
            results.extend(chunk_results)
            rejected.update({lo + i: msg for i, msg in chunk_rejected.items()})
        return _Shipped(results, rejected, requests)

    def _ship_single(self, records: list[EncodedRecord]) -> _Shipped:
        results: list[dict | None] = []
        rejected: dict[int, str] = {}
        for i, record in enumerate(records):
            try:
                results.append(self.client.ingest_record(record.as_record()))
            except CertyoValidationError as exc:
                results.append(None)
                rejected[i] = _validation_message(exc, None)
        return _Shipped(results, rejected, len(records))

    def _chunks(self, records: list[EncodedRecord]) -> Iterable[tuple[int, int]]:
        """Index ranges of at most 1000 records and `max_request_bytes` each."""
        lo, size = 0, 0
        for i, record in enumerate(records):
            item_size = len(record.json)
            if i > lo and (i - lo >= BULK_MAX_RECORDS or size + item_size > self.max_request_bytes):
                yield lo, i
                lo, size = i, 0
            size += item_size + 1
        if lo < len(records):
            yield lo, len(records)

    def _post_chunk(
        self, records: list[EncodedRecord]
    ) -> tuple[list[dict | None], dict[int, str], int]:
        if len(records) <= SINGLE_ENDPOINT_MAX:
            shipped = self._ship_single(records)
            return shipped.results, shipped.rejected, shipped.requests
        try:
            body = b"".join((self._bulk_prefix, b",".join([r.json for r in records]), b"]}"))
            response = self.client.post_bulk_body(body, len(records))
            return list(response["results"]), {}, 1
        except CertyoValidationError as exc:
            if exc.status_code == 413:
                # A gateway in front of Certyo may take less than our request size: halve
                # until it fits (a single record still too large becomes a dead letter).
                half = len(records) // 2
                left = self._post_chunk(records[:half])
                right = self._post_chunk(records[half:])
                merged = {**left[1], **{half + i: m for i, m in right[1].items()}}
                return left[0] + right[0], merged, 1 + left[2] + right[2]
            # The whole batch was refused because of some records. Set those aside as dead
            # letters and send the rest again; without per-record errors nothing can be
            # attributed, so the failure propagates.
            bad = {
                e["index"]: _validation_message(exc, e)
                for e in exc.errors
                if isinstance(e.get("index"), int) and 0 <= e["index"] < len(records)
            }
            if not bad:
                raise
            keep = [i for i in range(len(records)) if i not in bad]
            results: list[dict | None] = [None] * len(records)
            requests = 1
            if keep:
                sub_results, sub_bad, n = self._post_chunk([records[i] for i in keep])
                requests += n
                for j, i in enumerate(keep):
                    results[i] = sub_results[j]
                    if j in sub_bad:
                        bad[i] = sub_bad[j]
            return results, bad, requests

    # -- completion, write-back and dead letters (main thread) -----------------------------

    def _complete(self, pending: _Pending, report: IngestReport, advance: bool = True) -> None:
        shipped: _Shipped = pending.future.result()
        report.requests += shipped.requests
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        updates = []
        resolved_ids = []
        results = shipped.results
        preview = report.preview
        ts_field = self.spec.timestamp_field
        # Counted in locals (this loop runs once per document), stored even if a dead
        # letter's write fails half way through.
        accepted = replayed = 0
        try:
            for i, (doc, ts, record) in enumerate(
                zip(pending.docs, pending.timestamps, pending.records, strict=True)
            ):
                result = results[i]
                version = record.version
                if result is None:
                    reason = shipped.rejected.get(i, "rejected by Certyo")
                    self._dead_letter(doc, version, "certyo_validation", reason, "ingest", report)
                    continue
                was_replayed = result.get("idempotencyReplayed")
                if was_replayed:
                    replayed += 1
                else:
                    accepted += 1
                record_hash = result.get("recordHash")
                if len(preview) < PREVIEW_ROWS:
                    preview.append(
                        {
                            "recordId": record.record_id,
                            "recordVersion": str(version),
                            "sourceTimestamp": record.source_timestamp,
                            "recordHash": record_hash,
                            "replayed": bool(was_replayed),
                        }
                    )
                status = doc.get(STATUS)
                if (
                    status == ANCHORED
                    and doc.get(VERSION) == version
                    and doc.get(RECORD_HASH) == record_hash
                ):
                    continue  # a forced replay of an anchored version changes nothing
                if status == REJECTED or self._open_letters:
                    resolved_ids.append(doc["_id"])
                updates.append(
                    UpdateOne(
                        # Only if the document is still this version: a newer edit is never
                        # labelled with an older version's hash.
                        {"_id": doc["_id"], ts_field: ts},
                        {
                            "$set": {
                                STATUS: PENDING,
                                RECORD_HASH: record_hash,
                                VERSION: version,
                                INGESTED_AT: now,
                            },
                            "$unset": _UNSET_VERIFICATION,
                        },
                    )
                )
        finally:
            report.accepted += accepted
            report.replayed += replayed
        if updates:
            bulk_update(self.collection, updates, "write-back")
        if resolved_ids:
            self.dead_letters.update_many(
                {
                    "collection": self.spec.collection,
                    "documentId": {"$in": resolved_ids},
                    "resolvedAt": None,
                },
                {"$set": {"resolvedAt": now, "resolvedByRun": self.run_id}},
            )
        if advance:
            report.acknowledged_through = pending.last_key

    def _dead_letter(
        self,
        doc: dict,
        version: int | None,
        reason: str,
        message: str,
        stage: str,
        report: IngestReport,
    ) -> None:
        report.dead_lettered += 1
        report.dead_letter_reasons[reason] = report.dead_letter_reasons.get(reason, 0) + 1
        try:
            record_id = record_id_of(doc["_id"])
        except PoisonDocumentError:
            record_id = repr(doc["_id"])
        ts = timestamp_of(doc, self.spec)
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        letter_id = f"{self.spec.database}.{self.spec.collection}:{record_id}:{version}"
        upsert_with_retry(
            self.dead_letters,
            {"_id": letter_id},
            {
                "$set": {
                    "database": self.spec.database,
                    "collection": self.spec.collection,
                    "documentId": doc["_id"],
                    "recordId": record_id,
                    "version": version,
                    "timestamp": ts if isinstance(ts, datetime) else None,
                    "reason": reason,
                    "message": message[:2000],
                    "stage": stage,
                    "runId": self.run_id,
                    "partitionKey": self.partition_key,
                    "lastSeenAt": now,
                    "resolvedAt": None,
                },
                "$setOnInsert": {"firstSeenAt": now},
                "$inc": {"attempts": 1},
            },
        )
        if version is not None and isinstance(ts, datetime):
            # Mark the version as handled so the sensor's position can move past it; a later
            # edit gives a new version that is tried again.
            self.collection.update_one(
                {"_id": doc["_id"], self.spec.timestamp_field: ts},
                {
                    "$set": {
                        STATUS: REJECTED,
                        VERSION: version,
                        FAILURE_REASON: f"{reason}: {message[:300]}",
                    },
                    # The previous version's hash and proof do not describe this one.
                    "$unset": _UNSET_FOR_REJECTED,
                },
            )


def _validation_message(exc: CertyoValidationError, entry: dict | None) -> str:
    if entry:
        field_name = entry.get("field") or "record"
        return f"{field_name}: {entry.get('message', 'invalid')}"
    return str(exc)


def _describe(failure: BaseException, report: IngestReport) -> str:
    position = (
        f"up to {iso_utc(report.acknowledged_through.ts)}"
        if report.acknowledged_through and isinstance(report.acknowledged_through.ts, datetime)
        else "nothing"
    )
    cause = str(failure)
    if isinstance(failure, PyMongoError):
        # A driver message alone ("primary stepped down") does not say which system failed.
        cause = f"MongoDB failed: {type(failure).__name__}: {failure}"
    return (
        f"ingestion stopped: {cause}. Acknowledged in order: {position}; written back: "
        f"{report.accepted} accepted, {report.replayed} replayed, "
        f"{report.dead_lettered} dead-lettered; nothing unacknowledged was marked pending"
    )
