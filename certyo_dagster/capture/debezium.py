"""Debezium MongoDB change events (JSON converter, schemas on or off) as Certyo records.

Pure functions, no I/O: one Kafka message's key and value bytes in, a `Change` (or a reason
to skip it, or a `DebeziumPoisonError`) out, then the Certyo record of a `Change`.

What Debezium 3.x's MongoDB connector sends (docs/debezium.md shows one of each):
- key `{"id": "<Extended JSON of _id>"}`; value `{before, after, updateDescription, source, op,
  ts_ms, transaction}`, each wrapped as `{"schema": …, "payload": …}` when the converter's
  `schemas.enable` is on;
- `after` and `updateDescription.updatedFields` are Extended JSON strings. They are parsed
  into the BSON types `bson.json_util` gives (`ejson_loads`) and then sanitized exactly like a
  document read from MongoDB, so a version has the same record hash whichever capture mode
  read it;
- with `capture.mode=change_streams_update_full`, `after` of an update is the document as a
  lookup found it when Debezium read the event, not that update's own result. It is null when
  the document was gone by then (deleted in the same transaction, or while Debezium was down);
- a delete is followed by a tombstone (same key, value null), which carries nothing to prove.
"""

from __future__ import annotations

import binascii
import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson
from bson import Binary, Decimal128, Int64, ObjectId, json_util
from bson.binary import UUID_SUBTYPE, UuidRepresentation
from bson.errors import BSONError
from bson.json_util import JSONOptions

from certyo_dagster.fields import FIELD_PREFIX as CERTYO_FIELD_PREFIX
from certyo_dagster.sanitize.documents import (
    DATETIME_MS,
    DEFAULT_MAX_DEPTH,
    PoisonDocumentError,
    _check_text,
    _uuid_text,
    iso_from_ms,
    sanitize_document,
    sanitize_value,
    version_ms,
)
from certyo_dagster.sanitize.documents import _base64 as _base64_text
from certyo_dagster.sanitize.documents import _decimal128 as _decimal_text
from certyo_dagster.sanitize.records import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_IDEMPOTENCY_KEY_BYTES,
    check_payload_size,
    record_id_of,
)
from certyo_dagster.settings import CollectionSpec

# Debezium's op codes and the Certyo operationType of each (the change-stream mapping).
OPERATIONS = {"r": "upsert", "c": "insert", "u": "update", "d": "delete"}
KEY_PREFIX = "dbz"
SNAPSHOT_VERSION_PREFIX = "snapshot"
_DIGEST_CHARS = 16

# The BSON types pymongo gives our MongoClient (tz_aware=False, UUIDs as Binary subtype 4), so
# a document parsed from Debezium's Extended JSON sanitizes exactly like one read directly.
JSON_OPTIONS = JSONOptions(tz_aware=False, uuid_representation=UuidRepresentation.UNSPECIFIED)

# Poison reasons (dead-letter `reason` codes).
BAD_JSON = "bad_json"
NOT_AN_ENVELOPE = "not_an_envelope"
UNKNOWN_OP = "unknown_op"
BAD_KEY = "bad_key"
KEY_MISMATCH = "key_mismatch"
WRONG_COLLECTION = "wrong_collection"
BAD_SOURCE = "bad_source"

# Reasons a message is skipped without a record.
TOMBSTONE = "tombstone"
OWN_WRITE_BACK = "own_write_back"


class DebeziumPoisonError(ValueError):
    """A message that cannot become a Certyo record. `.reason` is the dead-letter code."""

    def __init__(self, reason: str, message: str, doc_id: Any = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.doc_id = doc_id


@dataclass(slots=True)  # not frozen, like Change
class SourcePosition:
    """Where a change sits in MongoDB's history, from the envelope's `source` block.

    Streamed events carry the oplog time in `ts_ms` and the cluster-time increment in `ord`;
    all operations of one transaction share both and add `lsid` and `txnNumber`. Snapshot
    reads (`op: r`) carry the read time and `ord: -1`, so they have no stable position.
    """

    ts_ms: int
    ord: int
    lsid: str | None = None
    txn_number: int | None = None
    snapshot: bool = False

    def label(self) -> str:
        return f"{self.ts_ms}.{self.ord}"


# Not frozen: a frozen dataclass sets each field through object.__setattr__, a tenth of
# the parse of a small event. Nothing changes a Change after parse_message.
@dataclass(slots=True)
class Change:
    """One Debezium change event of one document."""

    op: str  # r, c, u, d
    doc_id: Any  # the BSON _id, parsed from the key
    record_id: str
    # `after` as Debezium wrote it (Extended JSON); None for deletes and an after-null update.
    after: str | None
    update_description: dict | None  # updatedFields (BSON types), removedFields, truncatedArrays
    position: SourcePosition
    # The envelope's own JSON of what this event changed, the part of the idempotency key that
    # tells apart two events at one position (two operations of one transaction).
    content: bytes
    # The document sanitized straight from `after` (the fast path), when it could be.
    fast: FastAfter | None = field(default=None, repr=False, compare=False)
    parsed_document: dict | None = field(default=None, repr=False, compare=False)

    @property
    def has_document(self) -> bool:
        return self.after is not None

    @property
    def document(self) -> dict | None:
        """`after` in BSON types (as pymongo returns documents); built on first use."""
        if self.parsed_document is None and self.after is not None:
            self.parsed_document = ejson_loads(self.after)
        return self.parsed_document

    @property
    def operation(self) -> str:
        return OPERATIONS[self.op]


class Skip(NamedTuple):
    """A message that needs no record: a tombstone, or an update of our own fields only."""

    reason: str
    doc_id: Any = None


# -- parsing -----------------------------------------------------------------------------------


def _json(raw: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DebeziumPoisonError(BAD_JSON, f"the {what} is not JSON: {exc}") from None


def _unwrap(value: Any) -> Any:
    """The payload of `{"schema": …, "payload": …}` (schemas.enable=true), else the value."""
    if type(value) is dict and "payload" in value and "schema" in value:
        return value["payload"]
    return value


def ejson_loads(text: str) -> Any:
    """Extended JSON (as Debezium writes it) to BSON types: exactly what `json_util.loads`
    gives with JSON_OPTIONS, several times faster.

    The fast path parses with orjson and converts each object bottom-up, as `json_util`'s
    object hook does: the wrappers Debezium writes for every document (`$oid`,
    `$numberDecimal`, `$date` in epoch milliseconds, `$numberLong`, `$binary` with a `$type`)
    in place, every other Extended JSON form through `json_util.object_hook` itself. Whatever
    orjson reads differently from Python's json module (NaN and Infinity, numbers that
    overflow, integers past 64 bits, lone surrogates), and any error at all, goes to
    `json_util.loads`, so neither the result nor the error depends on the fast path.
    """
    try:
        tree = orjson.loads(text)
        cls = type(tree)
        if cls is dict:
            return _ejson_object(tree)
        if cls is list:
            _ejson_array(tree)
        elif cls is float and not -_INT64_FLOAT < tree < _INT64_FLOAT:
            raise _NotFast
        return tree
    except Exception:  # noqa: BLE001 - json_util decides what the result or the error is
        return json_util.loads(text, json_options=JSON_OPTIONS)


class _NotFast(Exception):
    """The fast path cannot tell what Python's json module would read here."""


# orjson reads an integer literal outside [-2**63, 2**64) as a float, Python's json as an int.
# Every such float is at least 2**63 in magnitude, so one that large (a genuine large double
# too) takes the json_util path.
_INT64_FLOAT = float(2**63)
# The members json_util.object_hook converts (bson.json_util._PARSERS; a test keeps the two
# equal). An object with none of them is a plain document and stays a dict.
EXTENDED_JSON_KEYS = frozenset(
    {
        "$oid",
        "$ref",
        "$date",
        "$regex",
        "$minKey",
        "$maxKey",
        "$binary",
        "$code",
        "$uuid",
        "$undefined",
        "$numberLong",
        "$timestamp",
        "$numberDecimal",
        "$dbPointer",
        "$regularExpression",
        "$symbol",
        "$numberInt",
        "$numberDouble",
    }
)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_LOW_64 = (1 << 64) - 1
_DECIMAL128_BIAS = 6176
# A plain decimal of at most 34 digits is stored exactly: coefficient = its digits, exponent =
# minus the digits after the point. Anything else (exponents, signs other than -, spaces,
# underscores, more digits, NaN, Infinity) goes through Decimal128(str), which rounds.
_PLAIN_DECIMAL = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
_MAX_PLAIN_DECIMAL_DIGITS = 34
_PLAIN_DECIMAL_NONZERO = re.compile(r"-?[1-9][0-9]*(?:\.[0-9]+)?")


def _decimal128(text: Any) -> Any:
    """`{"$numberDecimal": text}` as json_util reads it; Decimal128(str) costs ~10 us."""
    if type(text) is not str:
        return _NOT_HANDLED
    plain = _PLAIN_DECIMAL.fullmatch(text)
    if plain is None:
        return Decimal128(text)
    sign, whole, fraction = plain.groups()
    if fraction is None:
        fraction = ""
    if len(whole) + len(fraction) > _MAX_PLAIN_DECIMAL_DIGITS:
        return Decimal128(text)
    coefficient = int(whole + fraction)
    high = (coefficient >> 64) | ((_DECIMAL128_BIAS - len(fraction)) << 49)
    if sign:
        high |= 1 << 63
    return Decimal128((high, coefficient & _LOW_64))


def _date(value: Any) -> Any:
    if type(value) is not int:
        return _NOT_HANDLED  # an ISO string, {"$numberLong": …}: json_util's own parser
    # json_util: EPOCH + timedelta(seconds, microseconds) of the same milliseconds.
    return _EPOCH_NAIVE + timedelta(milliseconds=value)


_NOT_HANDLED = object()


def _object_id(value: Any) -> Any:
    return ObjectId(value) if type(value) is str else _NOT_HANDLED


def _int64(value: Any) -> Any:
    return Int64(value) if type(value) is str else _NOT_HANDLED


# Single-member wrappers converted in place: the member's value → the BSON value, or
# _NOT_HANDLED for json_util.object_hook. Each calls what json_util's parser of that form does.
_WRAPPERS = {
    "$oid": _object_id,
    "$numberDecimal": _decimal128,
    "$date": _date,
    "$numberLong": _int64,
}


def _legacy_binary(obj: dict) -> Any:
    """`{"$binary": base64, "$type": "hh"}` as json_util reads it with UUIDs UNSPECIFIED."""
    data, subtype_text = obj["$binary"], obj["$type"]
    if type(data) is not str or type(subtype_text) is not str or len(subtype_text) > 2:
        return _NOT_HANDLED
    subtype = int(subtype_text, 16)
    # What json_util's b64decode(data.encode()) does for ASCII text; other text raises
    # ValueError here, and json_util itself then reads it.
    payload = binascii.a2b_base64(data)
    if subtype == 0:
        return payload  # json_util gives plain bytes for subtype 0
    return Binary(payload, subtype)


def _wrapped(obj: dict) -> Any:
    """A wrapper whose member is a scalar, converted in place, or _NOT_HANDLED."""
    size = len(obj)
    if size == 1:
        for key, value in obj.items():
            convert = _WRAPPERS.get(key)
            if convert is not None:
                return convert(value)
    elif size == 2 and "$binary" in obj and "$type" in obj:
        return _legacy_binary(obj)
    return _NOT_HANDLED


def _ejson_object(obj: dict) -> Any:
    for key, value in obj.items():
        cls = type(value)
        if cls is dict:
            # Most objects inside a document are wrappers of one scalar: no recursion.
            converted = _wrapped(value) if len(value) <= 2 else _NOT_HANDLED
            obj[key] = _ejson_object(value) if converted is _NOT_HANDLED else converted
        elif cls is list:
            _ejson_array(value)
        elif cls is float and not -_INT64_FLOAT < value < _INT64_FLOAT:
            raise _NotFast
    if EXTENDED_JSON_KEYS.isdisjoint(obj):
        return obj
    converted = _wrapped(obj)
    return json_util.object_hook(obj, JSON_OPTIONS) if converted is _NOT_HANDLED else converted


def _ejson_array(items: list) -> None:
    for index, value in enumerate(items):
        cls = type(value)
        if cls is dict:
            converted = _wrapped(value) if len(value) <= 2 else _NOT_HANDLED
            items[index] = _ejson_object(value) if converted is _NOT_HANDLED else converted
        elif cls is list:
            _ejson_array(value)
        elif cls is float and not -_INT64_FLOAT < value < _INT64_FLOAT:
            raise _NotFast


# -- `after` straight to its sanitized form ------------------------------------------------------
# Sanitizing a document parsed into BSON types builds an ObjectId, a Decimal128, a datetime, a
# Binary for each wrapper only to turn each back into text. For the forms Debezium writes,
# `_sanitized_after` goes from orjson's tree to exactly what
# `sanitize_document(ejson_loads(text))` returns; for anything else, and for every document
# that would be rejected, it gives up (_NotFast) and the caller takes that slow composition,
# which also decides the error. The document in BSON types is then built only when asked for.


def _plain_decimal_text(text: str) -> str | None:
    """The sanitized form of `{"$numberDecimal": text}` when text is a plain decimal that
    Decimal128 stores exactly and prints back unchanged, else None."""
    if len(text) <= _MAX_PLAIN_DECIMAL_DIGITS and _PLAIN_DECIMAL_NONZERO.fullmatch(text):
        # At most 34 digits, no leading zero, an adjusted exponent >= 0: printed as it is.
        return text
    plain = _PLAIN_DECIMAL.fullmatch(text)
    if plain is None:
        return None
    _sign, whole, fraction = plain.groups()
    digits = len(whole) + (len(fraction) if fraction else 0)
    if digits > _MAX_PLAIN_DECIMAL_DIGITS or (whole[0] == "0" and len(whole) > 1):
        return None
    if fraction:
        # Printed in scientific notation when the adjusted exponent is below -6.
        significant = len((whole + fraction).lstrip("0")) or 1
        if significant - len(fraction) - 1 < -6:
            return None
    return text


def _sanitized_oid(value: Any) -> Any:
    if type(value) is not str:
        return _NOT_HANDLED
    # str(ObjectId(hex)) is the hex in lower case; the constructor costs ~1 us.
    return value.lower() if _HEX_OID.fullmatch(value) else str(ObjectId(value))


def _sanitized_decimal(value: Any) -> Any:
    if type(value) is not str:
        return _NOT_HANDLED
    text = _plain_decimal_text(value)
    if text is None:
        decimal = _decimal128(value)
        return _NOT_HANDLED if decimal is _NOT_HANDLED else _decimal_text(decimal)
    return text


def _sanitized_date(value: Any) -> Any:
    # json_util builds a datetime: one it cannot build is the slow path's to report.
    return iso_from_ms(value) if type(value) is int and value in DATETIME_MS else _NOT_HANDLED


def _sanitized_long(value: Any) -> Any:
    if type(value) is not str:
        return _NOT_HANDLED
    number = int(Int64(value))
    return number if -_MAX_SAFE_INT <= number <= _MAX_SAFE_INT else str(number)


def _sanitized_timestamp(value: Any) -> Any:
    if type(value) is dict and len(value) == 2:
        t, i = value.get("t"), value.get("i")
        if type(t) is int and type(i) is int and 0 <= t <= _UINT32 and 0 <= i <= _UINT32:
            return {"$timestamp": {"t": t, "i": i}}
    return _NOT_HANDLED


# Single-member wrappers: the member's value → its sanitized form, or _NOT_HANDLED.
_SANITIZED_WRAPPERS = {
    "$oid": _sanitized_oid,
    "$numberDecimal": _sanitized_decimal,
    "$date": _sanitized_date,
    "$numberLong": _sanitized_long,
    "$timestamp": _sanitized_timestamp,
}
_HEX_OID = re.compile(r"[0-9a-fA-F]{24}")


def _sanitized_binary(obj: dict) -> Any:
    data, subtype_text = obj["$binary"], obj["$type"]
    if type(data) is str and type(subtype_text) is str and len(subtype_text) <= 2:
        subtype = int(subtype_text, 16)
        if subtype >= 0:
            payload = binascii.a2b_base64(data)
            if subtype == UUID_SUBTYPE and len(payload) == 16:
                return _uuid_text(payload)
            return _base64_text(payload)
    return _NOT_HANDLED


def _sanitized_wrapper(obj: dict) -> Any:
    """The sanitized form of a wrapper object, or _NOT_HANDLED."""
    size = len(obj)
    if size == 1:
        for key, value in obj.items():
            convert = _SANITIZED_WRAPPERS.get(key)
            return _NOT_HANDLED if convert is None else convert(value)
    elif size == 2 and "$binary" in obj and "$type" in obj:
        return _sanitized_binary(obj)
    return _NOT_HANDLED


def _sanitized_dict(value: dict, budget: int, check: bool) -> Any:
    """A dict member: a wrapper converted in place, else a document or a DBRef."""
    if len(value) == 1:
        for key, member in value.items():
            convert = _SANITIZED_WRAPPERS.get(key)
            if convert is not None:
                converted = convert(member)
                if converted is not _NOT_HANDLED:
                    return converted
    if EXTENDED_JSON_KEYS.isdisjoint(value):
        return _sanitized_object(value, budget - 1, check)
    return _sanitized_extended(value, budget, check)


def _sanitized_top(obj: dict, budget: int, text: str | None = None) -> dict:
    """The document itself: its `certyo_*` fields are left out of the payload.

    `text`, the JSON the tree was parsed from, lets plain text skip the per-string checks:
    with no `\\u` escape, an ASCII text holds only ASCII strings, and one without
    `certyo_` has no such field.
    """
    plain = text is not None and "\\u" not in text and text.isascii()
    if plain and CERTYO_FIELD_PREFIX not in text:
        return _sanitized_object(obj, budget, False)
    shipped = {}
    for key, value in obj.items():
        if key.startswith(CERTYO_FIELD_PREFIX):
            if not key.isascii():
                _check_text(key)
            # Not shipped, but json_util must be able to read it, as on the slow path.
            if type(value) is dict or type(value) is list:
                _ejson_value(value)
        else:
            shipped[key] = value
    return _sanitized_object(shipped, budget, not plain)


def _sanitized_object(obj: dict, budget: int, check: bool) -> dict:
    """`obj` sanitized in place and returned: orjson's tree belongs to this parse, and most
    members are already in their sanitized form, so only wrappers and large ints are
    replaced. `check`: non-ASCII names and strings may be in it, and are checked."""
    if budget < 0:
        raise _NotFast
    for key, value in obj.items():
        if check and not key.isascii():
            _check_text(key)
        cls = type(value)
        if cls is str:
            if check and not value.isascii():
                _check_text(value)
        elif cls is dict:
            obj[key] = _sanitized_dict(value, budget, check)
        elif cls is int:
            if not -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
                obj[key] = str(value)
        elif cls is float:
            if not -_INT64_FLOAT < value < _INT64_FLOAT:
                raise _NotFast
        elif cls is list:
            _sanitized_array(value, budget - 1, check)
        # True, False and None stay as they are.
    return obj


def _sanitized_array(items: list, budget: int, check: bool) -> list:
    """`items` sanitized in place and returned, like `_sanitized_object`."""
    if budget < 0:
        raise _NotFast
    for i, value in enumerate(items):
        cls = type(value)
        if cls is str:
            if check and not value.isascii():
                _check_text(value)
        elif cls is dict:
            items[i] = _sanitized_dict(value, budget, check)
        elif cls is int:
            if not -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
                items[i] = str(value)
        elif cls is float:
            if not -_INT64_FLOAT < value < _INT64_FLOAT:
                raise _NotFast
        elif cls is list:
            _sanitized_array(value, budget - 1, check)
    return items


def _sanitized_extended(obj: dict, budget: int, check: bool) -> Any:
    """A member holding Extended JSON keys: a wrapper, or a DBRef of the usual shape."""
    converted = _sanitized_wrapper(obj)
    if converted is not _NOT_HANDLED:
        return converted
    if "$ref" in obj and "$id" in obj and len(obj) <= 3 and obj.keys() <= _DBREF_KEYS:
        # json_util: DBRef(collection, id, database); sanitized as {$ref, $id[, $db]}.
        collection, database = obj["$ref"], obj.get("$db")
        if type(collection) is str and (database is None or type(database) is str):
            doc = {"$ref": collection, "$id": obj["$id"]}
            if database is not None:
                doc["$db"] = database
            return _sanitized_object(doc, budget - 1, check)
    raise _NotFast


_DBREF_KEYS = frozenset({"$ref", "$id", "$db"})
_MAX_SAFE_INT = 2**53 - 1
_UINT32 = 2**32 - 1


class FastAfter(NamedTuple):
    """What the fast path read from `after` without building the document's BSON types."""

    # orjson.dumps(sanitize_document(document)): bytes, so that the tree is freed at once
    # instead of living (and being scanned by the garbage collector) until write-back.
    payload_json: bytes
    timestamp_field: str
    timestamp: datetime | None  # the field's value when it is a date, as the document has it


def fast_after(
    tree: Any, doc_id: Any, timestamp_field: str, text: str | None = None
) -> FastAfter | None:
    """`after` (orjson's tree of `text`) sanitized, when the fast path can: a document whose
    `_id` is the key's. None sends the caller to the slow path (from the text), which also
    names any error. The tree is sanitized in place: pass one that nothing else uses."""
    if type(tree) is not dict or not EXTENDED_JSON_KEYS.isdisjoint(tree) or "_id" not in tree:
        return None
    try:
        # Read before the tree is sanitized in place.
        if not _same_id(tree["_id"], doc_id):
            return None
        value: Any = tree
        for part in timestamp_field.split("."):
            if type(value) is not dict or not EXTENDED_JSON_KEYS.isdisjoint(value):
                return None  # the slow path decides what the path holds
            if part not in value:
                value = None
                break
            value = value[part]
        timestamp = _ejson_value(value)
        payload_json = orjson.dumps(_sanitized_top(tree, DEFAULT_MAX_DEPTH, text))
        return FastAfter(
            payload_json, timestamp_field, timestamp if isinstance(timestamp, datetime) else None
        )
    except Exception:  # noqa: BLE001 - the slow path gives the result or the error
        return None


def _same_id(value: Any, doc_id: Any) -> bool:
    """The tree's `_id` is the key's. An ObjectId is compared as its lower-case hex, which
    costs less than building one; an upper-case `$oid` then takes the slow path."""
    if type(doc_id) is ObjectId and type(value) is dict and len(value) == 1:
        return value.get("$oid") == str(doc_id)
    return _ejson_value(value) == doc_id


def _ejson_value(value: Any) -> Any:
    """One value of orjson's tree in BSON types, as json_util reads it (the tree is kept)."""
    cls = type(value)
    if cls is dict:
        if len(value) <= 2:  # a wrapper of one scalar ($oid, $date…) needs no copy
            converted = _wrapped(value)
            if converted is not _NOT_HANDLED:
                return converted
        return _ejson_object(copy.deepcopy(value))
    if cls is list:
        items = copy.deepcopy(value)
        _ejson_array(items)
        return items
    return value


def _ejson(text: Any, what: str, doc_id: Any = None) -> Any:
    if not isinstance(text, str):
        raise DebeziumPoisonError(
            NOT_AN_ENVELOPE, f"{what} must be an Extended JSON string", doc_id
        )
    try:
        return ejson_loads(text)
    except (ValueError, TypeError, KeyError, OverflowError, BSONError) as exc:
        raise DebeziumPoisonError(
            BAD_JSON, f"{what} is not valid Extended JSON: {exc}", doc_id
        ) from None


def parse_key(key: bytes | str | None) -> Any:
    """The `_id` in a Debezium key `{"id": "<Extended JSON>"}` (with or without schema)."""
    if key is None:
        raise DebeziumPoisonError(BAD_KEY, "the message has no key")
    parsed = _unwrap(_json(key, "key"))
    if type(parsed) is not dict or "id" not in parsed:
        raise DebeziumPoisonError(BAD_KEY, 'the key is not {"id": "<Extended JSON of _id>"}')
    return _ejson(parsed["id"], "the key's id")


def _position(source: Any, doc_id: Any) -> SourcePosition:
    if type(source) is not dict:
        raise DebeziumPoisonError(BAD_SOURCE, "the envelope has no source block", doc_id)
    ts_ms, order = source.get("ts_ms"), source.get("ord")
    if type(ts_ms) is not int or type(order) is not int:
        raise DebeziumPoisonError(
            BAD_SOURCE, "source.ts_ms and source.ord must be integers", doc_id
        )
    if ts_ms not in DATETIME_MS:  # an oplog time; anything else is not one
        raise DebeziumPoisonError(
            BAD_SOURCE, f"source.ts_ms {ts_ms} is not a time in the years 1-9999", doc_id
        )
    txn = source.get("txnNumber")
    lsid = source.get("lsid")
    snapshot = source.get("snapshot") not in (None, False, "false")
    return SourcePosition(
        ts_ms,
        order,
        lsid if isinstance(lsid, str) else None,
        txn if type(txn) is int else None,
        snapshot,
    )


def _update_description(raw: Any, doc_id: Any) -> dict | None:
    if raw is None:
        return None
    if type(raw) is not dict:
        raise DebeziumPoisonError(NOT_AN_ENVELOPE, "updateDescription is not an object", doc_id)
    updated = raw.get("updatedFields")
    fields = {} if updated is None else _ejson(updated, "updatedFields", doc_id)
    if type(fields) is not dict:
        raise DebeziumPoisonError(NOT_AN_ENVELOPE, "updatedFields is not an object", doc_id)
    return {
        "updatedFields": fields,
        "removedFields": list(raw.get("removedFields") or []),
        "truncatedArrays": list(raw.get("truncatedArrays") or []),
    }


def _touches_only_certyo_fields(description: Mapping) -> bool:
    """True for an update that set or removed only our `certyo_*` write-back fields."""
    paths = [*description["updatedFields"], *description["removedFields"]]
    for entry in description["truncatedArrays"]:
        paths.append(entry.get("field", "") if isinstance(entry, Mapping) else "")
    return bool(paths) and all(
        isinstance(p, str) and p.startswith(CERTYO_FIELD_PREFIX) for p in paths
    )


def parse_message(
    key: bytes | str | None, value: bytes | str | None, spec: CollectionSpec
) -> Change | Skip:
    """One Kafka message of the collection's topic. Raises DebeziumPoisonError."""
    if value is None:
        doc_id = None
        if key is not None:
            try:
                doc_id = parse_key(key)
            except DebeziumPoisonError:
                doc_id = None
        return Skip(TOMBSTONE, doc_id)
    doc_id = parse_key(key)
    envelope = _unwrap(_json(value, "value"))
    if type(envelope) is not dict or "op" not in envelope or "source" not in envelope:
        raise DebeziumPoisonError(
            NOT_AN_ENVELOPE, "the value is not a Debezium change event envelope", doc_id
        )
    op = envelope["op"]
    if op not in OPERATIONS:
        raise DebeziumPoisonError(
            UNKNOWN_OP,
            f"op {op!r} is not one of r, c, u, d (Debezium's MongoDB connector events)",
            doc_id,
        )
    source = envelope["source"]
    position = _position(source, doc_id)
    if source.get("db") != spec.database or source.get("collection") != spec.collection:
        raise DebeziumPoisonError(
            WRONG_COLLECTION,
            f"the event is for {source.get('db')}.{source.get('collection')}, not "
            f"{spec.database}.{spec.collection}",
            doc_id,
        )
    after_text = envelope.get("after")
    fast = document = None
    if after_text is not None:
        fast = _fast_after_text(after_text, doc_id, spec.timestamp_field)
        if fast is None:
            document = _ejson(after_text, "after", doc_id)
    if document is not None:
        if type(document) is not dict:
            raise DebeziumPoisonError(NOT_AN_ENVELOPE, "after is not a document", doc_id)
        if "_id" not in document or document["_id"] != doc_id:
            raise DebeziumPoisonError(
                KEY_MISMATCH,
                f"the key names _id {_show(doc_id)} but the document's _id is "
                f"{_show(document.get('_id'))}",
                doc_id,
            )
    description = None
    if op == "u":
        description = _update_description(envelope.get("updateDescription"), doc_id)
        if description is not None and _touches_only_certyo_fields(description):
            return Skip(OWN_WRITE_BACK, doc_id)
        if fast is None and document is None and description is None:
            raise DebeziumPoisonError(
                NOT_AN_ENVELOPE, "an update with neither after nor updateDescription", doc_id
            )
    elif op in ("r", "c") and fast is None and document is None:
        raise DebeziumPoisonError(NOT_AN_ENVELOPE, f"an op {op!r} event without after", doc_id)
    has_document = fast is not None or document is not None
    return Change(
        op=op,
        doc_id=doc_id,
        record_id=_record_id(doc_id),
        after=after_text if has_document else None,
        update_description=description,
        position=position,
        content=_content(op, envelope, position),
        fast=fast,
        parsed_document=document,
    )


def _fast_after_text(text: Any, doc_id: Any, timestamp_field: str) -> FastAfter | None:
    if type(text) is not str:
        return None
    try:
        tree = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return fast_after(tree, doc_id, timestamp_field, text)


def _record_id(doc_id: Any) -> str:
    try:
        return record_id_of(doc_id)
    except PoisonDocumentError as exc:
        raise DebeziumPoisonError(exc.reason, f"the _id cannot be a recordId: {exc}") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _content(op: str, envelope: Mapping, position: SourcePosition) -> bytes:
    """What the event itself says it changed, as Debezium wrote it (stable on re-delivery).

    An update's `after` is left out: it is a lookup, and a Debezium restart that sends the
    event again looks the document up again.
    """
    if op == "u" and envelope.get("updateDescription") is not None:
        changed: Any = envelope["updateDescription"]
    elif op == "d":
        changed = None
    else:
        changed = envelope.get("after")
    txn = [position.lsid, position.txn_number] if position.txn_number is not None else None
    return orjson.dumps([op, txn, changed], option=orjson.OPT_SORT_KEYS)


# -- the record --------------------------------------------------------------------------------


def change_version(change: Change) -> str:
    """The recordVersion of a change: unique per change, the same when it is delivered again.

    Streamed: `<ts_ms>.<ord>-<digest>`, the source position plus a digest of the op, the
    transaction and what the event changed (two operations of one transaction share ts_ms and
    ord). Snapshot reads have no stable position (a re-snapshot reads again at a new time), so
    they are `snapshot-<digest of the document>`: reading an unchanged document again is an
    idempotent replay.
    """
    digest = hashlib.sha256(change.content).hexdigest()[:_DIGEST_CHARS]
    if change.op == "r":
        return f"{SNAPSHOT_VERSION_PREFIX}-{digest}"
    return f"{change.position.label()}-{digest}"


def change_idempotency_key(spec: CollectionSpec, record_id: str, version: str) -> str:
    """`dbz:<db>.<c>:<recordId>:<version>`; a long recordId becomes its SHA-256."""
    key = f"{KEY_PREFIX}:{spec.database}.{spec.collection}:{record_id}:{version}"
    if len(key.encode("utf-8")) > MAX_IDEMPOTENCY_KEY_BYTES:
        digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()
        key = f"{KEY_PREFIX}:{spec.database}.{spec.collection}:sha256-{digest}:{version}"
    return key


def change_payload(change: Change) -> dict:
    """The recordPayload. Raises PoisonDocumentError like the document sanitizer.

    Inserts, updates and snapshot reads ship the document; a delete ships
    `{"_id": <id>, "_deleted": true}`; an update whose `after` is null (the document was gone
    when Debezium looked it up) ships what the event itself says:
    `{"_id": <id>, "_updateDescription": {"updatedFields": [{"field", "value"}…],
    "removedFields": […], "truncatedArrays": […]}}`.
    """
    if change.fast is not None:
        return orjson.loads(change.fast.payload_json)
    if change.has_document:
        return sanitize_document(change.document)
    doc_id = sanitize_value(change.doc_id)
    if change.op == "d":
        return {"_id": doc_id, "_deleted": True}
    description = change.update_description or {}
    return {
        "_id": doc_id,
        "_updateDescription": {
            "updatedFields": [
                {"field": sanitize_value(name), "value": sanitize_value(value)}
                for name, value in description.get("updatedFields", {}).items()
            ],
            "removedFields": sanitize_value(description.get("removedFields", [])),
            "truncatedArrays": sanitize_value(description.get("truncatedArrays", [])),
        },
    }


class ChangeRecord(NamedTuple):
    """A change's Certyo record as the JSON it is sent as, with what write-back needs."""

    record_id: str
    version: str
    operation: str
    source_timestamp: str
    idempotency_key: str
    json: bytes
    # The document version (epoch ms of the timestamp field) and the field's value, when the
    # shipped document has one: write-back labels the document only while it still holds it.
    document_version: int | None
    timestamp: datetime | None

    def as_record(self) -> dict:
        return orjson.loads(self.json)


def _document_timestamp(change: Change, spec: CollectionSpec) -> datetime | None:
    if change.fast is not None and change.fast.timestamp_field == spec.timestamp_field:
        return change.fast.timestamp
    if not change.has_document:
        return None
    value: Any = change.document
    for part in spec.timestamp_field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, datetime) else None


# INTEGRATION POINT: the change-stream capture generalizes the one record mapping in
# certyo_dagster/sanitize/records.py; point this at it. It builds the same record shape as
# the polling encoder (tenantId, database, collection, recordId, recordVersion, operationType,
# sourceTimestamp, idempotencyKey, recordPayload).
def encode_change(
    change: Change,
    spec: CollectionSpec,
    tenant_id: str,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> ChangeRecord:
    """The Certyo record of one change. Raises PoisonDocumentError (too large, unsanitizable)."""
    try:
        if change.fast is not None:
            payload_json = change.fast.payload_json
        else:
            payload_json = orjson.dumps(change_payload(change))
        check_payload_size(payload_json, max_payload_bytes)
    except PoisonDocumentError as exc:
        exc.record_id = change.record_id
        raise
    version = change_version(change)
    key = change_idempotency_key(spec, change.record_id, version)
    source_timestamp = iso_from_ms(change.position.ts_ms)
    record = {
        "tenantId": tenant_id,
        "database": spec.database,
        "collection": spec.collection,
        "recordId": change.record_id,
        "recordVersion": version,
        "operationType": change.operation,
        "sourceTimestamp": source_timestamp,
        "idempotencyKey": key,
    }
    body = orjson.dumps(record)[:-1] + b',"recordPayload":' + payload_json + b"}"
    ts = _document_timestamp(change, spec)
    return ChangeRecord(
        change.record_id,
        version,
        change.operation,
        source_timestamp,
        key,
        body,
        version_ms(ts) if ts is not None else None,
        ts,
    )
