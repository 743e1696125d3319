"""The embedded store for demo mode: montydb on SQLite, shared by every Dagster process.

`MONGO_URI=montydb:///abs/path` (or `montydb://relative/path`) opens a directory of SQLite
files (one per collection) that the webserver, the daemon, each run's subprocess and
`certyo-demo churn` all read and write. It exists so `make run` needs no MongoDB server. It is
not MongoDB, and nothing outside demo mode should use it.

What the pipeline relies on, checked on montydb 2.5 and mongomock by tests/source/test_embedded.py
(the pipeline's own builders in extract.py and verify.py are run there too):

Works as on MongoDB
- `find(filter, projection, sort=[(ts, 1), ("_id", 1)], limit=n)` with the keyset filter
  `{"$and": [{ts: {"$gte": start, "$lt": end}},
             {"$or": [{ts: {"$gt": t}}, {ts: t, "_id": {"$gt": id}},
                      {ts: t, "_id": <lower bound of each later BSON type>}]}]}`,
  including ties on `ts` across page boundaries and `_id`s of mixed BSON types.
- `find({"certyo_status": "pending", ...}, sort=[("_id", 1)], limit=n)` keyset pages by `_id`.
- `find_one(filter, sort=...)`, `count_documents(filter)`, `{ts: None}` matching a missing
  field, `$type: "date"`, `$not`.
- `update_one({"_id": id, ts: t}, {"$set": ...})` (the conditional write-back: no match when
  the document changed since it was read); `update_one(..., upsert=True)` with `$set`,
  `$setOnInsert` and `$inc`; `insert_one` raising DuplicateKeyError on an existing `_id`.
- Round trips of naive UTC datetimes (truncated to milliseconds, as BSON does), Decimal128,
  Binary (subtype 0 comes back as `bytes`, as with pymongo; UUIDs must be stored as
  `Binary.from_uuid(u)`, as pymongo requires without a `uuidRepresentation`), Int64, ObjectId,
  DBRef and nested arrays of documents.

Differs, and what this module does about it (montydb itself is left unmodified on disk)
- `bulk_write` raises NotImplementedError (so `getattr(c, "bulk_write", None)` raises too).
  `EmbeddedCollection.bulk_write` applies InsertOne/UpdateOne/UpdateMany/ReplaceOne/
  DeleteOne/DeleteMany one by one under the write lock and returns a pymongo
  BulkWriteResult. Unlike MongoDB, an error stops the batch (no per-operation writeErrors).
- Errors are montydb's own classes (`montydb.errors.DuplicateKeyError`, and a bare
  `StorageDuplicateKeyError` when an upsert loses an insert race), which `except
  pymongo.errors.DuplicateKeyError` does not catch. They are re-raised as pymongo's.
- `cursor.batch_size(n)` does not exist: montydb's cursor gets a no-op one.
- `$type: "symbol"` raises OperationFailure "Unknown type name alias: symbol" (the keyset
  filters listed it before they switched to lower bounds per type): the alias is added to
  montydb's table (no stored value can have that type; pymongo decodes symbols as str).
- Updates are read-modify-write in Python, so a writer in another process could slip in
  between the read and the write and be overwritten (a lost churn edit, or a write-back
  landing on a newer version). Every write here takes an exclusive `flock` on
  `<path>/.certyo-write.lock`: writes through this module are serialised across processes.
- Every query decodes the whole collection (~0.1 s per query for 3,000 products).
  Operations whose filter pins `_id` to an ObjectId or string (update/find_one/count/delete/
  replace) read that one SQLite row instead, with the filter still applied: an update by
  `_id` costs ~2 ms instead of ~120 ms, which is what makes write-back of a partition
  seconds rather than minutes.
- montydb's SQLite engine keeps its current connection on a shared attribute, so two threads
  could close each other's connection. The engine is replaced by one that opens a private
  connection per call.
- `create_index` is a no-op (there are no indexes), `list_collection_names` counts SQLite's
  -wal/-shm files as collections (filtered here), no change streams, no transactions.

Fine for a demo catalog of a few thousand documents; hopeless for production volumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors
from bson import ObjectId
from pymongo.errors import DuplicateKeyError
from pymongo.results import BulkWriteResult

from certyo_dagster.source.mongo import EMBEDDED_SCHEME

_LOCK_FILE = ".certyo-write.lock"
_SQLITE_TIMEOUT_SECONDS = 30.0


class EmbeddedStoreError(ValueError):
    """A `MONGO_URI` with the montydb scheme that cannot be opened."""


def embedded_path(uri: str) -> Path:
    """The directory a `montydb://` URI names: `montydb:///abs` or `montydb://relative`."""
    if not uri.startswith(EMBEDDED_SCHEME):
        raise EmbeddedStoreError(
            f"MONGO_URI must start with {EMBEDDED_SCHEME} for the embedded store"
        )
    raw = uri[len(EMBEDDED_SCHEME) :]
    if not raw or raw == ":memory:" or "?" in raw:
        raise EmbeddedStoreError(
            "MONGO_URI=montydb://... must name a directory, e.g. montydb:///tmp/certyo-demo "
            "(in-memory stores and query options are not supported: every Dagster process "
            "must share the same files)"
        )
    return Path(raw).resolve()


_CREATE_DOCUMENTS = (
    "CREATE TABLE IF NOT EXISTS documents (k text NOT NULL, v text NOT NULL, PRIMARY KEY(k))"
)


def _engine_class() -> type:
    from montydb.storage.sqlite import SQLiteKVEngine

    class PerCallConnectionEngine(SQLiteKVEngine):
        """montydb's engine, minus the connection kept on `self` that threads would share."""

        def __init__(self, config: Mapping[str, Any]) -> None:
            super().__init__(config)
            self._journal_mode = config.get("journal_mode", "WAL")

        def _connect(self, db_file: str, wconcern: Any = None) -> Any:
            conn = sqlite3.connect(
                db_file, timeout=_SQLITE_TIMEOUT_SECONDS, check_same_thread=False
            )
            conn.text_factory = str
            conn.executescript(
                f"PRAGMA journal_mode={self._journal_mode};PRAGMA synchronous=NORMAL;"
                f"PRAGMA busy_timeout={int(_SQLITE_TIMEOUT_SECONDS * 1000)};"
                # montydb takes an existing file for an existing collection. A process killed
                # between creating the file and committing its table left an empty file that
                # no later read or write could use; create the table whenever it is missing.
                f"{_CREATE_DOCUMENTS}"
            )
            return contextlib.closing(conn)

        def create_table(self, db_file: str) -> None:
            with self._connect(db_file):
                pass  # `_connect` creates the table

        def read_key(self, db_file: str, key: Any) -> list[Any]:
            if not os.path.isfile(db_file):
                return []
            with self._connect(db_file) as conn:
                return conn.execute("SELECT v FROM documents WHERE k = ?", (key,)).fetchall()

    return PerCallConnectionEngine


# (collection file, encoded _id) while an operation whose filter pins `_id` runs in this thread
_only_key = threading.local()
_KEYED_ID_TYPES = (ObjectId, str)


def _patch_montydb() -> None:
    """Give montydb's cursor pymongo's `batch_size` (a no-op here: every query reads everything),
    and make it read one row, not the whole collection, when the filter pins `_id`.

    montydb answers every query by decoding every document of the collection; for an update
    by `_id` that costs ~100 ms on 3,000 products, so writing back a partition took minutes.
    The filter is still applied to the row read, so results are the same as with a full scan.
    """
    from montydb.cursor import MontyCursor
    from montydb.engine import queries
    from montydb.storage.sqlite import SQLiteCollection, SQLiteCursor

    if not hasattr(MontyCursor, "batch_size"):
        MontyCursor.batch_size = lambda self, _size: self
    # montydb rejects the deprecated alias "symbol" that keyset filters list among the types
    # sorting after numbers; pymongo decodes symbols as str, so no stored value has type 14.
    queries.BSON_TYPE_ALIAS_ID.setdefault("symbol", 14)
    queries._BSON_TYPE_ID = tuple(queries.BSON_TYPE_ALIAS_ID.values())
    if getattr(SQLiteCollection.contractor_cls, "reads_one_key", False):
        return

    class KeyedCursor(SQLiteCursor):
        reads_one_key = True

        def query(self, max_scan: int) -> Iterator[Any]:
            hint = getattr(_only_key, "value", None)
            if hint is None or hint[0] != self._col_path:
                return super().query(max_scan)
            rows = self._conn.read_key(self._col_path, hint[1])
            return (self._decode_doc(row[0]) for row in rows)

    SQLiteCollection.contractor_cls = KeyedCursor


class _WriteLock:
    """Exclusive across processes (flock on a file) and across threads (an RLock)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None


@contextlib.contextmanager
def pymongo_errors() -> Iterator[None]:
    """Re-raise montydb's errors as pymongo's, so `except DuplicateKeyError` works on both."""
    from montydb import errors as monty
    from montydb.storage import StorageDuplicateKeyError

    try:
        yield
    except monty.DuplicateKeyError as exc:
        raise DuplicateKeyError(str(exc), 11000, exc.details) from exc
    except StorageDuplicateKeyError as exc:  # an upsert that lost the race to insert
        raise DuplicateKeyError("E11000 duplicate key error (upsert)", 11000) from exc
    except monty.BulkWriteError as exc:
        raise pymongo.errors.BulkWriteError(exc.details) from exc
    except monty.WriteError as exc:
        raise pymongo.errors.WriteError(str(exc), exc.code, exc.details) from exc
    except monty.OperationFailure as exc:
        raise pymongo.errors.OperationFailure(str(exc), exc.code, exc.details) from exc


class EmbeddedCollection:
    """A montydb collection whose writes are serialised and which has `bulk_write`."""

    def __init__(self, collection: Any, lock: _WriteLock, file: str) -> None:
        self._collection = collection
        self._lock = lock
        self._file = file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    @contextlib.contextmanager
    def _keyed(self, filter: Any) -> Iterator[None]:
        doc_id = filter.get("_id") if isinstance(filter, Mapping) else None
        if type(doc_id) not in _KEYED_ID_TYPES:
            yield
            return
        from montydb.types import bson as monty_bson

        _only_key.value = (self._file, monty_bson.id_encode(doc_id))
        try:
            yield
        finally:
            _only_key.value = None

    @contextlib.contextmanager
    def _writing(self, filter: Any = None) -> Iterator[None]:
        with self._lock.held(), pymongo_errors(), self._keyed(filter):
            yield

    def __repr__(self) -> str:
        return f"EmbeddedCollection({self._collection.full_name!r})"

    @property
    def name(self) -> str:
        return self._collection.name

    def find(self, *args: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        # montydb reads everything per query anyway; batch_size has nothing to tune.
        with pymongo_errors():
            return self._collection.find(*args, **kwargs)

    def find_one(self, filter: Any = None, *args: Any, **kwargs: Any) -> Any:
        with pymongo_errors(), self._keyed(filter):
            return self._collection.find_one(filter, *args, **kwargs)

    def count_documents(self, filter: Any, **kwargs: Any) -> int:
        with pymongo_errors(), self._keyed(filter):
            return self._collection.count_documents(filter, **kwargs)

    def create_index(self, keys: Any, **kwargs: Any) -> str:
        """No-op (montydb has no indexes); returns the name MongoDB would give the index."""
        if isinstance(keys, str):
            keys = [(keys, pymongo.ASCENDING)]
        return kwargs.get("name") or "_".join(f"{field}_{direction}" for field, direction in keys)

    def create_indexes(self, indexes: Sequence[Any]) -> list[str]:
        return [index.document["name"] for index in indexes]

    def index_information(self) -> dict[str, Any]:
        """Only the implicit `_id` index, as MongoDB reports it: montydb has no others."""
        return {"_id_": {"key": [("_id", pymongo.ASCENDING)], "v": 2}}

    def insert_one(self, document: Any, *args: Any, **kwargs: Any) -> Any:
        with self._writing():
            return self._collection.insert_one(document, *args, **kwargs)

    def insert_many(self, documents: Any, *args: Any, **kwargs: Any) -> Any:
        with self._writing():
            return self._collection.insert_many(documents, *args, **kwargs)

    def update_one(self, filter: Any, update: Any, upsert: bool = False, **kwargs: Any) -> Any:
        with self._writing(filter):
            return self._collection.update_one(filter, update, upsert=upsert, **kwargs)

    def update_many(self, filter: Any, update: Any, upsert: bool = False, **kwargs: Any) -> Any:
        with self._writing():
            return self._collection.update_many(filter, update, upsert=upsert, **kwargs)

    def replace_one(
        self, filter: Any, replacement: Any, upsert: bool = False, **kwargs: Any
    ) -> Any:
        with self._writing(filter):
            return self._collection.replace_one(filter, replacement, upsert=upsert, **kwargs)

    def delete_one(self, filter: Any, **kwargs: Any) -> Any:
        with self._writing(filter):
            return self._collection.delete_one(filter)

    def delete_many(self, filter: Any, **kwargs: Any) -> Any:
        with self._writing():
            return self._collection.delete_many(filter)

    def find_one_and_update(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        with self._writing(filter):
            return self._collection.find_one_and_update(filter, update, **kwargs)

    def bulk_write(self, requests: Sequence[Any], ordered: bool = True, **kwargs: Any) -> Any:
        """pymongo's `bulk_write`, applied one operation at a time under the write lock."""
        counts = {"nInserted": 0, "nMatched": 0, "nModified": 0, "nRemoved": 0, "nUpserted": 0}
        upserted: list[dict[str, Any]] = []
        with self._writing():
            for index, request in enumerate(requests):
                doc = getattr(request, "_doc", None)
                flt = getattr(request, "_filter", None)
                upsert = bool(getattr(request, "_upsert", False))
                if isinstance(request, pymongo.InsertOne):
                    self.insert_one(doc)
                    counts["nInserted"] += 1
                    continue
                if isinstance(request, pymongo.UpdateOne):
                    result = self.update_one(flt, doc, upsert=upsert)
                elif isinstance(request, pymongo.UpdateMany):
                    result = self.update_many(flt, doc, upsert=upsert)
                elif isinstance(request, pymongo.ReplaceOne):
                    result = self.replace_one(flt, doc, upsert=upsert)
                elif isinstance(request, pymongo.DeleteOne):
                    counts["nRemoved"] += self.delete_one(flt).deleted_count
                    continue
                elif isinstance(request, pymongo.DeleteMany):
                    counts["nRemoved"] += self.delete_many(flt).deleted_count
                    continue
                else:
                    raise TypeError(f"bulk_write operation {index} is not supported: {request!r}")
                if result.upserted_id is not None:
                    counts["nUpserted"] += 1
                    upserted.append({"index": index, "_id": result.upserted_id})
                else:
                    counts["nMatched"] += result.matched_count
                    counts["nModified"] += result.modified_count
        raw = {**counts, "upserted": upserted, "writeErrors": [], "writeConcernErrors": []}
        return BulkWriteResult(raw, True)


class EmbeddedDatabase:
    """A montydb database that hands out `EmbeddedCollection`s."""

    def __init__(self, database: Any, lock: _WriteLock, path: str) -> None:
        self._database = database
        self._lock = lock
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.get_collection(name)

    def __getitem__(self, name: str) -> EmbeddedCollection:
        return self.get_collection(name)

    def __repr__(self) -> str:
        return f"EmbeddedDatabase({self._database.name!r})"

    @property
    def name(self) -> str:
        return self._database.name

    def get_collection(self, name: str, **_: Any) -> EmbeddedCollection:
        file = os.path.join(self._path, self._database.name, name) + ".collection"
        return EmbeddedCollection(self._database[name], self._lock, file)

    def list_collection_names(self) -> list[str]:
        # montydb lists every file, so SQLite's -wal and -shm files would repeat names.
        folder = Path(self._path) / self._database.name
        if not folder.is_dir():
            return []
        return sorted(p.name[: -len(".collection")] for p in folder.glob("*.collection"))

    def drop_collection(self, name: str) -> None:
        with self._lock.held():
            self._database.drop_collection(name)


class EmbeddedClient:
    """The part of `pymongo.MongoClient` the pipeline uses, backed by montydb files."""

    def __init__(self, client: Any, path: Path, lock: _WriteLock) -> None:
        self._client = client
        self._lock = lock
        self.path = path

    def __getitem__(self, name: str) -> EmbeddedDatabase:
        return self.get_database(name)

    def __repr__(self) -> str:
        return f"EmbeddedClient({str(self.path)!r})"

    def get_database(self, name: str, **_: Any) -> EmbeddedDatabase:
        return EmbeddedDatabase(self._client[name], self._lock, str(self.path))

    def list_database_names(self) -> list[str]:
        return list(self._client.list_database_names())

    def drop_database(self, name: str) -> None:
        with self._lock.held():
            self._client.drop_database(name)

    def close(self) -> None:
        self._client.close()


def open_embedded_client(uri: str) -> EmbeddedClient:
    """A client on the montydb SQLite store named by `uri`, created on first use."""
    from montydb import MontyClient, set_storage

    path = embedded_path(uri)
    path.mkdir(parents=True, exist_ok=True)
    lock = _WriteLock(path / _LOCK_FILE)
    marker = path / ".monty.storage"
    with lock.held():
        if not marker.exists():
            set_storage(str(path), storage="sqlite", use_bson=True)
        storage = marker.read_text().strip()
        if storage != "sqlite":
            raise EmbeddedStoreError(
                f"the montydb store at {path} uses the {storage!r} engine; "
                "certyo_dagster needs 'sqlite' (delete the directory to start over)"
            )
        client = MontyClient(str(path))
    client._storage._conn = _engine_class()(client._storage._config)
    _patch_montydb()
    return EmbeddedClient(client, path, lock)
