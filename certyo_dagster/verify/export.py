"""Export proof bundles: one self-contained, offline-checkable file per anchored version.

The payload comes from the MongoDB document while it still is the anchored version (it is
re-hashed and must give `certyo_record_hash`), otherwise from Certyo's stored record of that
version (re-hashed to its `recordHash`). The proof, root, transaction, block, chain id, IPFS
CID and times come from Certyo's verify answer for exactly that record hash. Every bundle is
run through the offline verifier before it is written, so a bundle on disk always verifies.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from bson import ObjectId

from certyo_dagster.capture.polling import utc_naive
from certyo_dagster.prove.bundle import SUFFIX, build_bundle, encode_bundle
from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.prove.verifier import verify_bundle_bytes
from certyo_dagster.sanitize.documents import PoisonDocumentError, sanitize_document
from certyo_dagster.sanitize.records import document_version, record_id_of
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.errors import CertyoNotFoundError
from certyo_dagster.verify.pending import ANCHORED

DEFAULT_MAX_LISTED = 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,80}")


class ExportError(ValueError):
    """A version for which no bundle can be written, and why."""


class ProofSource(Protocol):
    """What export needs from the Certyo client."""

    def verify_record(
        self, database: str, collection: str, record_id: str, record_hash: str | None = None
    ) -> dict: ...

    def query_records(
        self, *, database: str | None = None, collection: str | None = None,
        record_id: str | None = None, page_size: int = ...,
    ) -> Iterator[dict]: ...  # fmt: skip


def bundle_filename(spec: CollectionSpec, record_id: str, version: int) -> str:
    """`<db>.<c>.<recordId>.<version>.proof.json`; an unusual recordId is shortened to a
    safe prefix plus a digest, so no id can name a path outside the folder."""
    name = record_id
    if not _SAFE_NAME.fullmatch(record_id) or record_id.startswith("."):
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", record_id)[:40]
        name = (
            f"{safe}-{hashlib.sha256(record_id.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
        )
    return f"{spec.database}.{spec.collection}.{name}.{version}{SUFFIX}"


def id_candidates(text: str) -> list[Any]:
    """The `_id` values a command-line id may mean: the string, an ObjectId, an integer."""
    candidates: list[Any] = [text]
    if ObjectId.is_valid(text) and len(text) == 24:
        candidates.append(ObjectId(text))
    if re.fullmatch(r"-?[0-9]{1,18}", text):
        candidates.append(int(text))
    return candidates


class BundleExporter:
    """Builds bundles for one collection from MongoDB and Certyo."""

    def __init__(self, collection: Any, spec: CollectionSpec, certyo: ProofSource) -> None:
        self.collection = collection
        self.spec = spec
        self.certyo = certyo

    def find_document(self, text_id: str) -> dict:
        docs = list(self.collection.find({"_id": {"$in": id_candidates(text_id)}}, limit=3))
        if not docs:
            raise ExportError(f"{self._where} has no document with _id {text_id!r}")
        if len(docs) > 1:
            kinds = ", ".join(type(d["_id"]).__name__ for d in docs)
            raise ExportError(f"_id {text_id!r} matches several documents ({kinds})")
        return docs[0]

    def bundle_for(self, doc: Mapping[str, Any], version: int | None = None) -> dict:
        """The bundle of `doc`'s anchored version, or of `version` of it."""
        record_id = record_id_of(doc["_id"])
        held = doc.get("certyo_version")
        if version is None:
            if doc.get("certyo_status") != ANCHORED:
                raise ExportError(
                    f"{record_id}: not anchored (certyo_status {doc.get('certyo_status')!r}); "
                    "name an anchored --version"
                )
            version = held
        if not isinstance(version, int):
            raise ExportError(f"{record_id}: the document holds no certyo_version")
        payload = self._payload_from_document(doc, version)
        if payload is None:
            payload = self._payload_from_certyo(record_id, version)
        return self._bundle(record_id, version, payload)

    def _payload_from_document(self, doc: Mapping[str, Any], version: int) -> Any | None:
        """The document's payload when it still is exactly `version` as anchored."""
        if doc.get("certyo_version") != version or doc.get("certyo_status") != ANCHORED:
            return None
        try:
            if document_version(doc, self.spec) != version:
                return None  # edited since: the anchored payload is only at Certyo now
            payload = sanitize_document(doc)
        except PoisonDocumentError:
            return None
        if record_hash(payload) != doc.get("certyo_record_hash"):
            raise ExportError(
                f"{record_id_of(doc['_id'])}: the document no longer hashes to its anchored "
                "certyo_record_hash (changed without a new timestamp); see the tamper audit"
            )
        return payload

    def _payload_from_certyo(self, record_id: str, version: int) -> Any:
        for record in self.certyo.query_records(
            database=self.spec.database, collection=self.spec.collection, record_id=record_id
        ):
            if str(record.get("recordVersion")) == str(version) and record.get("recordId") == (
                record_id
            ):
                payload = record.get("recordPayload")
                if payload is None:
                    break
                if record_hash(payload) != record.get("recordHash"):
                    raise ExportError(
                        f"{record_id} version {version}: Certyo's stored payload does not hash "
                        f"to its recordHash {record.get('recordHash')}"
                    )
                return payload
        raise ExportError(
            f"{record_id} version {version}: neither MongoDB nor Certyo holds that version's "
            "payload"
        )

    def _bundle(self, record_id: str, version: int, payload: Any) -> dict:
        digest = record_hash(payload)
        try:
            answer = self.certyo.verify_record(
                self.spec.database, self.spec.collection, record_id, digest
            )
        except CertyoNotFoundError:
            raise ExportError(
                f"{record_id} version {version}: Certyo has no record of it"
            ) from None
        proof = answer.get("merkleProof")
        if not (answer.get("anchoredOnChain") and answer.get("transactionHash") and proof):
            raise ExportError(
                f"{record_id} version {version}: not anchored on chain yet (Certyo status "
                f"{answer.get('status')!r})"
            )
        if answer.get("recordHash") != digest:
            raise ExportError(
                f"{record_id} version {version}: Certyo verified {answer.get('recordHash')}, "
                f"not {digest}"
            )
        try:
            bundle = build_bundle(
                database=self.spec.database,
                collection=self.spec.collection,
                document_id=payload["_id"],
                record_id=record_id,
                version=version,
                timestamp_field=self.spec.timestamp_field,
                payload=payload,
                record_hash=digest,
                leaf_index=proof["leafIndex"],
                tree_size=proof["treeSize"],
                audit_path=list(proof["auditPath"]),
                root=answer["merkleRoot"],
                chain_id=answer.get("chainId"),
                transaction_hash=answer["transactionHash"],
                block_number=answer["blockNumber"],
                ipfs_cid=answer.get("ipfsCid"),
                ingested_at=answer["acceptedAt"],
                anchored_at=answer["anchoredAt"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ExportError(
                f"{record_id} version {version}: Certyo's verify answer lacks {exc}"
            ) from None
        verdict = verify_bundle_bytes(encode_bundle(bundle), f"{record_id}@{version}")
        if not verdict.ok:
            raise ExportError(f"{record_id} version {version}: {verdict.step}: {verdict.message}")
        return bundle

    def write(self, bundle: dict, target: Path) -> Path:
        """Write `bundle` to `target` (a folder gets the bundle's own file name)."""
        document = bundle["document"]
        if target.is_dir():
            target = target / bundle_filename(self.spec, document["recordId"], document["version"])
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_bytes(encode_bundle(bundle))
        os.replace(temporary, target)
        return target

    def export_anchored_since(
        self,
        since: datetime | None,
        folder: Path,
        *,
        max_listed: int = DEFAULT_MAX_LISTED,
        skip_existing: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> ExportReport:
        """A bundle per document anchored (certyo_verified_at) at or after `since`.

        With `skip_existing`, a version whose bundle file is already in `folder` is left
        alone without asking Certyo (`report.already_exported`), so overlapping windows
        cost nothing and `report.written` counts only new bundles.
        """
        started = time.monotonic()
        report = ExportReport(folder=folder)
        folder.mkdir(parents=True, exist_ok=True)
        query: dict[str, Any] = {"certyo_status": ANCHORED}
        if since is not None:
            query["certyo_verified_at"] = {"$gte": utc_naive(since)}
        # No sort: a sort without a matching index is bounded by the server's sort memory.
        for doc in self.collection.find(query):
            if skip_existing and isinstance(doc.get("certyo_version"), int):
                name = bundle_filename(self.spec, record_id_of(doc["_id"]), doc["certyo_version"])
                if (folder / name).exists():
                    report.already_exported += 1
                    continue
            try:
                path = self.write(self.bundle_for(doc), folder)
            except ExportError as exc:
                report.skipped += 1
                if len(report.problems) < max_listed:
                    report.problems.append(str(exc))
                continue
            report.written += 1
            if len(report.files) < max_listed:
                report.files.append(path.name)
            verified_at = doc.get("certyo_verified_at")
            if isinstance(verified_at, datetime):
                report.anchored_through = max(report.anchored_through or verified_at, verified_at)
            if log is not None and report.written % 1000 == 0:
                log(f"{report.written} bundles written to {folder}")
        report.elapsed_seconds = time.monotonic() - started
        return report

    @property
    def _where(self) -> str:
        return f"{self.spec.database}.{self.spec.collection}"


@dataclass
class ExportReport:
    folder: Path
    written: int = 0
    skipped: int = 0
    already_exported: int = 0
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    anchored_through: datetime | None = None
    elapsed_seconds: float = 0.0
