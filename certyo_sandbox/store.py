"""SQLite persistence for the sandbox: records, anchoring batches and idempotency keys.

One connection, used from the server's event-loop thread only. Every ingest call is one
transaction with `executemany`, so a bulk call is stored completely or not at all, and
everything (including accepted-but-not-yet-anchored records) survives a restart on the
same database file.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from certyo_dagster.prove.hashing import record_hash_bytes
from certyo_dagster.prove.merkle import proof_from_levels, tree_levels
from certyo_sandbox.validation import ApiError, FieldError, ValidRecord

# Block numbers start where a real Polygon PoS chain was in 2026, so they look plausible.
FIRST_BLOCK_NUMBER = 70_000_000
# orjson, which stores record bodies, refuses to write deeper documents.
MAX_STORED_DEPTH = 254
_SQLITE_MAX_PARAMS = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    database TEXT NOT NULL,
    collection TEXT NOT NULL,
    record_id TEXT NOT NULL,
    record_version TEXT NOT NULL,
    record_hash TEXT NOT NULL,
    accepted_at TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_id
    ON records (tenant, database, collection, record_id, seq);
-- Accepted records not yet in a batch. Kept apart from `records` so that flushing never
-- rewrites the large record rows.
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY,
    record_hash TEXT NOT NULL,
    accepted_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leaves (
    seq INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL,
    leaf_index INTEGER NOT NULL,
    audit_path BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY,
    merkle_root BLOB NOT NULL,
    tree_size INTEGER NOT NULL,
    flushed_ts REAL NOT NULL,
    block_number INTEGER NOT NULL,
    transaction_hash TEXT NOT NULL,
    ipfs_cid TEXT NOT NULL
);
-- Batches anchored on a real chain (`--chain-rpc`); kept apart from `batches` so database
-- files written without a chain open unchanged.
CREATE TABLE IF NOT EXISTS chain_anchors (
    batch_id INTEGER PRIMARY KEY,
    chain_id INTEGER NOT NULL,
    transaction_hash TEXT NOT NULL,
    block_number INTEGER NOT NULL,
    anchored_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    response BLOB NOT NULL,
    created_ts REAL NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
"""


def iso_utc(ts: float) -> str:
    """`2026-04-14T10:30:00.123Z`: the format Certyo uses for acceptedAt."""
    moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def batch_identity(root: bytes, block_number: int) -> tuple[str, str]:
    """Deterministic (ipfsCid, transactionHash) for a batch root anchored in a block."""
    cid = "bafy" + base64.b32encode(hashlib.sha256(root).digest()).decode().lower().rstrip("=")
    tx = "0x" + hashlib.sha256(root + block_number.to_bytes(8, "big")).hexdigest()
    return cid, tx


@dataclass(frozen=True)
class IngestOutcome:
    """Per-record results in request order, and how many were new or replayed."""

    results: list[dict[str, Any]]
    accepted: int
    replayed: int


@dataclass(frozen=True)
class StoredVersion:
    """One stored record version with its anchoring state, as verify needs it."""

    fields: dict[str, Any]
    record_hash: str
    accepted_at: str
    leaf_index: int | None
    audit_path: list[bytes]
    merkle_root: bytes | None
    tree_size: int | None
    flushed_ts: float | None
    block_number: int | None
    transaction_hash: str | None
    ipfs_cid: str | None
    chain_id: int | None = None
    chain_transaction_hash: str | None = None
    chain_block_number: int | None = None
    chain_anchored_ts: float | None = None


class SandboxStore:
    """Records, batches and idempotency keys in one SQLite database."""

    def __init__(self, db_path: str) -> None:
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        if db_path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            # A sandbox must survive a process crash (the OS keeps written pages), not a
            # power cut; skipping fsync keeps disk latency out of benchmarks.
            self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA cache_size=-65536")  # 64 MiB keeps index pages hot
        self._db.executescript(_SCHEMA)
        self.pending_records, self.oldest_pending_ts = self._db.execute(
            "SELECT COUNT(*), MIN(accepted_ts) FROM pending"
        ).fetchone()
        self.records_stored, last_seq = self._db.execute(
            "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM records"
        ).fetchone()
        # Sequence numbers are assigned here (one writer), so a bulk insert knows its rows.
        self._next_seq = last_seq + 1
        self.batches_anchored = self._db.execute("SELECT COUNT(*) FROM batches").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # -- ingest -----------------------------------------------------------------------

    def ingest(
        self, tenant: str, records: Sequence[ValidRecord], now: float, *, bulk: bool
    ) -> IngestOutcome:
        """Store new records and replay idempotent repeats, atomically.

        A key reused with a different record rejects the whole call with 422 and stores
        nothing. Repeats of a key inside one call are replays of its first occurrence.
        """
        accepted_at = iso_utc(now)
        known = self._known_keys(tenant, {r.idempotency_key for r in records} - {None})
        results: list[dict[str, Any]] = []
        new_rows: list[tuple[Any, ...]] = []
        new_pending: list[tuple[Any, ...]] = []
        seq = self._next_seq
        new_keys: list[tuple[Any, ...]] = []
        conflicts: list[FieldError] = []
        too_deep: list[FieldError] = []
        replayed = 0
        for i, record in enumerate(records):
            key = record.idempotency_key
            if key is not None and key in known:
                fingerprint, response = known[key]
                if fingerprint != record.fingerprint:
                    conflicts.append(
                        FieldError(
                            f"records[{i}].idempotencyKey" if bulk else "idempotencyKey",
                            "idempotencyKey was already used with a different record",
                            i if bulk else None,
                        )
                    )
                    continue
                results.append({**response, "idempotencyReplayed": True})
                replayed += 1
                continue
            fields = record.fields
            response = {
                "recordId": fields["recordId"],
                "recordHash": record.record_hash,
                "tenantId": tenant,
                "acceptedAt": accepted_at,
                "recordVersion": fields["recordVersion"],
            }
            if key is not None:
                known[key] = (record.fingerprint, response)
                new_keys.append((tenant, key, record.fingerprint, orjson.dumps(response), now))
            try:
                body = orjson.dumps(fields)
            except orjson.JSONEncodeError:
                # RFC 8785 and orjson.loads take deeper nesting than orjson.dumps (254
                # levels); refuse it as bad input instead of failing to store it.
                too_deep.append(
                    FieldError(
                        f"records[{i}].recordPayload" if bulk else "recordPayload",
                        f"recordPayload nests deeper than {MAX_STORED_DEPTH} levels",
                        i if bulk else None,
                    )
                )
                continue
            new_pending.append((seq, record.record_hash, now))
            new_rows.append(
                (
                    seq,
                    tenant,
                    fields["database"],
                    fields["collection"],
                    fields["recordId"],
                    fields["recordVersion"],
                    record.record_hash,
                    accepted_at,
                    body,
                )
            )
            seq += 1
            results.append({**response, "idempotencyReplayed": False})
        if too_deep:
            raise ApiError(
                400,
                "validation_failed",
                f"recordPayload nests deeper than {MAX_STORED_DEPTH} levels; nothing was accepted",
                too_deep,
            )
        if conflicts:
            where = ", ".join(str(e.index) for e in conflicts if e.index is not None)
            raise ApiError(
                422,
                "idempotency_conflict",
                "idempotencyKey was already used with a different record"
                + (f" (records at index {where}); nothing was accepted" if bulk else ""),
                conflicts,
            )
        if new_rows:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO records (seq, tenant, database, collection, record_id,"
                    " record_version, record_hash, accepted_at, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    new_rows,
                )
                self._db.executemany("INSERT INTO pending VALUES (?, ?, ?)", new_pending)
                self._db.executemany(
                    "INSERT INTO idempotency (tenant, key, fingerprint, response, created_ts)"
                    " VALUES (?, ?, ?, ?, ?)",
                    new_keys,
                )
            self._next_seq = seq
            if self.pending_records == 0:
                self.oldest_pending_ts = now
            self.pending_records += len(new_rows)
            self.records_stored += len(new_rows)
        return IngestOutcome(results, len(new_rows), replayed)

    def _known_keys(self, tenant: str, keys: Iterable[str]) -> dict[str, tuple[bytes, dict]]:
        wanted = list(keys)
        known: dict[str, tuple[bytes, dict]] = {}
        for start in range(0, len(wanted), _SQLITE_MAX_PARAMS):
            chunk = wanted[start : start + _SQLITE_MAX_PARAMS]
            marks = ",".join("?" * len(chunk))
            sql = "SELECT key, fingerprint, response FROM idempotency WHERE tenant = ? AND key IN "
            rows = self._db.execute(f"{sql}({marks})", (tenant, *chunk))  # noqa: S608
            for key, fingerprint, response in rows:
                known[key] = (fingerprint, orjson.loads(response))
        return known

    # -- anchoring --------------------------------------------------------------------

    def flush(self, now: float, max_records: int) -> int:
        """Put up to `max_records` pending records, oldest first, into one new batch."""
        rows = self._db.execute(
            "SELECT seq, record_hash FROM pending ORDER BY seq LIMIT ?",
            (max_records,),
        ).fetchall()
        if not rows:
            return 0
        levels = tree_levels([record_hash_bytes(h) for _, h in rows])
        root = levels[-1][0]
        with self._transaction():
            batch_id = self._db.execute(
                "SELECT COALESCE(MAX(batch_id), 0) + 1 FROM batches"
            ).fetchone()[0]
            block_number = FIRST_BLOCK_NUMBER + batch_id
            cid, tx = batch_identity(root, block_number)
            self._db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (batch_id, root, len(rows), now, block_number, tx, cid),
            )
            self._db.executemany(
                "INSERT INTO leaves VALUES (?, ?, ?, ?)",
                (
                    (seq, batch_id, i, b"".join(proof_from_levels(i, levels)))
                    for i, (seq, _) in enumerate(rows)
                ),
            )
            self._db.execute("DELETE FROM pending WHERE seq <= ?", (rows[-1][0],))
        self.batches_anchored += 1
        self.pending_records -= len(rows)
        self.oldest_pending_ts = self._db.execute(
            "SELECT MIN(accepted_ts) FROM pending"
        ).fetchone()[0]
        return len(rows)

    # -- reads ------------------------------------------------------------------------

    def find_version(
        self,
        tenant: str,
        database: str,
        collection: str,
        record_id: str,
        record_hash: str | None,
    ) -> StoredVersion | None:
        """The latest version of a record, or its latest version with `record_hash`."""
        sql = (
            "SELECT r.body, r.record_hash, r.accepted_at, l.leaf_index, l.audit_path,"
            " b.merkle_root, b.tree_size, b.flushed_ts, b.block_number, b.transaction_hash,"
            " b.ipfs_cid, c.chain_id, c.transaction_hash, c.block_number, c.anchored_ts"
            " FROM records r LEFT JOIN leaves l ON l.seq = r.seq"
            " LEFT JOIN batches b ON b.batch_id = l.batch_id"
            " LEFT JOIN chain_anchors c ON c.batch_id = b.batch_id"
            " WHERE r.tenant = ? AND r.database = ? AND r.collection = ? AND r.record_id = ?"
        )
        params: list[Any] = [tenant, database, collection, record_id]
        if record_hash is not None:
            sql += " AND r.record_hash = ?"
            params.append(record_hash)
        row = self._db.execute(sql + " ORDER BY r.seq DESC LIMIT 1", params).fetchone()
        if row is None:
            return None
        body, digest, accepted_at, leaf_index, path, root, size, flushed, block, tx, cid = row[:11]
        audit_path = [path[i : i + 32] for i in range(0, len(path), 32)] if path else []
        return StoredVersion(
            orjson.loads(body),
            digest,
            accepted_at,
            leaf_index,
            audit_path,
            root,
            size,
            flushed,
            block,
            tx,
            cid,
            *row[11:],
        )

    def batches_off_chain(self, limit: int = 100) -> list[tuple[int, bytes]]:
        """(batch_id, root) of flushed batches not yet anchored on the chain, oldest first."""
        return self._db.execute(
            "SELECT b.batch_id, b.merkle_root FROM batches b"
            " LEFT JOIN chain_anchors c ON c.batch_id = b.batch_id"
            " WHERE c.batch_id IS NULL ORDER BY b.batch_id LIMIT ?",
            (limit,),
        ).fetchall()

    def record_chain_anchor(
        self, batch_id: int, chain_id: int, transaction_hash: str, block_number: int, now: float
    ) -> None:
        self._db.execute(
            "INSERT INTO chain_anchors VALUES (?, ?, ?, ?, ?)",
            (batch_id, chain_id, transaction_hash, block_number, now),
        )

    def query(
        self, tenant: str, filters: dict[str, str], after_seq: int, limit: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One page of a tenant's records in insertion order, and the last seq if more follow."""
        columns = {"database": "database", "collection": "collection", "recordId": "record_id"}
        # Unless the filters pin one record (records_by_id then yields its versions in seq
        # order), walk seq order and filter: "+tenant" keeps SQLite from using the index
        # for tenant alone and sorting the tenant's every record. A tenant index would
        # make every insert pay for this paginated read.
        tenant_term = "tenant" if len(filters) == len(columns) else "+tenant"
        sql = (
            "SELECT seq, body, record_hash, accepted_at FROM records"  # noqa: S608
            f" WHERE {tenant_term} = ? AND seq > ?"
        )
        params: list[Any] = [tenant, after_seq]
        for name, value in filters.items():
            sql += f" AND {columns[name]} = ?"
            params.append(value)
        rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", (*params, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        page = []
        for _, body, digest, accepted_at in rows:
            record = orjson.loads(body)
            record["recordHash"] = digest
            record["acceptedAt"] = accepted_at
            page.append(record)
        return page, (rows[-1][0] if more else None)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN/COMMIT, or ROLLBACK when the block raises (the connection is in autocommit)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
