"""Tamper audit: re-hash every anchored document and compare it with the hash that was anchored.

An anchored document whose current payload no longer hashes to `certyo_record_hash`, while
its timestamp still gives the anchored `certyo_version`, was changed without a version bump or
edited directly in the database. A document whose timestamp moved on is a new version waiting
for the pipeline (it becomes `pending` with its new hash when re-ingested), so it is not
reported: no false positives. The audit only reads; it streams the anchored documents in
bounded `_id` pages, so memory stays flat on any collection size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from certyo_dagster.fields import ANCHORED, RECORD_HASH, VERSION
from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.sanitize.documents import PoisonDocumentError, sanitize_document
from certyo_dagster.sanitize.records import document_version
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.verify.pending import display_id, iter_status_pages

DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAX_LISTED = 100
# Change-stream collections: mismatches re-read once the stream has caught up, at most.
MAX_RECHECKED = 10_000

TAMPERED = "tampered"
UNHASHABLE = "unhashable"
NEW_VERSION = "new_version"


def audit_document(
    doc: Mapping[str, Any], spec: CollectionSpec, *, stream_settled: bool = False
) -> str | None:
    """None when the anchored document is intact; otherwise what is wrong with it.

    `new_version` (edited the normal way, awaiting re-ingestion) is not tampering; `tampered`
    and `unhashable` are. For a collection captured by its change stream, every edit is a
    change event that relabels the document: a mismatch is tampering only once the stream
    has no event left past its saved position (`stream_settled`), else it awaits that event.
    """
    if spec.is_change_stream:
        try:
            current = record_hash(sanitize_document(doc))
        except PoisonDocumentError:
            return UNHASHABLE
        if current == doc.get("certyo_record_hash"):
            return None
        return TAMPERED if stream_settled else NEW_VERSION
    try:
        version = document_version(doc, spec)
    except PoisonDocumentError:
        version = None
    if version != doc.get(VERSION):
        return NEW_VERSION
    try:
        current = record_hash(sanitize_document(doc))
    except PoisonDocumentError:
        return UNHASHABLE
    return None if current == doc.get(RECORD_HASH) else TAMPERED


@dataclass
class TamperReport:
    """What one audit found. `tampered_ids` lists at most `max_listed` recordIds."""

    audited: int = 0
    tampered: int = 0
    unhashable: int = 0
    awaiting_reingestion: int = 0
    tampered_ids: list[str] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def mismatches(self) -> int:
        return self.tampered + self.unhashable


def run_tamper_audit(
    collection: Any,
    spec: CollectionSpec,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_listed: int = DEFAULT_MAX_LISTED,
    log: Callable[[str], None] | None = None,
    progress_every: int = 10,
    stream_settled: Callable[[], bool] | None = None,
) -> TamperReport:
    """Audit every document with `certyo_status: "anchored"`, batch by batch.

    For a change-stream collection, `stream_settled()` says whether the stream has caught up;
    mismatches are re-read after it answers, so an edit made during the audit is not taken
    for tampering.
    """
    log = log or (lambda _msg: None)
    report = TamperReport()
    began = time.perf_counter()
    provisional: list[Any] = []
    for batch_number, docs in enumerate(
        iter_status_pages(collection, ANCHORED, page_size=batch_size), start=1
    ):
        for doc in docs:
            report.audited += 1
            finding = audit_document(doc, spec)
            if finding is None:
                continue
            if finding == NEW_VERSION:
                if spec.is_change_stream and len(provisional) < MAX_RECHECKED:
                    provisional.append(doc["_id"])
                else:
                    report.awaiting_reingestion += 1
                continue
            if finding == TAMPERED:
                report.tampered += 1
            else:
                report.unhashable += 1
            if len(report.tampered_ids) < max_listed:
                report.tampered_ids.append(display_id(doc["_id"]))
        if batch_number % progress_every == 0:
            log(
                f"{spec.collection}: {report.audited} anchored documents audited, "
                f"{report.mismatches} mismatches so far"
            )
    if provisional:
        settled = stream_settled() if stream_settled is not None else False
        for doc_id in provisional:
            doc = collection.find_one({"_id": doc_id, "certyo_status": ANCHORED})
            finding = audit_document(doc, spec, stream_settled=settled) if doc else None
            if finding == TAMPERED:
                report.tampered += 1
                if len(report.tampered_ids) < max_listed:
                    report.tampered_ids.append(display_id(doc_id))
            elif finding is not None:
                report.awaiting_reingestion += 1
    report.elapsed_seconds = time.perf_counter() - began
    return report
