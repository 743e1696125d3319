"""Debezium capture: read change events from Kafka, ship them to Certyo in order, commit.

One run is one member of the collection's consumer group. It reads batches of messages from
the partitions the group gives it and, for each batch:
1. parses every message (certyo_dagster.capture.debezium): a change, a message to skip
   (tombstones, updates of our own `certyo_*` fields) or a poison message;
2. writes each poison message to `_certyo_dead_letters` with its topic, partition and offset;
3. ships the changes to Certyo in Kafka order and waits for every acknowledgement;
4. writes back `certyo_status: pending` with the record hash into documents still at the
   shipped version, so verify_<c>, anchoring_status and tamper_audit work as for polling;
5. only then commits, per partition, the offset after the batch's last message.

Up to `max_in_flight` batches are shipped at once while the next is read and parsed (steps 1
and 2), but steps 4 and 5 run strictly batch after batch in Kafka order: a batch is written
back and committed only once it and every batch before it were acknowledged, so a committed
offset never passes a message Certyo has not answered for.

While the group join is still under way (seconds on any broker), the run reads ahead: a
reader outside the group reads each partition from its committed offset, and those batches
are parsed and shipped (steps 1 and 3) but not yet written back or committed. On assignment,
a partition whose committed offset has not moved keeps them and is read on after them; any
other partition's batches are dropped from the run (see `_ReadAhead`).

A failure anywhere before step 5 commits nothing: the next run (or the member that takes the
partition over) reads the same messages again and Certyo answers with idempotent replays,
because each record's idempotency key comes from the change's source position, not from the
Kafka offset. Delivery is at-least-once into Certyo, exactly-once in what Certyo stores.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from pymongo import UpdateOne

from certyo_dagster.capture.debezium import (
    TOMBSTONE,
    Change,
    ChangeRecord,
    DebeziumPoisonError,
    Skip,
    encode_change,
    parse_message,
)
from certyo_dagster.fields import DEAD_LETTERS_COLLECTION
from certyo_dagster.sanitize.documents import PoisonDocumentError
from certyo_dagster.sanitize.records import DEFAULT_MAX_PAYLOAD_BYTES, record_id_of
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.shipping import DEFAULT_MAX_IN_FLIGHT, Shipper, ShippingFailedError
from certyo_dagster.ship.writeback import _UNSET_VERIFICATION
from certyo_dagster.source.kafka import KafkaResource, confluent_kafka
from certyo_dagster.source.mongo import bulk_update, upsert_with_retry

DEFAULT_MAX_MESSAGES = 10_000
DEFAULT_MAX_SECONDS = 60
DEFAULT_BATCH_SIZE = 500
# A run with no partitions assigned (another member owns them all) gives up after this.
DEFAULT_UNASSIGNED_SECONDS = 15.0
# Messages read, parsed and shipped while the group join is still under way (0: none).
DEFAULT_READ_AHEAD_MESSAGES = 50_000
DEAD_LETTER_STAGE = "debezium"
_MAX_RAW_CHARS = 10_000


class DebeziumIngestError(Exception):
    """Certyo, MongoDB or Kafka failed; nothing after the last committed offsets is committed."""

    def __init__(self, message: str, report: DebeziumReport):
        super().__init__(message)
        self.report = report


@dataclass
class DebeziumReport:
    """What one run did, for the Dagster UI."""

    topic: str
    group_id: str
    messages: int = 0
    changes: int = 0
    sent: int = 0
    accepted: int = 0
    replayed: int = 0
    tombstones: int = 0
    own_write_backs: int = 0
    dead_lettered: int = 0
    after_null_updates: int = 0
    written_back: int = 0
    batches: int = 0
    commits: int = 0
    failed_commits: int = 0
    rebalances: int = 0
    read_ahead: int = 0  # messages read while the group formed and kept on assignment
    read_ahead_dropped: int = 0  # read then, but their partition went elsewhere
    caught_up: bool = False
    elapsed_seconds: float = 0.0
    first_message_seconds: float | None = None  # from the start to the first message read
    first_assignment_seconds: float | None = None  # from the start to the group's assignment
    committed: dict[int, int] = field(default_factory=dict)  # partition → next offset
    operations: dict[str, int] = field(default_factory=dict)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


# -- shipping ----------------------------------------------------------------------------------


@dataclass
class Shipped:
    """Certyo's answer per record, in input order: a receipt, or None with the reason."""

    results: list[dict | None]
    rejected: dict[int, str]
    requests: int


def ship_in_order(client: Any, tenant_id: str, records: Sequence[ChangeRecord]) -> Shipped:
    """Ship records in order through the shared `Shipper` (single or bulk, chunking, 413
    halving), one request at a time.

    Returns when Certyo has answered for every record. A record Certyo refuses (400/422 for
    that record) comes back as None with the reason; any other failure raises CertyoError and
    the caller commits nothing of the batch.
    """
    results: list[dict | None] = []
    rejected: dict[int, str] = {}
    requests = 0
    shipper = Shipper(client, tenant_id, max_in_flight=1)
    try:
        for batch in shipper.ship((record, i) for i, record in enumerate(records)):
            requests += batch.requests
            for shipped in batch:
                results.append(shipped.receipt)
                if shipped.receipt is None:
                    rejected[shipped.context] = shipped.rejection or "rejected by Certyo"
    except ShippingFailedError as exc:
        raise exc.cause from None
    return Shipped(results, rejected, requests)


@dataclass
class _Batch:
    """Messages read together: shipped, written back and committed as one."""

    messages: list
    items: list[_Item] = field(default_factory=list)
    to_ship: list[_Item] = field(default_factory=list)
    records: list[ChangeRecord] = field(default_factory=list)
    future: Future | None = None
    # Read ahead of the group join, for partitions this run was then not given: shipped
    # (Certyo answers their owner with replays) but never written back or committed here.
    dropped: set[int] = field(default_factory=set)
    slim: bool = False  # see _slim


# What write-back and the counts read of a receipt.
_RECEIPT_FIELDS = ("recordHash", "idempotencyReplayed")


def _slim(batch: _Batch) -> None:
    """Of a batch shipped while the group forms, keep only what its write-back and commit
    need: read-ahead holds up to `read_ahead_messages` of them, and whole messages, documents
    and receipts would take ~12 KB each."""
    shipped = batch.future.result() if batch.future is not None else None
    if shipped is not None:
        rejected = set()
        for i, receipt in enumerate(shipped.results):
            if receipt is None:
                item = batch.to_ship[i]
                rejected.add((item.partition, item.offset))
            else:
                shipped.results[i] = {k: receipt[k] for k in _RECEIPT_FIELDS if k in receipt}
        # A record Certyo refused becomes a dead letter with its message.
        batch.messages = [m for m in batch.messages if (m.partition(), m.offset()) in rejected]
    for item in batch.to_ship:
        if item.change is not None:
            item.change = replace(
                item.change,
                after=None if item.change.after is None else "",
                update_description=None,
                content=b"",
                fast=None,
                parsed_document=None,
            )
        if item.record is not None:
            item.record = item.record._replace(json=b"")
    batch.records = []
    batch.slim = True


@dataclass
class _Item:
    """One message of a batch and what became of it."""

    partition: int
    offset: int
    change: Change | None = None
    record: ChangeRecord | None = None
    skipped: str | None = None  # Skip.reason


def _sort_out(messages: list, at_end: set[int]) -> tuple[list, list]:
    """A consume() result as its messages, in order, and its errors; the end-of-partition
    events update `at_end` (a partition is at its end until a message of it comes)."""
    end_of_partition = confluent_kafka().KafkaError._PARTITION_EOF
    batch, errors = [], []
    for message in messages:
        error = message.error()
        if error is None:
            batch.append(message)
            at_end.discard(message.partition())
        elif error.code() == end_of_partition:
            at_end.add(message.partition())
        else:
            errors.append(error)
    return batch, errors


class _ReadAhead:
    """Reads the topic from the group's committed offsets while the group join is under way.

    A new member waits seconds for its first assignment on any broker (Kafka delays the first
    rebalance of an empty group by `group.initial.rebalance.delay.ms`, 3 s by default). In
    that time a reader that never joins the group and never commits reads every partition
    from the committed offsets, and the run parses and ships what it reads. That is safe
    because Certyo's idempotency keys come from each change's source position: a message
    shipped by a run that is then not given its partition is a replay for its owner. Nothing
    is written back, dead-lettered or committed before the assignment.

    On assignment, each assigned partition whose committed offset is still the one the reader
    started from is kept, and the member starts reading it after what was read ahead; the
    messages of every other partition are dropped from this run. A poison message ends the
    read-ahead before it, so that dead letters are written only by the partition's owner.
    """

    def __init__(self, reader: Any, topic: str, limit: int) -> None:
        self.reader = reader
        self.topic = topic
        self.limit = limit
        self.start: dict[int, int] = {}  # partition → committed offset read from (-1: none)
        self.next: dict[int, int] = {}  # partition → the offset after the last message taken
        self.taken = 0
        self.open = True
        self.exhausted = False  # nothing more to read ahead: wait for the assignment
        self._at_end: set[int] = set()

    def begin(self, timeout: float = 10.0) -> None:
        ck = confluent_kafka()
        described = self.reader.list_topics(self.topic, timeout=timeout).topics.get(self.topic)
        if described is None or described.error is not None or not described.partitions:
            self.exhausted = True
            return
        partitions = [ck.TopicPartition(self.topic, p) for p in sorted(described.partitions)]
        positions = []
        for tp in self.reader.committed(partitions, timeout=timeout):
            committed = tp.offset if tp.offset is not None and tp.offset >= 0 else -1
            self.start[tp.partition] = committed
            offset = committed if committed >= 0 else ck.OFFSET_BEGINNING
            positions.append(ck.TopicPartition(self.topic, tp.partition, offset))
        self.reader.assign(positions)

    def read(self, wanted: int) -> list:
        """Up to `wanted` messages (fewer at the limit or at the end of every partition)."""
        wanted = min(wanted, self.limit - self.taken)
        if wanted <= 0 or self.exhausted:
            self.exhausted = True
            return []
        messages = self.reader.consume(num_messages=wanted, timeout=0.05)
        batch, errors = _sort_out(messages, self._at_end)
        if errors:  # the member reads these partitions itself after the assignment
            self.exhausted = True
        if self.start and self._at_end >= set(self.start):
            self.exhausted = True
        return batch

    def took(self, items: list[_Item]) -> None:
        for item in items:
            self.next[item.partition] = item.offset + 1
        self.taken += len(items)

    def settle(self, consumer: Any, partitions: list) -> set[int]:
        """On the first assignment: set where the member starts reading each partition it
        keeps; return the partitions whose messages read ahead are dropped."""
        ck = confluent_kafka()
        keep: set[int] = set()
        candidates = [ck.TopicPartition(self.topic, tp.partition) for tp in partitions]
        candidates = [tp for tp in candidates if tp.partition in self.next]
        try:
            current = consumer.committed(candidates, timeout=10) if candidates else []
        except Exception:  # noqa: BLE001 - unknown whether they moved: keep none
            current = []
        for tp in current:
            committed = tp.offset if tp.offset is not None and tp.offset >= 0 else -1
            if committed == self.start.get(tp.partition):
                keep.add(tp.partition)
        for tp in partitions:
            if tp.partition in keep:
                tp.offset = self.next[tp.partition]
        self.close()
        return set(self.next) - keep

    def close(self) -> None:
        if self.open:
            self.open = False
            self.exhausted = True
            self.reader.close()


class DebeziumIngestor:
    """Consumes one collection's Debezium topic as a member of its consumer group."""

    def __init__(
        self,
        *,
        database: Any,
        spec: CollectionSpec,
        kafka: KafkaResource,
        client: Any,
        tenant_id: str,
        run_id: str,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        unassigned_seconds: float = DEFAULT_UNASSIGNED_SECONDS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        read_ahead_messages: int = DEFAULT_READ_AHEAD_MESSAGES,
        log: Callable[[str], None] | None = None,
        consumer_overrides: dict[str, Any] | None = None,
    ) -> None:
        if max_messages < 1 or batch_size < 1 or max_seconds <= 0 or max_in_flight < 1:
            raise ValueError(
                "max_messages, batch_size, max_seconds and max_in_flight must be positive"
            )
        self.database = database
        self.collection = database[spec.collection]
        self.dead_letters = database[DEAD_LETTERS_COLLECTION]
        self.spec = spec
        self.kafka = kafka
        self.client = client
        self.tenant_id = tenant_id
        self.run_id = run_id
        self.max_messages = max_messages
        self.max_seconds = max_seconds
        self.batch_size = batch_size
        self.max_payload_bytes = max_payload_bytes
        self.unassigned_seconds = unassigned_seconds
        self.max_in_flight = max_in_flight
        self.read_ahead_messages = max(0, read_ahead_messages)
        self.log = log or (lambda _msg: None)
        self.consumer_overrides = consumer_overrides or {}
        self.topic = kafka.topic_for(spec)
        self._assigned: set[int] = set()
        self._at_end: set[int] = set()
        self._open_letters = False
        # Batches read and shipped but not yet written back and committed, oldest first.
        self._window: deque[_Batch] = deque()

    # -- the consume loop ------------------------------------------------------------------

    def run(self) -> DebeziumReport:
        with _no_cyclic_gc():
            return self._run()

    def _run(self) -> DebeziumReport:
        ck = confluent_kafka()
        report = DebeziumReport(topic=self.topic, group_id=self.kafka.group_for(self.spec))
        began = time.monotonic()
        deadline = began + self.max_seconds
        self._open_letters = (
            self.dead_letters.find_one(
                {"collection": self.spec.collection, "resolvedAt": None}, {"_id": 1}
            )
            is not None
        )
        consumer = self.kafka.new_consumer(self.spec, **self.consumer_overrides)
        ahead: _ReadAhead | None = None

        def on_assign(consumer_: Any, partitions: list) -> None:
            report.rebalances += 1
            if report.first_assignment_seconds is None:
                report.first_assignment_seconds = time.monotonic() - began
            if ahead is not None and ahead.open:
                self._drop_read_ahead(ahead.settle(consumer_, partitions), report)
                report.read_ahead = ahead.taken - report.read_ahead_dropped
                consumer_.assign(partitions)  # from after what was read ahead
            self._assigned = {p.partition for p in partitions}
            self._at_end -= {p.partition for p in partitions}

        def on_revoke(_consumer: Any, partitions: list) -> None:
            # Callbacks run inside consume(), on this thread. The batches in flight are
            # finished (acknowledged, written back, committed) before their partitions go to
            # another member, so a rebalance loses no progress and causes no re-read.
            self._finish_window(consumer, report, keep=0)
            self._assigned -= {p.partition for p in partitions}

        pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="certyo-debezium")
        try:
            consumer.subscribe([self.topic], on_assign=on_assign, on_revoke=on_revoke)
            unassigned_since = time.monotonic()
            if self.read_ahead_messages:
                limit = min(self.read_ahead_messages, self.max_messages)
                reader = self.kafka.new_consumer(self.spec, **self.consumer_overrides)
                ahead = _ReadAhead(reader, self.topic, limit)
                try:
                    ahead.begin()
                except Exception as exc:  # noqa: BLE001 - the run goes on without it
                    ahead.close()
                    ahead = None
                    self.log(
                        f"{self.spec.collection}: no read-ahead while the group forms "
                        f"({self.kafka.redact(str(exc))}); waiting for the assignment"
                    )
            while time.monotonic() < deadline and (
                report.messages < self.max_messages or (ahead is not None and ahead.open)
            ):
                wanted = max(1, min(self.batch_size, self.max_messages - report.messages))
                speculative = False
                if ahead is not None and not ahead.exhausted:
                    # Serve the group join (on_assign runs in here), then read ahead.
                    messages = consumer.consume(num_messages=wanted, timeout=0)
                    if not messages and ahead.open:
                        messages, speculative = ahead.read(wanted), True
                else:
                    messages = consumer.consume(num_messages=wanted, timeout=0.5)
                batch, errors = _sort_out(messages, self._at_end)
                for error in errors:
                    if error.fatal() or not error.retriable():
                        raise ck.KafkaException(error)
                # Read while waiting at the limit for the assignment: not handled, not
                # committed, so the next run reads it.
                del batch[max(0, self.max_messages - report.messages) :]
                if batch:
                    if report.first_message_seconds is None:
                        report.first_message_seconds = time.monotonic() - began
                    # Parse and encode this batch while earlier ones are being shipped; make
                    # room in the window (finishing the oldest, in order) before shipping it.
                    prepared = self._prepare(batch, report, ahead if speculative else None)
                    if ahead is not None and ahead.open:
                        self._wait_in_flight(self.max_in_flight - 1, ahead)
                    else:
                        self._finish_window(consumer, report, keep=self.max_in_flight - 1)
                    if prepared.records:
                        report.sent += len(prepared.records)
                        prepared.future = pool.submit(
                            ship_in_order, self.client, self.tenant_id, prepared.records
                        )
                    self._window.append(prepared)
                if ahead is None or not ahead.open:
                    # Batches Certyo has already answered are finished without waiting.
                    self._finish_window(consumer, report, keep=self.max_in_flight, done_only=True)
                if self._assigned:
                    unassigned_since = time.monotonic()
                    if not batch and self._assigned <= self._at_end:
                        self._finish_window(consumer, report, keep=0)
                        report.caught_up = True
                        break
                elif time.monotonic() - unassigned_since > self.unassigned_seconds:
                    self.log(
                        f"{self.spec.collection}: no partition of {self.topic} was assigned "
                        f"to this run within {self.unassigned_seconds:.0f} s (another run "
                        "owns them all)"
                    )
                    break
            if ahead is not None and ahead.open:
                # Never given a partition: nothing read ahead is this run's to commit.
                ahead.close()
                self._drop_read_ahead(set(ahead.next), report)
                self._window.clear()
            self._finish_window(consumer, report, keep=0)
        except DebeziumIngestError:
            raise
        except Exception as exc:
            report.elapsed_seconds = time.monotonic() - began
            raise DebeziumIngestError(self._describe(exc, report), report) from exc
        finally:
            # After a failure the batches in flight are not committed: they are read again.
            self._window.clear()
            pool.shutdown(wait=True)
            if ahead is not None:
                ahead.close()
            # Leaving the group at once hands the partitions over without a session timeout.
            try:
                consumer.close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide the real outcome
                self.log(f"closing the Kafka consumer failed: {self.kafka.redact(str(exc))}")
        report.elapsed_seconds = time.monotonic() - began
        return report

    def _wait_in_flight(self, keep: int, ahead: _ReadAhead) -> None:
        """Wait until at most `keep` batches are being shipped (before the assignment, when
        no batch may be finished yet). Once a batch has failed, nothing more is read ahead:
        the batches before it are finished after the assignment, and the run stops there."""
        while True:
            shipping = [b.future for b in self._window if b.future is not None]
            if any(f.done() and f.exception() is not None for f in shipping):
                ahead.exhausted = True
                return
            for batch in self._window:
                future = batch.future
                done = future is not None and future.done() and future.exception() is None
                if done and not batch.slim:
                    _slim(batch)
            waiting = [f for f in shipping if not f.done()]
            if len(waiting) <= keep:
                return
            wait(waiting, return_when=FIRST_COMPLETED)

    def _drop_read_ahead(self, dropped: set[int], report: DebeziumReport) -> None:
        """Take the messages of `dropped` partitions out of the batches read ahead: they are
        neither written back nor committed by this run, nor counted as its messages."""
        if not dropped:
            return
        for batch in self._window:
            batch.dropped = dropped
            for item in batch.items:
                if item.partition not in dropped:
                    continue
                report.messages -= 1
                report.read_ahead_dropped += 1
                if item.change is not None:
                    report.changes -= 1
                    report.operations[item.change.op] -= 1
                    if item.record is not None:
                        report.sent -= 1
                    if item.change.op == "u" and not item.change.has_document:
                        report.after_null_updates -= 1
                elif item.skipped == TOMBSTONE:
                    report.tombstones -= 1
                elif item.skipped is not None:
                    report.own_write_backs -= 1
        report.operations = {op: n for op, n in report.operations.items() if n}

    def _describe(self, exc: BaseException, report: DebeziumReport) -> str:
        committed = ", ".join(f"partition {p} → {o}" for p, o in sorted(report.committed.items()))
        return self.kafka.redact(
            f"Debezium ingestion of {self.topic} stopped: {type(exc).__name__}: {exc}. "
            f"Committed offsets: {committed or 'none this run'}; {report.accepted} accepted, "
            f"{report.replayed} replayed, {report.dead_lettered} dead-lettered. Everything "
            "after the committed offsets is read again by the next run."
        )

    # -- one batch ---------------------------------------------------------------------------

    def _prepare(
        self, messages: list, report: DebeziumReport, ahead: _ReadAhead | None = None
    ) -> _Batch:
        """Parse and encode a batch; poison messages become dead letters here (read ahead,
        the batch ends before the first one instead, and so does the read-ahead)."""
        report.batches += 1
        batch = _Batch(messages)
        for message in messages:
            item = _Item(message.partition(), message.offset())
            try:
                parsed = parse_message(message.key(), message.value(), self.spec)
                doc_id = None if isinstance(parsed, Skip) else parsed.doc_id
                record = (
                    None
                    if isinstance(parsed, Skip)
                    else encode_change(
                        parsed, self.spec, self.tenant_id, max_payload_bytes=self.max_payload_bytes
                    )
                )
            except DebeziumPoisonError as exc:
                poison: Exception | None = exc
                doc_id = exc.doc_id
            except PoisonDocumentError as exc:
                poison = exc
            else:
                poison = None
            if poison is not None:
                if ahead is not None:
                    ahead.exhausted = True
                    break
                batch.items.append(item)
                reason = getattr(poison, "reason", "poison")
                self._dead_letter(message, reason, str(poison), doc_id, None, report)
                continue
            batch.items.append(item)
            if isinstance(parsed, Skip):
                item.skipped = parsed.reason
                if parsed.reason == TOMBSTONE:
                    report.tombstones += 1
                else:
                    report.own_write_backs += 1
                continue
            report.changes += 1
            report.operations[parsed.op] = report.operations.get(parsed.op, 0) + 1
            if parsed.op == "u" and not parsed.has_document:
                report.after_null_updates += 1
            item.change, item.record = parsed, record
            batch.to_ship.append(item)
        report.messages += len(batch.items)
        del batch.messages[len(batch.items) :]
        if ahead is not None:
            ahead.took(batch.items)
        batch.records = [i.record for i in batch.to_ship]
        return batch

    def _finish_window(
        self, consumer: Any, report: DebeziumReport, *, keep: int, done_only: bool = False
    ) -> None:
        """Finish the oldest batches, in order, until at most `keep` are left (with
        `done_only`, also stop at the first batch Certyo has not answered yet)."""
        window = self._window
        while len(window) > keep or (
            done_only and window and (window[0].future is None or window[0].future.done())
        ):
            batch = window.popleft()
            self._finish(consumer, batch, report)

    def _finish(self, consumer: Any, batch: _Batch, report: DebeziumReport) -> None:
        """Wait for Certyo's answer, write back, then commit the batch's offsets."""
        if batch.future is not None:
            shipped = batch.future.result()
            self._complete(batch.to_ship, shipped, batch.messages, report, batch.dropped)
        items = [i for i in batch.items if i.partition not in batch.dropped]
        if items:
            self._commit(consumer, items, report)

    def _complete(
        self,
        items: list[_Item],
        shipped: Shipped,
        messages: list,
        report: DebeziumReport,
        dropped: frozenset[int] | set[int] = frozenset(),
    ) -> None:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        by_offset = {(m.partition(), m.offset()): m for m in messages}
        updates: list[UpdateOne] = []
        accepted_ids: list[Any] = []
        for i, item in enumerate(items):
            if item.partition in dropped:
                continue
            receipt = shipped.results[i]
            assert item.change is not None and item.record is not None
            if receipt is None:
                reason = shipped.rejected.get(i, "rejected by Certyo")
                self._dead_letter(
                    by_offset[(item.partition, item.offset)],
                    "certyo_validation",
                    reason,
                    item.change.doc_id,
                    item.record.version,
                    report,
                )
                continue
            if receipt.get("idempotencyReplayed"):
                report.replayed += 1
            else:
                report.accepted += 1
            accepted_ids.append(item.change.doc_id)
            update = _write_back(item.change, item.record, receipt, self.spec, now)
            if update is not None:
                updates.append(update)
        if updates:
            result = bulk_update(self.collection, updates, "write-back")
            report.written_back += result.modified_count
        if accepted_ids and self._open_letters:
            # A later change of a dead-lettered document was accepted: its letter is resolved.
            self.dead_letters.update_many(
                {
                    "collection": self.spec.collection,
                    "documentId": {"$in": accepted_ids},
                    "resolvedAt": None,
                },
                {"$set": {"resolvedAt": now, "resolvedByRun": self.run_id}},
            )

    def _commit(self, consumer: Any, items: list[_Item], report: DebeziumReport) -> None:
        """Commit, per partition, the offset after the last message handled in this batch."""
        ck = confluent_kafka()
        next_offsets: dict[int, int] = {}
        for item in items:
            next_offsets[item.partition] = max(next_offsets.get(item.partition, 0), item.offset + 1)
        offsets = [ck.TopicPartition(self.topic, p, o) for p, o in sorted(next_offsets.items())]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except ck.KafkaException as exc:
            # The partitions were handed to another member meanwhile (a rebalance). It reads
            # from the last committed offsets, and Certyo answers with idempotent replays.
            report.failed_commits += 1
            self.log(
                f"{self.spec.collection}: commit of {next_offsets} failed "
                f"({self.kafka.redact(str(exc))}); the next owner reads these messages again "
                "and Certyo replays them"
            )
            return
        report.commits += 1
        report.committed.update(next_offsets)

    # -- dead letters --------------------------------------------------------------------------

    def _dead_letter(
        self,
        message: Any,
        reason: str,
        text: str,
        doc_id: Any,
        version: str | None,
        report: DebeziumReport,
    ) -> None:
        report.dead_lettered += 1
        report.dead_letter_reasons[reason] = report.dead_letter_reasons.get(reason, 0) + 1
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        partition, offset = message.partition(), message.offset()
        try:
            record_id = None if doc_id is None else record_id_of(doc_id)
        except PoisonDocumentError:
            record_id = repr(doc_id)
        # Named by the Kafka position: the same message read again is the same letter.
        letter_id = f"{self.spec.database}.{self.spec.collection}:{self.topic}:{partition}:{offset}"
        upsert_with_retry(
            self.dead_letters,
            {"_id": letter_id},
            {
                "$set": {
                    "database": self.spec.database,
                    "collection": self.spec.collection,
                    "documentId": doc_id,
                    "recordId": record_id,
                    "version": version,
                    "timestamp": None,
                    "reason": reason,
                    "message": text[:2000],
                    "stage": DEAD_LETTER_STAGE,
                    "topic": self.topic,
                    "partition": partition,
                    "offset": offset,
                    "key": _raw(message.key()),
                    "value": _raw(message.value()),
                    "runId": self.run_id,
                    "lastSeenAt": now,
                    "resolvedAt": None,
                },
                "$setOnInsert": {"firstSeenAt": now},
                "$inc": {"attempts": 1},
            },
        )


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """No cyclic garbage collection during a run (at most `max_seconds`).

    Parsing builds only trees (dicts, lists, strings), which reference counting frees, yet
    their allocations trigger collections that scan the process's whole heap; in a Dagster
    process with a large heap that cost ~20 us per catalog document, and the batches held
    while the group forms made every full collection longer. Collection resumes after the
    run (and is left alone if something else had turned it off).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _raw(data: bytes | None) -> str | None:
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= _MAX_RAW_CHARS else text[:_MAX_RAW_CHARS] + "…"


# INTEGRATION POINT: the shared write-back builders (certyo_dagster/ship/writeback.py).
def _write_back(
    change: Change, record: ChangeRecord, receipt: dict, spec: CollectionSpec, now: datetime
) -> UpdateOne | None:
    """Label the document pending with the shipped hash, only while it is still that version.

    Only a shipped document with a date in the timestamp field is labelled: verify_<c> and the
    tamper audit recognise a version by it. The update sets `certyo_*` fields only, so the
    change event it causes is skipped (OWN_WRITE_BACK) instead of being shipped again.
    """
    if record.timestamp is None or record.document_version is None or not change.has_document:
        return None
    return UpdateOne(
        {"_id": change.doc_id, spec.timestamp_field: record.timestamp},
        {
            "$set": {
                "certyo_status": "pending",
                "certyo_record_hash": receipt.get("recordHash"),
                "certyo_version": record.document_version,
                "certyo_ingested_at": now,
            },
            "$unset": _UNSET_VERIFICATION,
        },
    )
