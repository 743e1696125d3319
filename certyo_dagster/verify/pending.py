"""Verification: ask Certyo whether each pending document version is anchored, check the proof
ourselves, and write the outcome back into the document.

Only `certyo_status: "pending"` documents are read (never ones that were not ingested), in
bounded keyset pages by `_id`, with a bounded number of verify calls in flight, up to a
maximum per run. What happens to each document is decided by pure functions (`precheck`,
`decide`, `check_proof`), and every write is conditional on the document still being the
version that was ingested and verified, so an edit made meanwhile is never labelled anchored
with a stale hash. The timestamp field is never written: write-back cannot re-trigger
ingestion.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import pymongo
from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from certyo_dagster.capture.polling import after_id_filter, timestamp_of, utc_naive
from certyo_dagster.fields import (
    ANCHORED,
    BLOCK_NUMBER,
    FAILED,
    FAILURE_REASON,
    INGESTED_AT,
    IPFS_CID,
    MERKLE_ROOT,
    PENDING,
    RECORD_HASH,
    STATUS,
    STATUSES,
    TX_HASH,
    VERIFIED_AT,
    VERSION,
)
from certyo_dagster.prove.hashing import record_hash, record_hash_bytes
from certyo_dagster.prove.merkle import verify_inclusion
from certyo_dagster.sanitize.documents import PoisonDocumentError, sanitize_document
from certyo_dagster.sanitize.records import document_version, record_id_of
from certyo_dagster.settings import (
    DEFAULT_VERIFY_CONCURRENCY,
    DEFAULT_VERIFY_DEADLINE_HOURS,
    DEFAULT_VERIFY_MAX_DOCUMENTS,
    CollectionSpec,
)
from certyo_dagster.ship.errors import CertyoAuthError, CertyoError, CertyoNotFoundError
from certyo_dagster.source.mongo import bulk_update, ensure_index

# Failure reasons: the code before the first ':' of `certyo_failure_reason`.
UNKNOWN_TO_CERTYO = "unknown_to_certyo"
NOT_ANCHORED_IN_TIME = "not_anchored_in_time"
PAYLOAD_CHANGED = "payload_changed"
PROOF_MISMATCH = "proof_mismatch"
INVALID_PROOF = "invalid_proof"
HASH_MISMATCH = "certyo_hash_mismatch"
NOT_VERIFIED = "not_verified"
MISSING_RECORD_HASH = "missing_record_hash"
UNHASHABLE = "unhashable_payload"
# Reasons that mean the document, Certyo's answer or its proof cannot be trusted, as opposed
# to an anchoring that simply did not happen (yet).
INTEGRITY_REASONS = frozenset(
    {PAYLOAD_CHANGED, PROOF_MISMATCH, INVALID_PROOF, HASH_MISMATCH, NOT_VERIFIED, UNHASHABLE}
)

DEFAULT_PAGE_SIZE = 500
DEFAULT_DEADLINE = timedelta(hours=DEFAULT_VERIFY_DEADLINE_HOURS)
DEFAULT_MAX_ERRORS = 100

_STATUS_ID_INDEX = [(STATUS, pymongo.ASCENDING), ("_id", pymongo.ASCENDING)]
_STATUS_AGE_INDEX = [
    (STATUS, pymongo.ASCENDING),
    (INGESTED_AT, pymongo.ASCENDING),
]


class VerifyClient(Protocol):
    """What verification needs from the Certyo client."""

    def verify_record(
        self, database: str, collection: str, record_id: str, record_hash: str | None = None
    ) -> dict: ...


class VerifyAbortedError(Exception):
    """Verification stopped early (auth failure, too many errors, MongoDB failure).

    Every outcome decided before the stop was written back; `report` says how far it got.
    """

    def __init__(self, message: str, report: VerifyReport):
        super().__init__(message)
        self.report = report


# -- pure decisions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What to do with one pending document.

    kind: `anchored` (write `fields`), `failed` (write `reason`), `pending` (not anchored yet;
    nothing to write), `stale` (edited since ingestion; left for the pipeline to re-ingest),
    `error` (Certyo could not answer; retried next run).
    """

    kind: str
    reason: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    latency_seconds: float | None = None

    @property
    def reason_code(self) -> str | None:
        return reason_code(self.reason) if self.reason else None


def reason_code(reason: str) -> str:
    """`payload_changed` of `payload_changed: the document ...`."""
    return reason.split(":", 1)[0].strip()


def _failed(code: str, detail: str = "") -> Outcome:
    return Outcome(FAILED, f"{code}: {detail}" if detail else code)


def precheck(doc: Mapping[str, Any], spec: CollectionSpec) -> Outcome | None:
    """What can be decided without asking Certyo, or None when Certyo must be asked.

    A document whose timestamp no longer gives the ingested `certyo_version` was edited
    since ingestion: the pipeline re-ingests it, so it is left alone. A document at the
    ingested version whose current payload no longer hashes to `certyo_record_hash` was
    changed without a version bump: it can never be proven anchored.
    """
    expected = doc.get(RECORD_HASH)
    if spec.is_change_stream:
        return _precheck_streamed(doc, expected)
    try:
        version = document_version(doc, spec)
    except PoisonDocumentError:
        return Outcome("stale")  # the timestamp is gone or not a date: not the ingested version
    if version != doc.get(VERSION):
        return Outcome("stale")
    current = _current_hash(doc, expected)
    if isinstance(current, Outcome):
        return current
    if current != expected:
        return _failed(
            PAYLOAD_CHANGED,
            f"the current payload hashes to {current}, but version {version} was ingested as "
            f"{expected}; the document was changed without updating {spec.timestamp_field}",
        )
    return None


def _precheck_streamed(doc: Mapping[str, Any], expected: Any) -> Outcome | None:
    """`precheck` for a collection captured by its change stream.

    Every edit is a change event, and the event's write-back relabels the document with the
    new version and hash. So a document whose payload no longer hashes to its label was edited
    after the labelled change and waits for that edit's event: stale, never a failure.
    """
    current = _current_hash(doc, expected)
    if isinstance(current, Outcome):
        return current
    return None if current == expected else Outcome("stale")


def _current_hash(doc: Mapping[str, Any], expected: Any) -> str | Outcome:
    """The hash of the document's current payload, or the failure that keeps it from being
    compared with its label `expected` (no label, a malformed label, an unhashable payload)."""
    if not isinstance(expected, str):
        return _failed(MISSING_RECORD_HASH, "the document is pending without certyo_record_hash")
    try:
        record_hash_bytes(expected)
        return record_hash(sanitize_document(doc))
    except PoisonDocumentError as exc:
        return _failed(UNHASHABLE, f"the current payload cannot be hashed: {exc}")
    except ValueError as exc:
        return _failed(MISSING_RECORD_HASH, str(exc))


def check_proof(response: Mapping[str, Any], verified_hash: str) -> str | None:
    """None when the response has no proof or a proof that holds; otherwise the reason.

    The leaf is the raw 32-byte digest of the record hash (RFC 9162, as Certyo builds its
    trees); the audit path and root are hex.
    """
    proof = response.get("merkleProof")
    if proof is None:
        return None
    try:
        leaf_index = proof["leafIndex"]
        tree_size = proof["treeSize"]
        path = [bytes.fromhex(node) for node in proof["auditPath"]]
        root = bytes.fromhex(response["merkleRoot"])
        if not isinstance(leaf_index, int) or not isinstance(tree_size, int):
            raise TypeError("leafIndex and treeSize must be integers")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"{INVALID_PROOF}: the Merkle proof in Certyo's answer is malformed ({exc})"
    if not verify_inclusion(leaf_index, tree_size, record_hash_bytes(verified_hash), path, root):
        return (
            f"{PROOF_MISMATCH}: the inclusion proof (leaf {leaf_index} of {tree_size}) does not "
            f"lead from {verified_hash} to Merkle root {response['merkleRoot']}"
        )
    return None


def decide(
    doc: Mapping[str, Any],
    response: Mapping[str, Any],
    *,
    now: datetime,
    deadline: timedelta = DEFAULT_DEADLINE,
) -> Outcome:
    """The outcome for a document that passed `precheck`, given Certyo's verify answer."""
    expected = doc[RECORD_HASH]
    verified_hash = response.get("recordHash")
    if verified_hash != expected:
        return _failed(
            HASH_MISMATCH,
            f"Certyo verified {verified_hash!r}, but the document was ingested as {expected}",
        )
    if response.get("verified") is not True:
        return _failed(NOT_VERIFIED, "Certyo answered verified: false")
    if response.get("anchoredOnChain") is True and response.get("transactionHash"):
        problem = check_proof(response, expected)
        if problem is not None:
            return Outcome(FAILED, problem)
        fields: dict[str, Any] = {
            STATUS: ANCHORED,
            RECORD_HASH: expected,
            VERIFIED_AT: _to_millisecond(now),
            TX_HASH: response["transactionHash"],
        }
        for name, key in (
            (MERKLE_ROOT, "merkleRoot"),
            (BLOCK_NUMBER, "blockNumber"),
            (IPFS_CID, "ipfsCid"),
        ):
            if response.get(key) is not None:
                fields[name] = response[key]
        return Outcome(ANCHORED, fields=fields, latency_seconds=_latency(doc, response, now))
    ingested_at = doc.get(INGESTED_AT)
    if isinstance(ingested_at, datetime) and utc_naive(now) - utc_naive(ingested_at) > deadline:
        return _failed(
            NOT_ANCHORED_IN_TIME,
            f"not anchored on chain {_hours(deadline)} after ingestion "
            f"(ingested {utc_naive(ingested_at).isoformat()}Z, Certyo status "
            f"{response.get('status') or 'unknown'})",
        )
    return Outcome(PENDING)


def _to_millisecond(ts: datetime) -> datetime:
    """Naive UTC cut to milliseconds, which is all a BSON date keeps."""
    ts = utc_naive(ts)
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def _hours(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:g} h"


def _latency(doc: Mapping[str, Any], response: Mapping[str, Any], now: datetime) -> float | None:
    """Seconds from our ingestion write-back to anchoring (Certyo's anchoredAt, else now)."""
    ingested_at = doc.get(INGESTED_AT)
    if not isinstance(ingested_at, datetime):
        return None
    anchored_at = utc_naive(now)
    raw = response.get("anchoredAt")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            anchored_at = utc_naive(datetime.fromisoformat(raw.replace("Z", "+00:00")))
    return max(0.0, (anchored_at - utc_naive(ingested_at)).total_seconds())


def not_found_outcome() -> Outcome:
    return _failed(
        UNKNOWN_TO_CERTYO,
        "Certyo has no record of this version (HTTP 404); re-ingest it with a forced run",
    )


def write_for(doc: Mapping[str, Any], outcome: Outcome, spec: CollectionSpec) -> UpdateOne | None:
    """The conditional update for an outcome, or None when nothing is written.

    The filter pins the document to exactly what was read and checked: still pending, same
    version, same timestamp value, same record hash. If any of them changed meanwhile the
    update matches nothing and the document waits for re-ingestion.
    """
    if outcome.kind not in (ANCHORED, FAILED):
        return None
    condition = {
        "_id": doc["_id"],
        STATUS: PENDING,
        VERSION: doc.get(VERSION),
        RECORD_HASH: doc.get(RECORD_HASH),
        spec.timestamp_field: timestamp_of(dict(doc), spec),
    }
    if outcome.kind == ANCHORED:
        return UpdateOne(
            condition,
            {"$set": dict(outcome.fields), "$unset": {FAILURE_REASON: ""}},
        )
    return UpdateOne(condition, {"$set": {STATUS: FAILED, FAILURE_REASON: outcome.reason}})


# -- I/O ---------------------------------------------------------------------------------------


def ensure_verify_indexes(collection: Any) -> list[str]:
    """Indexes for paging pending documents by `_id` and finding the oldest one."""
    warnings = [
        ensure_index(collection, _STATUS_ID_INDEX, "certyo_status_id"),
        ensure_index(collection, _STATUS_AGE_INDEX, "certyo_status_ingested_at"),
    ]
    return [w for w in warnings if w]


def iter_status_pages(
    collection: Any,
    status: str,
    *,
    page_size: int,
    max_documents: int | None = None,
    projection: Mapping[str, Any] | None = None,
) -> Iterator[list[dict]]:
    """Documents with `certyo_status: status` in `_id` order, one bounded query per page.

    Each page is a fresh query after the last `_id` handed out, so the caller may update the
    documents of a page (they leave the status, or not) before asking for the next one.
    """
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    remaining = max_documents
    last_id: Any = None
    started = False
    while remaining is None or remaining > 0:
        limit = page_size if remaining is None else min(page_size, remaining)
        query: dict[str, Any] = {STATUS: status}
        if started:
            query = {"$and": [query, after_id_filter(last_id)]}
        docs = list(
            collection.find(
                query,
                dict(projection) if projection else None,
                sort=[("_id", pymongo.ASCENDING)],
                limit=limit,
            )
        )
        if not docs:
            return
        started = True
        last_id = docs[-1]["_id"]
        if remaining is not None:
            remaining -= len(docs)
        yield docs
        if len(docs) < limit:
            return


@dataclass
class VerifyReport:
    """What one verification run did, for metadata a person reads in the UI."""

    selected: int = 0
    anchored: int = 0
    failed: int = 0
    still_pending: int = 0
    stale: int = 0
    errors: int = 0
    lost_races: int = 0  # decided, but the document changed before the write landed
    requests: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    reached_max_documents: bool = False
    elapsed_seconds: float = 0.0


class PendingVerifier:
    """Verifies the pending documents of one collection. One per run; not thread-safe."""

    def __init__(
        self,
        *,
        collection: Any,
        spec: CollectionSpec,
        client: VerifyClient,
        max_documents: int = DEFAULT_VERIFY_MAX_DOCUMENTS,
        max_in_flight: int = DEFAULT_VERIFY_CONCURRENCY,
        page_size: int = DEFAULT_PAGE_SIZE,
        deadline: timedelta = DEFAULT_DEADLINE,
        max_errors: int = DEFAULT_MAX_ERRORS,
        clock: Callable[[], datetime] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        for name, value in (
            ("max_documents", max_documents),
            ("max_in_flight", max_in_flight),
            ("page_size", page_size),
            ("max_errors", max_errors),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if deadline <= timedelta(0):
            raise ValueError(f"deadline must be positive, got {deadline}")
        self.collection = collection
        self.spec = spec
        self.client = client
        self.max_documents = max_documents
        self.max_in_flight = max_in_flight
        self.page_size = page_size
        self.deadline = deadline
        self.max_errors = max_errors
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.log = log or (lambda _msg: None)

    def run(self) -> VerifyReport:
        report = VerifyReport()
        began = time.perf_counter()
        try:
            with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="certyo-verify") as pool:
                for docs in iter_status_pages(
                    self.collection,
                    PENDING,
                    page_size=self.page_size,
                    max_documents=self.max_documents,
                ):
                    report.selected += len(docs)
                    outcomes = self._verify_page(docs, pool, report)
                    self._write_back(docs, outcomes, report)
                    self.log(
                        f"{self.spec.collection}: {report.selected} pending read, "
                        f"{report.anchored} anchored, {report.failed} failed, "
                        f"{report.still_pending} not anchored yet, {report.stale} edited since "
                        "ingestion"
                    )
                    if report.errors >= self.max_errors:
                        raise VerifyAbortedError(
                            f"stopped after {report.errors} failed verify calls "
                            f"(first: {report.error_samples[0]})",
                            report,
                        )
            report.reached_max_documents = report.selected >= self.max_documents
        except CertyoAuthError as exc:
            raise VerifyAbortedError(f"Certyo refused the API key: {exc}", report) from None
        except PyMongoError as exc:
            raise VerifyAbortedError(
                f"MongoDB failed: {type(exc).__name__}: {exc}", report
            ) from exc
        finally:
            report.elapsed_seconds = time.perf_counter() - began
        return report

    def _verify_page(
        self, docs: list[dict], pool: ThreadPoolExecutor, report: VerifyReport
    ) -> list[Outcome]:
        decided: list[Outcome | Future] = []
        for doc in docs:
            outcome = precheck(doc, self.spec)
            if outcome is None:
                try:
                    record_id = record_id_of(doc["_id"])
                except PoisonDocumentError as exc:
                    outcome = _failed(UNHASHABLE, f"the _id has no recordId form: {exc}")
                else:
                    report.requests += 1
                    decided.append(
                        pool.submit(
                            self.client.verify_record,
                            self.spec.database,
                            self.spec.collection,
                            record_id,
                            doc[RECORD_HASH],
                        )
                    )
                    continue
            decided.append(outcome)
        now = self.clock()
        outcomes: list[Outcome] = []
        auth_error: CertyoAuthError | None = None
        for doc, item in zip(docs, decided, strict=True):
            if not isinstance(item, Future):
                outcomes.append(item)
                continue
            try:
                outcomes.append(decide(doc, item.result(), now=now, deadline=self.deadline))
            except CertyoNotFoundError:
                outcomes.append(not_found_outcome())
            except CertyoAuthError as exc:
                auth_error = auth_error or exc
                outcomes.append(Outcome("error", str(exc)))
            except CertyoError as exc:
                report.errors += 1
                if len(report.error_samples) < 5:
                    report.error_samples.append(str(exc))
                outcomes.append(Outcome("error", str(exc)))
        if auth_error is not None:
            raise auth_error
        return outcomes

    def _write_back(self, docs: list[dict], outcomes: list[Outcome], report: VerifyReport) -> None:
        updates: list[UpdateOne] = []
        kinds: list[Outcome] = []
        for doc, outcome in zip(docs, outcomes, strict=True):
            if outcome.kind == PENDING:
                report.still_pending += 1
            elif outcome.kind == "stale":
                report.stale += 1
            update = write_for(doc, outcome, self.spec)
            if update is not None:
                updates.append(update)
                kinds.append(outcome)
        if not updates:
            return
        matched = _bulk_update(self.collection, updates)
        for outcome, landed in zip(kinds, matched, strict=True):
            if not landed:
                report.lost_races += 1
            elif outcome.kind == ANCHORED:
                report.anchored += 1
                if outcome.latency_seconds is not None:
                    report.latencies.append(outcome.latency_seconds)
            else:
                report.failed += 1
                report.failure_reasons[outcome.reason_code] += 1


def _bulk_update(collection: Any, updates: list[UpdateOne]) -> list[bool]:
    """Apply conditional updates; whether each one matched its document.

    A bulk result only gives a total, so when it falls short the documents are re-read to
    learn which filters missed (rare: it takes an edit racing the verify call).
    """
    result = bulk_update(collection, updates, "verification write-back")
    if result.matched_count == len(updates):
        return [True] * len(updates)
    landed = []
    for update in updates:
        condition = {
            "_id": update._filter["_id"],
            STATUS: update._doc["$set"][STATUS],
            VERSION: update._filter[VERSION],
            RECORD_HASH: update._filter[RECORD_HASH],
        }
        landed.append(collection.find_one(condition, {"_id": 1}) is not None)
    return landed


# -- the collection-wide picture ---------------------------------------------------------------

NOT_INGESTED = "not ingested"


@dataclass
class AnchoringSummary:
    """Where every document of the collection stands, read after a verification run."""

    total: int
    by_status: dict[str, int]
    oldest_pending_ingested_at: datetime | None
    failure_reasons: Counter
    failed_sample_ids: list[str]

    @property
    def failed(self) -> int:
        return self.by_status.get(FAILED, 0)

    @property
    def integrity_failures(self) -> int:
        return sum(n for code, n in self.failure_reasons.items() if code in INTEGRITY_REASONS)


def anchoring_summary(
    collection: Any, *, max_failed_listed: int = 20, max_failed_scanned: int = 10_000
) -> AnchoringSummary:
    """Counts per `certyo_status`, the oldest pending document, and why documents failed.

    Failure reasons are tallied over at most `max_failed_scanned` failed documents, so a
    pathological backlog cannot make the report unbounded.
    """
    total = collection.count_documents({})
    by_status = {s: collection.count_documents({STATUS: s}) for s in STATUSES}
    by_status[NOT_INGESTED] = collection.count_documents({STATUS: {"$exists": False}})
    other = total - sum(by_status.values())
    if other:
        by_status["other"] = other
    oldest = collection.find_one(
        {STATUS: PENDING, INGESTED_AT: {"$type": "date"}},
        {INGESTED_AT: 1},
        sort=[(INGESTED_AT, pymongo.ASCENDING)],
    )
    reasons: Counter = Counter()
    sample: list[str] = []
    if by_status[FAILED]:
        cursor = collection.find(
            {STATUS: FAILED},
            {FAILURE_REASON: 1},
            sort=[("_id", pymongo.ASCENDING)],
            limit=max_failed_scanned,
        )
        for doc in cursor:
            reasons[reason_code(str(doc.get(FAILURE_REASON) or "unknown"))] += 1
            if len(sample) < max_failed_listed:
                sample.append(display_id(doc["_id"]))
    return AnchoringSummary(
        total=total,
        by_status=by_status,
        oldest_pending_ingested_at=oldest[INGESTED_AT] if oldest else None,
        failure_reasons=reasons,
        failed_sample_ids=sample,
    )


def display_id(doc_id: Any) -> str:
    """The recordId of an `_id`, for lists shown to people."""
    try:
        return record_id_of(doc_id)
    except PoisonDocumentError:
        return repr(doc_id)


def oldest_pending_age(summary: AnchoringSummary, now: datetime) -> timedelta | None:
    if summary.oldest_pending_ingested_at is None:
        return None
    return utc_naive(now) - utc_naive(summary.oldest_pending_ingested_at)


def latency_percentiles(latencies: list[float]) -> dict[str, float | None]:
    """p50/p95 seconds from ingestion to anchoring; None without data."""
    if not latencies:
        return {"p50": None, "p95": None}
    ordered = sorted(latencies)
    return {"p50": _quantile(ordered, 0.50), "p95": _quantile(ordered, 0.95)}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)
