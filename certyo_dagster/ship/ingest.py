"""Polling ingestion: ship the unacknowledged versions of one time window, then write back.

The window loop of the polling capture mode. It reads the window in `(ts, _id)` order batch by
batch, skips versions already handled, dead-letters poison documents, encodes the rest once,
and hands them to the `Shipper`; each batch Certyo acknowledged comes back in order and is
written back. The reported position (`acknowledged_through`) only moves over batches that
were acknowledged in order, and a failure of an earlier batch stops it there even if later
batches succeeded (pitfalls 1 and 7).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from certyo_dagster.capture.polling import VersionKey, iter_window_batches, timestamp_of
from certyo_dagster.fields import (
    ANCHORED,
    DEAD_LETTERS_COLLECTION,
    REJECTED,
    STATUS,
    STATUSES,
    VERSION,
)
from certyo_dagster.sanitize.documents import PoisonDocumentError, iso_utc, version_ms
from certyo_dagster.sanitize.records import CertyoRecordEncoder, EncodedRecord, document_version
from certyo_dagster.ship.errors import CertyoError
from certyo_dagster.ship.shipping import Checkpoint, ShippedBatch, Shipper, ShippingFailedError
from certyo_dagster.ship.writeback import (
    dead_letter_upsert,
    pending_update,
    rejected_update,
    resolve_letters,
    unchanged_by_replay,
)
from certyo_dagster.source.mongo import bulk_update, bulk_upsert

# Statuses that mean "this version was handled": shipped and accepted, anchored, rejected
# into the dead-letter queue, or failed verification. A plain re-run skips them; `force`
# re-sends them (Certyo answers with idempotent replays).
HANDLED_STATUSES = frozenset(STATUSES)
PREVIEW_ROWS = 10

# A read, a write-back or a request that failed; anything else is a bug and propagates.
_RUN_FAILURES = (CertyoError, PyMongoError, OSError)


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


class WindowIngestor:
    """Streams one window of one collection into Certyo. Not thread-safe; one per run.

    `encoder` says which collection and tenant; `shipper` how records reach Certyo, and its
    `batch_size` is also how many documents are read at a time.
    """

    def __init__(
        self,
        *,
        database: Any,
        encoder: CertyoRecordEncoder,
        shipper: Shipper,
        run_id: str,
        partition_key: str | None = None,
        force: bool = False,
        handoff_before: datetime | None = None,
        log: Callable[[str], None] | None = None,
        progress_every: int = 10,
    ):
        self.spec = encoder.spec
        self.collection = database[self.spec.collection]
        self.dead_letters = database[DEAD_LETTERS_COLLECTION]
        self.encoder = encoder
        self.shipper = shipper
        self.run_id = run_id
        self.partition_key = partition_key
        self.force = force
        self.handoff_before = handoff_before
        self.log = log or (lambda _msg: None)
        self.progress_every = progress_every
        self._open_letters = False
        self._failure: BaseException | None = None

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
        self._failure = None
        report = IngestReport(window_start=start, window_end=end)
        began = time.perf_counter()
        shipped = self.shipper.ship(self._outgoing(start, end, report))
        try:
            for batch in shipped:
                # After a failure, batches still in flight are written back (Certyo has
                # them), but the acknowledged position stays put.
                landed = self._write_back(batch, report)
                if landed and self._failure is None and batch.checkpoint is not None:
                    report.acknowledged_through = batch.checkpoint
                del batch  # not held while the next batch is read and shipped
        except ShippingFailedError as exc:
            self._failed(exc.cause)
            for batch in exc.later_batches:
                self._write_back(batch, report)
        except _RUN_FAILURES as exc:  # reading the window or writing a dead letter
            self._failed(exc)
        finally:
            shipped.close()
        report.elapsed_seconds = time.perf_counter() - began
        if self._failure is not None:
            raise IngestFailedError(_describe(self._failure, report), report) from self._failure
        return report

    def _failed(self, exc: BaseException) -> None:
        self._failure = self._failure or exc

    def _outgoing(
        self, start: datetime, end: datetime, report: IngestReport
    ) -> Iterator[tuple[EncodedRecord, dict] | Checkpoint]:
        """The window's records to ship, with a checkpoint after each batch read."""
        for docs in iter_window_batches(
            self.collection, self.spec, start, end, batch_size=self.shipper.batch_size
        ):
            report.batches += 1
            last = docs[-1]
            yield from self._prepare(docs, report)
            yield Checkpoint(VersionKey(timestamp_of(last, self.spec), last["_id"]))
            if report.batches % self.progress_every == 0:
                self.log(
                    f"{self.spec.collection}: {report.extracted} documents read, "
                    f"{report.sent} sent, {report.accepted} accepted, "
                    f"{report.replayed} replayed so far"
                )
            if self._failure is not None:
                return  # read no further; what is in flight is still written back

    # -- sanitize and encode ---------------------------------------------------------------

    def _prepare(self, docs: list[dict], report: IngestReport) -> list[tuple[EncodedRecord, dict]]:
        """The batch's records to ship, each with its document as read."""
        outgoing: list[tuple[EncodedRecord, dict]] = []
        letters: list[UpdateOne] = []
        rejections: list[UpdateOne] = []
        encode = self.encoder.encode
        spec = self.spec
        field_name = spec.timestamp_field
        plain_field = "." not in field_name
        check_acknowledged = not self.force
        handoff_before = self.handoff_before
        # Counted in locals (this loop runs once per document), stored even if a dead
        # letter's write fails.
        extracted = sent = 0
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
                        self._dead_letter(
                            doc,
                            ts,
                            None,
                            exc.reason,
                            str(exc),
                            "sanitize",
                            report,
                            letters,
                            rejections,
                        )
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
                    self._dead_letter(
                        doc,
                        ts,
                        version,
                        exc.reason,
                        str(exc),
                        "sanitize",
                        report,
                        letters,
                        rejections,
                    )
                    continue
                outgoing.append((record, doc))
                sent += 1
        finally:
            report.extracted += extracted
            report.sent += sent
            report.min_ts, report.max_ts = min_ts, max_ts
        self._write_dead_letters(letters, rejections)
        return outgoing

    # -- write-back and dead letters -------------------------------------------------------

    def _write_back(self, batch: ShippedBatch[dict], report: IngestReport) -> bool:
        """Record what Certyo said about each record. False if MongoDB failed (noted)."""
        report.requests += batch.requests
        if not batch.records:
            return True
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        spec = self.spec
        updates: list[UpdateOne] = []
        letters: list[UpdateOne] = []
        rejections: list[UpdateOne] = []
        resolved_ids = []
        preview = report.preview
        # Counted in locals (this loop runs once per document).
        accepted = replayed = 0
        rejections_by_index = batch.rejections
        open_letters = self._open_letters
        field_name = spec.timestamp_field
        plain_field = "." not in field_name
        for i, (record, doc, receipt) in enumerate(
            zip(batch.records, batch.contexts, batch.receipts, strict=True)
        ):
            version = record.version
            # The value that was shipped: the write-back's condition.
            ts = doc.get(field_name) if plain_field else timestamp_of(doc, spec)
            if receipt is None:
                self._dead_letter(
                    doc,
                    ts,
                    version,
                    "certyo_validation",
                    rejections_by_index[i],
                    "ingest",
                    report,
                    letters,
                    rejections,
                )
                continue
            was_replayed = receipt.get("idempotencyReplayed")
            if was_replayed:
                replayed += 1
            else:
                accepted += 1
            record_hash = receipt.get("recordHash")
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
            if status == ANCHORED and unchanged_by_replay(doc, version, record_hash):
                continue
            if open_letters or status == REJECTED:
                resolved_ids.append(doc["_id"])
            updates.append(
                pending_update(
                    spec, doc["_id"], ts, version=version, record_hash=record_hash, ingested_at=now
                )
            )
        report.accepted += accepted
        report.replayed += replayed
        try:
            self._write_dead_letters(letters, rejections)
            if updates:
                bulk_update(self.collection, updates, "write-back")
            if resolved_ids:
                resolve = resolve_letters(spec, resolved_ids, run_id=self.run_id, now=now)
                bulk_update(self.dead_letters, [resolve], "dead-letter resolution")
        except (PyMongoError, OSError) as exc:
            self._failed(exc)
            return False
        return True

    def _dead_letter(
        self,
        doc: dict,
        ts: Any,
        version: int | None,
        reason: str,
        message: str,
        stage: str,
        report: IngestReport,
        letters: list[UpdateOne],
        rejections: list[UpdateOne],
    ) -> None:
        report.dead_lettered += 1
        report.dead_letter_reasons[reason] = report.dead_letter_reasons.get(reason, 0) + 1
        if not isinstance(ts, datetime):
            ts = timestamp_of(doc, self.spec)
        letters.append(
            dead_letter_upsert(
                self.spec,
                doc["_id"],
                ts,
                version=version,
                reason=reason,
                message=message,
                stage=stage,
                run_id=self.run_id,
                partition_key=self.partition_key,
                now=datetime.now(timezone.utc).replace(tzinfo=None),
            )
        )
        rejection = rejected_update(
            self.spec, doc["_id"], ts, version=version, reason=reason, message=message
        )
        if rejection is not None:
            rejections.append(rejection)

    def _write_dead_letters(self, letters: list[UpdateOne], rejections: list[UpdateOne]) -> None:
        # The letter first: a document is marked rejected only once its letter exists.
        if letters:
            bulk_upsert(self.dead_letters, letters, "dead letters")
        if rejections:
            bulk_update(self.collection, rejections, "dead-letter status")


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
