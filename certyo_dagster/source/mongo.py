"""The source side: how the pipeline reaches MongoDB.

One client per process and URI: Dagster builds resources for every run and every sensor tick,
and a new MongoClient each time would cost a connection handshake each time (pitfall 6).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg
import pymongo
from bson.codec_options import CodecOptions
from pymongo import UpdateOne
from pymongo.errors import (
    BulkWriteError,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from certyo_dagster.clients import ProcessClients

_clients: ProcessClients[Any] = ProcessClients()

# The driver's appName: the name this pipeline's connections carry in MongoDB's logs,
# `currentOp` and profiler output.
APP_NAME = "certyo-dagster"


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


def redact_uri_text(text: str, uri: str) -> str:
    """`text` without the MongoDB URI's password: the URI is replaced by its redacted form,
    and the password is masked wherever else it appears."""
    if not uri:
        return text
    if uri in text:
        text = text.replace(uri, redact_uri(uri))
    _, sep, rest = uri.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    password = userinfo.partition(":")[2] if sep and at else ""
    if password:
        text = text.replace(password, "***")
    return text


# pymongo's server-selection message ends with the whole topology (every server's state,
# repeated) and names its configured timeouts in each server's entry; neither helps a reader.
_DRIVER_NOISE = re.compile(r" \(configured timeouts: [^)]*\)")
_MAX_MESSAGE = 400


def describe_mongo_error(exc: BaseException, uri: str) -> str:
    """One short, redacted line for a MongoDB failure, the same in a step and a sensor tick:
    `MongoDB at <uri> failed: <Type>: <what the driver saw>`."""
    text = str(exc)
    if isinstance(exc, ServerSelectionTimeoutError):
        servers, _, rest = text.partition(", Timeout: ")
        waited = rest.split("s,", 1)[0] if rest else ""
        text = _DRIVER_NOISE.sub("", servers).replace(",", "; ")
        if waited:
            text += f" (no usable server within {waited} s)"
    else:
        text = _DRIVER_NOISE.sub("", text)
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 1] + "…"
    return redact_uri_text(
        f"MongoDB at {redact_uri(uri)} failed: {type(exc).__name__}: {text}", uri
    )


class MongoUnavailableError(RuntimeError):
    """A MongoDB failure in a sensor or schedule tick, described by `describe_mongo_error`."""


def describe_mongo_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """For a sensor or schedule function with a `mongo` resource: a MongoDB failure fails the
    tick with one short, redacted line (as a step failure reads), not the driver's full text."""

    @functools.wraps(fn)
    def evaluate(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PyMongoError as exc:
            mongo = kwargs.get("mongo")
            uri = getattr(mongo, "uri", "") or ""
            raise MongoUnavailableError(describe_mongo_error(exc, uri)) from None

    return evaluate


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
    return client.get_database(name, codec_options=SURROGATE_ESCAPE_CODEC)


def open_client(uri: str) -> Any:
    """The `pymongo.MongoClient` for `uri`, shared by everything in this process."""

    def create() -> Any:
        return pymongo.MongoClient(uri, tz_aware=False, connect=False, appname=APP_NAME)

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
