"""MongoDB documents as I-JSON (RFC 7493) Certyo records: pure functions, no I/O.

Every BSON value gets one fixed JSON form (docs/sanitize.md), so the same document always gives
the same bytes and therefore the same record hash. A document that has no valid form raises
PoisonDocumentError naming the field, so one bad document is reported instead of stopping
ingestion or being sent in a lossy shape.

This runs once per document version on the ingest path, so the walk dispatches on exact types
with the common JSON scalars checked inline, and everything constant is built at import time.
"""

from __future__ import annotations

import binascii
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from bson import (
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
)
from bson.binary import UUID_SUBTYPE
from bson.datetime_ms import DatetimeMS
from bson.son import SON

from certyo_dagster.fields import FIELD_PREFIX

__all__ = [
    "MAX_DEPTH_LIMIT",
    "PoisonDocumentError",
    "iso_utc",
    "sanitize_document",
    "sanitize_value",
    "version_ms",
]

DEFAULT_MAX_DEPTH = 100
# orjson refuses more than 254 levels and wrapper forms ($timestamp, ...) add up to two.
MAX_DEPTH_LIMIT = 200

_MAX_SAFE_INT = 2**53 - 1
_MIN_SAFE_INT = -_MAX_SAFE_INT
_INF = float("inf")
_FLOAT_SPECIALS = {True: "Infinity", False: "-Infinity"}
_EPOCH_NAIVE = datetime(1970, 1, 1)
_EPOCH_AWARE = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_UTC_SUFFIX = "+00:00"
_MS_PER_DAY = 86_400_000
_DECIMAL128_BIAS = 6176
_DECIMAL128_MAX_COEFFICIENT = 10**34 - 1
# I-JSON (RFC 7493 section 2.1) forbids surrogates and noncharacters in strings and names.
_NOT_IJSON = re.compile(
    "[\ud800-\udfff\ufdd0-\ufdef"
    + "".join(
        f"{chr(plane * 0x10000 + 0xFFFE)}-{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17)
    )
    + "]"
)
# BSON stores regex options as letters in alphabetical order.
_REGEX_FLAG_LETTERS = ((re.I, "i"), (re.L, "l"), (re.M, "m"), (re.S, "s"), (re.U, "u"), (re.X, "x"))
_MAX_PATH_IN_MESSAGE = 300
_PATH_NAME = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


class PoisonDocumentError(ValueError):
    """A document that cannot become a Certyo record.

    `.reason` is a short code for metrics and dead-letter rows (unsupported_type,
    invalid_unicode, too_deep, too_large, bad_key, missing_id,
    missing_timestamp, bad_timestamp); `.path` names the field (`items[2].price`, or "" for
    the whole document); `.record_id` is set once the document's recordId is known.
    The message never contains field values, which may be personal data.
    """

    def __init__(self, reason: str, detail: str, path: list | None = None) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        # Filled innermost first while the error unwinds through nested containers.
        self._reversed_path: list = [] if path is None else path
        self.record_id: str | None = None

    @property
    def path(self) -> str:
        parts = []
        for element in reversed(self._reversed_path):
            if type(element) is _NonStringKey:
                parts.append(f"[<{_type_name(element.key)} key {_printable(element.key)}>]")
            elif type(element) is int:
                parts.append(f"[{element}]")
            elif type(element) is str and _PATH_NAME.match(element):
                parts.append(f".{element}" if parts else element)
            else:
                parts.append(f"[{_printable(element)}]")
        return "".join(parts)

    def __str__(self) -> str:
        path = self.path
        if len(path) > _MAX_PATH_IN_MESSAGE:
            path = f"{path[:_MAX_PATH_IN_MESSAGE]}... ({len(self._reversed_path)} levels)"
        where = f"field {path}" if self._reversed_path else "document"
        suffix = f" (recordId {_printable(self.record_id)})" if self.record_id is not None else ""
        return f"{where}: {self.detail}{suffix}"

    def __reduce__(self):
        # Keep the path when the error crosses a process boundary (Dagster pickles errors).
        args = (self.reason, self.detail, list(self._reversed_path))
        return (type(self), args, {"record_id": self.record_id})


class _NonStringKey:
    """A rejected object key in an error path, so that `{1: ...}` does not read as `[1]`."""

    __slots__ = ("key",)

    def __init__(self, key: object) -> None:
        self.key = key

    def __reduce__(self):
        return (_NonStringKey, (self.key,))


def _printable(value: object) -> str:
    """A repr that is safe to log even when the value holds lone surrogates."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace"))


def _type_name(value: object) -> str:
    cls = type(value)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


# ---------------------------------------------------------------------------------------------
# Scalars


def _check_text(text: str, what: str = "the string") -> None:
    """Reject strings that are not valid I-JSON text. Callers skip this for ASCII strings."""
    bad = _NOT_IJSON.search(text)
    if bad is not None:
        code_point = ord(bad.group())
        kind = "a lone surrogate" if 0xD800 <= code_point <= 0xDFFF else "a Unicode noncharacter"
        raise PoisonDocumentError(
            "invalid_unicode",
            f"{what} contains {kind} U+{code_point:04X} at character {bad.start()}, "
            "which I-JSON does not allow",
        )


def _key(key: object) -> str:
    """Object member names must be valid I-JSON strings."""
    if type(key) is not str:
        if not isinstance(key, str):
            raise PoisonDocumentError(
                "bad_key", f"the object key of type {_type_name(key)} is not a string"
            )
        key = str.__str__(key)
    if not key.isascii():
        _check_text(key, "the object key")
    return key


def _int(value: int) -> int | str:
    value = int(value)
    return value if _MIN_SAFE_INT <= value <= _MAX_SAFE_INT else str(value)


def _float(value: float) -> float | str:
    value = float(value)
    if -_INF < value < _INF:
        return value
    return "NaN" if value != value else _FLOAT_SPECIALS[value > 0]


def _text(value: str) -> str:
    value = str.__str__(value)
    if not value.isascii():
        _check_text(value)
    return value


def _base64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _uuid_text(data: bytes) -> str:
    """str(uuid.UUID(bytes=data)) without building the UUID object: several times faster."""
    h = data.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _binary(value: Binary) -> str:
    # Subtype 3 (legacy UUID) stays base64: its byte order depends on which driver wrote it.
    if value.subtype == UUID_SUBTYPE and len(value) == 16:
        return _uuid_text(value)
    return _base64(value)


def _decimal128(value: Decimal128) -> str:
    """`str(value)` (the IEEE to-scientific-string form, trailing zeros kept), about 4x faster.

    bson's own str() builds a decimal.Decimal inside a local context, which dominated the cost
    of a product document with a few prices. NaN ignores the sign, as bson does.
    """
    # The pickle state is the two 64-bit halves, without the byte round trip of `.bid`.
    high, low = value.__getstate__()
    combination = (high >> 58) & 0x1F
    if combination == 0x1F:
        return "NaN"
    sign = "-" if high >> 63 else ""
    if combination == 0x1E:
        return sign + "Infinity"
    if (high >> 61) & 0x3 == 0x3:  # coefficient would exceed 10**34 - 1: non-canonical zero
        exponent = ((high >> 47) & 0x3FFF) - _DECIMAL128_BIAS
        coefficient = 0
    else:
        exponent = ((high >> 49) & 0x3FFF) - _DECIMAL128_BIAS
        coefficient = ((high & 0x1FFFFFFFFFFFF) << 64) | low
        if coefficient > _DECIMAL128_MAX_COEFFICIENT:
            coefficient = 0
    digits = str(coefficient)
    if exponent == 0:
        return sign + digits
    adjusted = exponent + len(digits) - 1
    if exponent < 0 and adjusted >= -6:
        point = len(digits) + exponent
        if point > 0:
            return f"{sign}{digits[:point]}.{digits[point:]}"
        return f"{sign}0.{'0' * -point}{digits}"
    mantissa = digits if len(digits) == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{sign}{mantissa}E{'+' if adjusted >= 0 else ''}{adjusted}"


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant)."""
    days += 719_468
    era = days // 146_097
    doe = days - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def iso_from_ms(ms: int) -> str:
    """ISO 8601 of any BSON date (`ms` after the epoch), as `iso_utc` writes a datetime, with
    expanded `+YYYYYY`/`-YYYYYY` years outside 0000-9999.

    A third of the time of building a datetime: the date part comes from a cache of days,
    the time of day from tables of digits.
    """
    days, ms_of_day = divmod(ms, _MS_PER_DAY)
    day = _DAY_PREFIXES.get(days) or _day_prefix(days)
    seconds, millis = divmod(ms_of_day, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    clock = f"{_TWO_DIGITS[hour]}:{_TWO_DIGITS[minute]}:{_TWO_DIGITS[second]}"
    return f"{day}{clock}.{_THREE_DIGITS[millis]}{_UTC_SUFFIX}"


def _day_prefix(days: int) -> str:
    """`YYYY-MM-DDT` of a day since the epoch, kept for the next date of that day."""
    year, month, day = _civil_from_days(days)
    year_text = f"{year:04d}" if 0 <= year <= 9999 else f"{'+' if year > 0 else '-'}{abs(year):06d}"
    prefix = f"{year_text}-{month:02d}-{day:02d}T"
    if len(_DAY_PREFIXES) < _MAX_DAY_PREFIXES:
        _DAY_PREFIXES[days] = prefix
    return prefix


_DAY_PREFIXES: dict[int, str] = {}
_MAX_DAY_PREFIXES = 40_000  # about a century of days, ~4 MB
_TWO_DIGITS = tuple(f"{n:02d}" for n in range(60))
_THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))


def iso_utc(ts: datetime) -> str:
    """`2026-01-02T03:04:05.678+00:00`: UTC, explicit offset, milliseconds like BSON dates.

    Naive datetimes are UTC (that is what pymongo returns); sub-millisecond digits are cut,
    which matches what MongoDB stores.
    """
    if ts.tzinfo is None:
        if type(ts) is datetime:
            # Plain isoformat() is about twice as fast as timespec="milliseconds"; cutting
            # the microseconds to three digits truncates exactly as that does.
            text = ts.isoformat()
            return (text[:23] if ts.microsecond else text + ".000") + _UTC_SUFFIX
        return ts.isoformat(timespec="milliseconds") + _UTC_SUFFIX
    offset = ts.utcoffset()
    if offset is None:
        return ts.replace(tzinfo=None).isoformat(timespec="milliseconds") + _UTC_SUFFIX
    try:
        return (ts.replace(tzinfo=None) - offset).isoformat(timespec="milliseconds") + _UTC_SUFFIX
    except OverflowError:  # e.g. 0001-01-01T00:00+05:00 is in year 0 in UTC
        return iso_from_ms(version_ms(ts))


def version_ms(ts: datetime) -> int:
    """Milliseconds since the Unix epoch (floor); naive datetimes are UTC."""
    if ts.tzinfo is None:
        return (ts - _EPOCH_NAIVE) // _ONE_MS
    if ts.utcoffset() is None:
        return (ts.replace(tzinfo=None) - _EPOCH_NAIVE) // _ONE_MS
    return (ts - _EPOCH_AWARE) // _ONE_MS


# The BSON dates a datetime can hold (the years 1-9999).
DATETIME_MS = range(version_ms(datetime.min), version_ms(datetime.max) + 1)


def _regex(pattern: object, flags: int) -> dict:
    if isinstance(pattern, bytes):
        try:
            pattern = pattern.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PoisonDocumentError(
                "invalid_unicode", "the regular expression is not UTF-8", ["$regex"]
            ) from exc
    pattern = _in_member("$regex", _text, pattern)
    options = "".join(letter for flag, letter in _REGEX_FLAG_LETTERS if flags & flag)
    return {"$regex": pattern, "$options": options}


# ---------------------------------------------------------------------------------------------
# The walk. `budget` is how many more container levels may be opened below this one.


def _too_deep() -> PoisonDocumentError:
    return PoisonDocumentError(
        "too_deep", "nesting exceeds the maximum depth (MongoDB itself allows 100 levels)"
    )


# Field names repeat from document to document, so a name that passed `_key` once is looked up
# instead of checked again. Top-level names live apart: only there are `certyo_*` names dropped
# (and never remembered). Bounded, so odd collections cannot grow them without limit.
_KNOWN_KEYS: set[str] = set()
_KNOWN_TOP_KEYS: set[str] = set()
_MAX_KNOWN_KEYS = 10_000
_MAX_KNOWN_KEY_LENGTH = 100


def _remember(known: set[str], key: str) -> None:
    if len(known) < _MAX_KNOWN_KEYS and len(key) <= _MAX_KNOWN_KEY_LENGTH:
        known.add(key)


def _object(mapping: Mapping, budget: int, drop_certyo: bool = False) -> dict:
    if budget < 0:
        raise _too_deep()
    known = _KNOWN_TOP_KEYS if drop_certyo else _KNOWN_KEYS
    out = {}
    key = None
    try:
        for key, value in mapping.items():
            if type(key) is not str or key not in known:
                key = _key(key)
                if drop_certyo and key.startswith(FIELD_PREFIX):
                    continue
                _remember(known, key)
            cls = type(value)
            if cls is str:
                if not value.isascii():
                    _check_text(value)
                out[key] = value
                continue
            scalar = _SCALARS.get(cls)
            if scalar is not None:
                out[key] = scalar(value)
            elif cls is int:
                out[key] = value if _MIN_SAFE_INT <= value <= _MAX_SAFE_INT else str(value)
            elif cls is float:
                out[key] = value if -_INF < value < _INF else _float(value)
            elif cls is dict:
                out[key] = _object(value, budget - 1)
            elif cls is list:
                out[key] = _array(value, budget - 1)
            elif value is None or cls is bool:
                out[key] = value
            else:
                out[key] = _other(value, budget)
    except PoisonDocumentError as exc:
        # `key` still holds the raw key when the key itself was rejected.
        exc._reversed_path.append(key if type(key) is str else _NonStringKey(key))
        raise
    return out


def _array(items: list | tuple, budget: int) -> list:
    if budget < 0:
        raise _too_deep()
    out = []
    append = out.append
    index = 0
    try:
        for index, value in enumerate(items):  # noqa: B007 - index names the failing element
            cls = type(value)
            if cls is str:
                if not value.isascii():
                    _check_text(value)
                append(value)
                continue
            scalar = _SCALARS.get(cls)
            if scalar is not None:
                append(scalar(value))
            elif cls is dict:
                append(_object(value, budget - 1))
            elif cls is int:
                append(value if _MIN_SAFE_INT <= value <= _MAX_SAFE_INT else str(value))
            elif cls is float:
                append(value if -_INF < value < _INF else _float(value))
            elif cls is list:
                append(_array(value, budget - 1))
            elif value is None or cls is bool:
                append(value)
            else:
                append(_other(value, budget))
    except PoisonDocumentError as exc:
        exc._reversed_path.append(index)
        raise
    return out


def _other(value: Any, budget: int) -> Any:
    """Everything the container loops do not handle inline (JSON types, dates, ObjectIds)."""
    convert = _BY_TYPE.get(type(value))
    if convert is not None:
        return convert(value, budget)
    return _by_isinstance(value, budget)


def _code(value: Code, budget: int) -> dict:
    out: dict = {"$code": _in_member("$code", _text, value)}
    if value.scope is not None:
        out["$scope"] = _in_member("$scope", _object, value.scope, budget - 1)
    return out


def _dbref_doc(value: DBRef) -> dict:
    """`value.as_doc()` as a plain dict: same members in the same order, without SON's cost."""
    doc = {"$ref": value.collection, "$id": value.id}
    if value.database is not None:
        doc["$db"] = value.database
    doc.update(value._DBRef__kwargs)  # what as_doc() adds; DBRef has no public accessor
    return doc


def _in_member(name: str, convert: Any, *args: Any) -> Any:
    try:
        return convert(*args)
    except PoisonDocumentError as exc:
        exc._reversed_path.append(name)
        raise


_BY_TYPE: dict[type, Any] = {
    str: lambda v, b: _text(v),
    int: lambda v, b: _int(v),
    float: lambda v, b: _float(v),
    bool: lambda v, b: v,
    type(None): lambda v, b: v,
    dict: lambda v, b: _object(v, b - 1),
    list: lambda v, b: _array(v, b - 1),
    tuple: lambda v, b: _array(v, b - 1),
    SON: lambda v, b: _object(v, b - 1),
    datetime: lambda v, b: iso_utc(v),
    ObjectId: lambda v, b: str(v),
    Int64: lambda v, b: _int(v),
    Decimal128: lambda v, b: _decimal128(v),
    bytes: lambda v, b: _base64(v),
    Binary: lambda v, b: _binary(v),
    uuid.UUID: lambda v, b: str(v),
    DatetimeMS: lambda v, b: iso_from_ms(int(v)),
    Timestamp: lambda v, b: {"$timestamp": {"t": v.time, "i": v.inc}},
    Regex: lambda v, b: _regex(v.pattern, v.flags),
    re.Pattern: lambda v, b: _regex(v.pattern, v.flags),
    Code: _code,
    DBRef: lambda v, b: _object(_dbref_doc(v), b - 1),
    MinKey: lambda v, b: {"$minKey": 1},
    MaxKey: lambda v, b: {"$maxKey": 1},
}


# Exact types whose form needs no nesting budget, called straight from the container loops.
_SCALARS: dict[type, Any] = {
    datetime: iso_utc,
    ObjectId: ObjectId.__str__,
    Decimal128: _decimal128,
    Binary: _binary,
    bytes: _base64,
    Int64: _int,
    uuid.UUID: uuid.UUID.__str__,
}


def _by_isinstance(value: Any, budget: int) -> Any:
    """Subclasses (OrderedDict, RawBSONDocument, IntEnum, pandas.Timestamp, ...) by base type."""
    if isinstance(value, Mapping):
        return _object(value, budget - 1)
    for base in (datetime, int, float, str, Binary, bytes, list, tuple):
        if isinstance(value, base):
            return _BY_TYPE[base](value, budget)
    raise PoisonDocumentError(
        "unsupported_type",
        f"type {_type_name(value)} has no JSON form for Certyo (see docs/sanitize.md)",
    )


# ---------------------------------------------------------------------------------------------
# Public API


def sanitize_value(value: Any) -> Any:
    """One BSON value in its I-JSON form (docs/sanitize.md). Raises PoisonDocumentError."""
    cls = type(value)
    if cls is dict:
        return _object(value, DEFAULT_MAX_DEPTH)
    if cls is list:
        return _array(value, DEFAULT_MAX_DEPTH)
    return _other(value, DEFAULT_MAX_DEPTH + 1)


def sanitize_document(doc: Mapping, *, max_depth: int = DEFAULT_MAX_DEPTH) -> dict:
    """The document as an I-JSON object, without its top-level `certyo_*` write-back fields.

    `max_depth` counts nested objects and arrays below the top level.
    """
    if not 0 <= max_depth <= MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be between 0 and {MAX_DEPTH_LIMIT}, got {max_depth}")
    if type(doc) is not dict and not isinstance(doc, Mapping):
        raise PoisonDocumentError(
            "unsupported_type", f"a document must be a mapping, got {_type_name(doc)}"
        )
    return _object(doc, max_depth, drop_certyo=True)
