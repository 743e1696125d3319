"""The source side: how the pipeline reaches MongoDB.

One client per process and URI: Dagster builds resources for every run and every sensor tick,
and a new MongoClient each time would cost a connection handshake each time (pitfall 6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pymongo
from bson.codec_options import CodecOptions
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from certyo_dagster.clients import ProcessClients

_clients: ProcessClients[Any] = ProcessClients()

EMBEDDED_SCHEME = "montydb://"


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by `***`, safe for logs and errors.

    Works on the raw text rather than `urlsplit`, which gives up on passwords holding an
    unescaped `/`, `?` or `#` and would hand the URI back untouched.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "<MongoDB URI without a scheme>" if "@" in uri else uri
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        return uri
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hosts}"


# Legacy data can hold invalid UTF-8. Strict decoding would make the cursor raise and crash
# the whole run; surrogateescape turns the bad bytes into lone surrogates, which the sanitizer
# dead-letters as one document. pymongo refuses this handler as a MongoClient option (only
# strict, replace and ignore, which would ship a silently altered record) but takes it as the
# codec options of a database.
SURROGATE_ESCAPE_CODEC = CodecOptions(
    tz_aware=False, unicode_decode_error_handler="surrogateescape"
)


def open_database(client: Any, name: str) -> Any:
    """Database `name` of `client`, decoding invalid UTF-8 as lone surrogates."""
    try:
        return client.get_database(name, codec_options=SURROGATE_ESCAPE_CODEC)
    except NotImplementedError:  # mongomock, which cannot store invalid UTF-8 anyway
        return client[name]


def open_client(uri: str) -> Any:
    """A MongoClient-compatible client for `uri`, shared by everything in this process."""

    def create() -> Any:
        if uri.startswith(EMBEDDED_SCHEME):
            from certyo_dagster.source.embedded import open_embedded_client

            return open_embedded_client(uri)
        return pymongo.MongoClient(uri, tz_aware=False, connect=False, appname="certyo-dagster")

    return _clients.get(uri, create)


def close_all_clients() -> None:
    """Close every cached client (tests and process shutdown)."""
    _clients.close_all()


def upsert_with_retry(
    collection: Any, filter: Mapping[str, Any], update: Mapping[str, Any]
) -> dict[str, Any] | None:
    """`update_one(filter, update, upsert=True)` that survives a concurrent upsert; returns
    the document as stored afterwards.

    Two processes upserting the same new `_id` race to insert it and the loser gets
    DuplicateKeyError, on MongoDB as here. The document exists by then, so one retry updates
    it. If the retry collides too (the stored document has the `_id` but fails the rest of the
    filter), the other writer won: the stored document is re-read and returned as it is.
    """
    for attempt in range(2):
        try:
            collection.update_one(dict(filter), dict(update), upsert=True)
            break
        except DuplicateKeyError:
            if attempt == 1:
                break
    key = {"_id": filter["_id"]} if "_id" in filter else dict(filter)
    return collection.find_one(key)


def bulk_update(collection: Any, updates: Sequence[UpdateOne], what: str) -> Any:
    """`bulk_write` of conditional updates, unordered; a write error names `what` failed."""
    try:
        return collection.bulk_write(list(updates), ordered=False)
    except BulkWriteError as exc:
        failed = len(exc.details.get("writeErrors", []))
        raise PyMongoError(f"{what} failed for {failed} documents") from exc


DUPLICATE_KEY = 11000


def bulk_upsert(collection: Any, upserts: Sequence[UpdateOne], what: str) -> Any:
    """`bulk_update` of upserts that survives a concurrent upsert of the same `_id`.

    An upsert that lost the race to insert (E11000, see `upsert_with_retry`) is sent once more,
    alone with the others that lost: the document exists by then, so it is an update. Upserts
    that landed are not sent twice, so an `$inc` counts once.
    """
    ops = list(upserts)
    try:
        return collection.bulk_write(ops, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
            raise PyMongoError(f"{what} failed for {len(errors)} documents") from exc
        lost = [ops[e["index"]] for e in errors]
    return bulk_update(collection, lost, what)


# createIndex failures that must not fail a run: the same keys under another name (85), a
# name taken by other keys (86), no createIndex privilege (13). Reads still work without it.
_INDEX_PROBLEMS = {13: "not authorized", 85: "same keys, other options", 86: "name in use"}


def ensure_index(collection: Any, keys: list[tuple[str, int]], name: str) -> str | None:
    """Create the index unless one with the same key pattern exists; a warning, or None.

    Many deployments create indexes themselves, under MongoDB's default names; a second
    index with the same keys would be refused, and a user without createIndex cannot make
    one at all. Neither is a reason to stop shipping data.
    """
    wanted = [(field, int(direction)) for field, direction in keys]
    for info in collection.index_information().values():
        if [(field, int(direction)) for field, direction in info["key"]] == wanted:
            return None
    try:
        collection.create_index(keys, name=name)
    except OperationFailure as exc:
        if exc.code not in _INDEX_PROBLEMS:
            raise
        return (
            f"index {name} on {wanted} was not created ({_INDEX_PROBLEMS[exc.code]}); "
            "reads on it will scan"
        )
    return None


class MongoResource(dg.ConfigurableResource):
    """The watched MongoDB deployment. `uri` comes from `EnvVar("MONGO_URI")`."""

    uri: str
    database: str = "productdb"

    def get_client(self) -> Any:
        return open_client(self.uri)

    def get_database(self) -> Any:
        return open_database(self.get_client(), self.database)

    def get_collection(self, name: str) -> Any:
        return self.get_database()[name]

    @property
    def display_uri(self) -> str:
        return redact_uri(self.uri)
