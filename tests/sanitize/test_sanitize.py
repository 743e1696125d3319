"""BSON documents to I-JSON Certyo records: exact forms, poison documents, keys and versions."""

from __future__ import annotations

import enum
import hashlib
import math
import pickle
import random
import re
import uuid
from collections import OrderedDict
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import bson
import orjson
import pytest
import rfc8785
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
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument
from bson.son import SON

from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.sanitize.documents import (
    PoisonDocumentError,
    iso_from_ms,
    iso_utc,
    sanitize_document,
    sanitize_value,
    version_ms,
)
from certyo_dagster.sanitize.records import (
    document_version,
    idempotency_key,
    record_id_of,
    to_certyo_record,
)
from certyo_dagster.settings import CollectionSpec

OID = ObjectId("65a1b2c3d4e5f6a7b8c9d0e1")
UID = uuid.UUID("12345678-1234-4678-9234-567812345678")
NAIVE = datetime(2026, 1, 2, 3, 4, 5, 678901)
# The same instant as NAIVE (to the millisecond), written in +01:30.
AWARE = datetime(2026, 1, 2, 4, 34, 5, 678000, tzinfo=timezone(timedelta(hours=1, minutes=30)))
SPEC = CollectionSpec("productdb", "products")
TENANT = "acme-corp"


def every_type() -> dict:
    return {
        "objectId": OID,
        "naiveDate": NAIVE,
        "awareDate": AWARE,
        "dateBeyond9999": DatetimeMS(253402300800000),
        "decimal": Decimal128("1.10"),
        "decimalExponent": Decimal128("-1.50E+3"),
        "decimalNaN": Decimal128("NaN"),
        "decimalInfinity": Decimal128("-Infinity"),
        "binary": Binary(b"\x00\x01\x02\xff", 0),
        "bytes": b"hi",
        "uuidBinary": Binary(UID.bytes, 4),
        "legacyUuidBinary": Binary(UID.bytes, 3),
        "uuid": UID,
        "int64Small": Int64(42),
        "int64Huge": Int64(2**63 - 1),
        "intHuge": -(2**60),
        "int": 7,
        "bool": True,
        "null": None,
        "float": 1.5,
        "nan": math.nan,
        "infinity": math.inf,
        "negativeInfinity": -math.inf,
        "timestamp": Timestamp(1700000000, 7),
        "regex": Regex("^ab", "im"),
        "pattern": re.compile("x+", re.S),
        "code": Code("function () { return 1; }"),
        "codeWithScope": Code("f(x)", {"x": Int64(1)}),
        "dbref": DBRef("suppliers", OID, "productdb", note="primary"),
        "minKey": MinKey(),
        "maxKey": MaxKey(),
        "son": SON([("b", 1), ("a", 2)]),
        "tuple": (1, "two"),
        "key.with$dots": "kept",
        "text": "Grüße ✓ 😀",
    }


EVERY_TYPE_JSON = {
    "objectId": "65a1b2c3d4e5f6a7b8c9d0e1",
    "naiveDate": "2026-01-02T03:04:05.678+00:00",
    "awareDate": "2026-01-02T03:04:05.678+00:00",
    "dateBeyond9999": "+010000-01-01T00:00:00.000+00:00",
    "decimal": "1.10",
    "decimalExponent": "-1.50E+3",
    "decimalNaN": "NaN",
    "decimalInfinity": "-Infinity",
    "binary": "AAEC/w==",
    "bytes": "aGk=",
    "uuidBinary": "12345678-1234-4678-9234-567812345678",
    "legacyUuidBinary": "EjRWeBI0RniSNFZ4EjRWeA==",
    "uuid": "12345678-1234-4678-9234-567812345678",
    "int64Small": 42,
    "int64Huge": "9223372036854775807",
    "intHuge": "-1152921504606846976",
    "int": 7,
    "bool": True,
    "null": None,
    "float": 1.5,
    "nan": "NaN",
    "infinity": "Infinity",
    "negativeInfinity": "-Infinity",
    "timestamp": {"$timestamp": {"t": 1700000000, "i": 7}},
    "regex": {"$regex": "^ab", "$options": "im"},
    "pattern": {"$regex": "x+", "$options": "su"},
    "code": {"$code": "function () { return 1; }"},
    "codeWithScope": {"$code": "f(x)", "$scope": {"x": 1}},
    "dbref": {
        "$ref": "suppliers",
        "$id": "65a1b2c3d4e5f6a7b8c9d0e1",
        "$db": "productdb",
        "note": "primary",
    },
    "minKey": {"$minKey": 1},
    "maxKey": {"$maxKey": 1},
    "son": {"b": 1, "a": 2},
    "tuple": [1, "two"],
    "key.with$dots": "kept",
    "text": "Grüße ✓ 😀",
}


def zoo_document() -> dict:
    return {
        "_id": OID,
        **every_type(),
        "nested": {"deeper": every_type(), "certyo_nested": "stays"},
        "array": [every_type(), [OID, [Decimal128("0.10"), NAIVE]]],
        "updatedAt": NAIVE,
        "certyo_status": "anchored",
        "certyo_record_hash": "sha256:" + "00" * 32,
    }


ZOO_JSON = {
    "_id": "65a1b2c3d4e5f6a7b8c9d0e1",
    **EVERY_TYPE_JSON,
    "nested": {"deeper": EVERY_TYPE_JSON, "certyo_nested": "stays"},
    "array": [
        EVERY_TYPE_JSON,
        ["65a1b2c3d4e5f6a7b8c9d0e1", ["0.10", "2026-01-02T03:04:05.678+00:00"]],
    ],
    "updatedAt": "2026-01-02T03:04:05.678+00:00",
}
# Changing any form in docs/sanitize.md changes every stored record hash; this pins them.
ZOO_HASH = "sha256:f365c0f402dbdc1bd16d57563792e986b42fc1457c86a3bceeece79de1a49292"


def test_every_bson_type_has_its_documented_form_at_every_depth() -> None:
    payload = sanitize_document(zoo_document())

    assert payload == ZOO_JSON
    assert list(payload) == list(ZOO_JSON)  # field order is kept
    assert record_hash(payload) == ZOO_HASH
    # The output is plain JSON: both encoders accept it and it survives a round trip.
    assert orjson.loads(orjson.dumps(payload)) == payload
    rfc8785.dumps(payload)


def test_certyo_fields_are_dropped_only_at_the_top_level() -> None:
    doc = {
        "_id": 1,
        "name": "lamp",
        "certyo_status": "anchored",
        "certyo_": "also ours",
        "Certyo_status": "not ours (case differs)",
        "meta": {"certyo_status": "a user field"},
        "list": [{"certyo_x": 1}],
    }

    assert sanitize_document(doc) == {
        "_id": 1,
        "name": "lamp",
        "Certyo_status": "not ours (case differs)",
        "meta": {"certyo_status": "a user field"},
        "list": [{"certyo_x": 1}],
    }


def test_write_back_fields_do_not_change_the_hash() -> None:
    before = zoo_document()
    after = zoo_document()
    after["certyo_status"] = "verified"
    after["certyo_tx_hash"] = "0x" + "ab" * 32

    assert record_hash(sanitize_document(before)) == record_hash(sanitize_document(after))


def test_same_document_gives_the_same_bytes_and_key_order_does_not_change_the_hash() -> None:
    first = orjson.dumps(sanitize_document(zoo_document()))
    second = orjson.dumps(sanitize_document(zoo_document()))
    reordered = dict(reversed(list(zoo_document().items())))

    assert first == second
    assert record_hash(sanitize_document(reordered)) == ZOO_HASH


def test_sanitize_does_not_modify_the_input() -> None:
    doc = zoo_document()
    sanitize_document(doc)

    assert doc["certyo_status"] == "anchored"
    assert doc["decimal"] == Decimal128("1.10")
    assert doc["nested"]["deeper"]["objectId"] == OID


# ---------------------------------------------------------------------------------------------
# Dates


def test_naive_and_aware_datetimes_give_the_same_explicit_utc_string() -> None:
    aware_utc = NAIVE.replace(tzinfo=timezone.utc)
    in_new_york = aware_utc.astimezone(timezone(timedelta(hours=-5)))

    forms = {sanitize_value(ts) for ts in (NAIVE, aware_utc, in_new_york)}

    assert forms == {"2026-01-02T03:04:05.678+00:00"}
    assert {version_ms(ts) for ts in (NAIVE, aware_utc, in_new_york)} == {1767323045678}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05.000+00:00"),
        (datetime(2026, 1, 2, 3, 4, 5, 999999), "2026-01-02T03:04:05.999+00:00"),
        (datetime(1, 1, 1), "0001-01-01T00:00:00.000+00:00"),
        (datetime(9999, 12, 31, 23, 59, 59, 999000), "9999-12-31T23:59:59.999+00:00"),
        # Converting to UTC leaves the range of datetime: still a valid ISO 8601 string.
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))), "0000-12-31T19:00:00.000+00:00"),
    ],
)
def test_dates_have_millisecond_precision_and_an_explicit_offset(ts, expected) -> None:
    assert iso_utc(ts) == expected
    assert sanitize_value(ts) == expected


@pytest.mark.parametrize(
    ("ms", "expected"),
    [
        (0, "1970-01-01T00:00:00.000+00:00"),
        (-1, "1969-12-31T23:59:59.999+00:00"),
        (1767323045678, "2026-01-02T03:04:05.678+00:00"),
        (-62135596800001, "0000-12-31T23:59:59.999+00:00"),
        (-62198755200000, "-000001-01-01T00:00:00.000+00:00"),
        (2**63 - 1, "+292278994-08-17T07:12:55.807+00:00"),
    ],
)
def test_out_of_range_bson_dates_use_expanded_years(ms, expected) -> None:
    assert sanitize_value(DatetimeMS(ms)) == expected


def test_in_range_datetime_ms_matches_the_datetime_form() -> None:
    for ms in (0, -1, 1767323045678, -62135596800000, 253402300799999, -9_000_000_000_000):
        as_datetime = datetime(1970, 1, 1) + timedelta(milliseconds=ms)
        assert sanitize_value(DatetimeMS(ms)) == sanitize_value(as_datetime)
        assert iso_from_ms(ms) == sanitize_value(as_datetime)
        assert version_ms(as_datetime) == ms
    # The cache of days and the digit tables give what the datetime gives, anywhere in range.
    rng = random.Random(11)
    first, last = version_ms(datetime.min), version_ms(datetime.max)
    for ms in [first, last, *(rng.randrange(first, last + 1) for _ in range(5000))]:
        assert iso_from_ms(ms) == iso_utc(datetime(1970, 1, 1) + timedelta(milliseconds=ms))
    # Outside datetime's years: the expanded form, from the cache of days as well.
    for ms, expected in (
        (253402300800000, "+010000-01-01T00:00:00.000+00:00"),
        (-62135596800001, "0000-12-31T23:59:59.999+00:00"),
    ):
        assert iso_from_ms(ms) == iso_from_ms(ms) == expected


# ---------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**53 - 1, 2**53 - 1),
        (-(2**53 - 1), -(2**53 - 1)),
        (2**53, "9007199254740992"),
        (-(2**53), "-9007199254740992"),
        (Int64(2**53 - 1), 2**53 - 1),
        (Int64(-(2**53 - 1)), -(2**53 - 1)),
        (Int64(2**53), "9007199254740992"),
        (Int64(-(2**63)), "-9223372036854775808"),
        (Int64(2**63 - 1), "9223372036854775807"),
        (10**30, "1000000000000000000000000000000"),
        (Int64(0), 0),
    ],
)
def test_integers_are_numbers_only_where_a_double_holds_them_exactly(value, expected) -> None:
    result = sanitize_document({"n": value})["n"]

    assert result == expected
    assert type(result) is type(expected)  # Int64(5) becomes a plain int, not an Int64
    rfc8785.dumps({"n": result})


def test_bool_stays_bool_although_it_is_an_int() -> None:
    assert sanitize_document({"t": True, "f": False}) == {"t": True, "f": False}
    assert orjson.dumps(sanitize_value(True)) == b"true"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, "NaN"),
        (math.inf, "Infinity"),
        (-math.inf, "-Infinity"),
        (-0.0, -0.0),
        (1e300, 1e300),
        (5e-324, 5e-324),
    ],
)
def test_non_finite_floats_become_their_names(value, expected) -> None:
    assert sanitize_value(value) == expected


@pytest.mark.parametrize(
    "text",
    ["1.10", "0.000", "-0", "1E+3", "-1.50E+3", "0.000001", "1E-7", "123456789.0123456789"],
)
def test_decimal128_keeps_its_exact_digits(text) -> None:
    assert sanitize_value(Decimal128(text)) == text


# ---------------------------------------------------------------------------------------------
# Binary, UUID, wrappers


def test_binary_subtypes() -> None:
    assert sanitize_value(Binary(UID.bytes, 4)) == str(UID)
    # Legacy subtype 3 stays base64: the byte order depends on the driver that wrote it.
    assert sanitize_value(Binary(UID.bytes, 3)) == "EjRWeBI0RniSNFZ4EjRWeA=="
    # A subtype-4 value that is not 16 bytes is not a UUID.
    assert sanitize_value(Binary(b"abc", 4)) == "YWJj"
    assert sanitize_value(Binary(b"", 0)) == ""
    assert sanitize_value(Binary(b"\xfb\xff", 128)) == "+/8="


def test_code_scope_and_dbref_without_database_are_sanitized_inside() -> None:
    assert sanitize_value(Code("f()", {"at": NAIVE})) == {
        "$code": "f()",
        "$scope": {"at": "2026-01-02T03:04:05.678+00:00"},
    }
    assert sanitize_value(DBRef("orders", Int64(2**60))) == {
        "$ref": "orders",
        "$id": "1152921504606846976",
    }


def test_regex_flags_become_bson_option_letters_in_order() -> None:
    assert sanitize_value(Regex("a", "xsmi")) == {"$regex": "a", "$options": "imsx"}
    assert sanitize_value(Regex("a")) == {"$regex": "a", "$options": ""}
    assert sanitize_value(re.compile(b"a", re.I)) == {"$regex": "a", "$options": "i"}


# ---------------------------------------------------------------------------------------------
# Poison documents


def _nested_objects(levels: int) -> dict:
    doc: dict = {}
    inner = doc
    for _ in range(levels):
        inner["n"] = {}
        inner = inner["n"]
    return doc


def _nested_arrays(levels: int) -> dict:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return {"a": value}


def _poison(doc, **kwargs) -> PoisonDocumentError:
    with pytest.raises(PoisonDocumentError) as caught:
        sanitize_document(doc, **kwargs)
    return caught.value


@pytest.mark.parametrize("build", [_nested_objects, _nested_arrays])
def test_a_thousand_levels_is_too_deep_not_a_recursion_error(build) -> None:
    error = _poison(build(1000))

    assert error.reason == "too_deep"
    assert str(error).startswith("field ")
    assert len(str(error)) < 600  # the path is shortened in the message


def test_depth_limit_counts_levels_below_the_top() -> None:
    sanitize_document(_nested_objects(100))
    sanitize_document(_nested_arrays(100))
    assert _poison(_nested_objects(101)).path == ".".join(["n"] * 101)
    assert _poison(_nested_objects(4), max_depth=3).reason == "too_deep"
    with pytest.raises(ValueError, match="max_depth"):
        sanitize_document({}, max_depth=10_000)


def test_a_self_referencing_document_is_too_deep() -> None:
    doc: dict = {"a": 1}
    doc["self"] = doc

    assert _poison(doc).reason == "too_deep"


def test_lone_surrogate_in_a_value_names_the_field() -> None:
    error = _poison({"items": [{"name": "ok"}, {"name": "bad \ud800 text"}]})

    assert error.reason == "invalid_unicode"
    assert error.path == "items[1].name"
    assert str(error).startswith("field items[1].name: ")
    assert "U+D800" in str(error)
    str(error).encode("utf-8")  # the message itself is safe to log


def test_lone_surrogate_in_a_key_names_the_field() -> None:
    error = _poison({"meta": {"tag\udc80": 1}})

    assert error.reason == "invalid_unicode"
    assert "object key" in str(error)
    assert error.path == "meta['tag\\\\udc80']"
    str(error).encode("utf-8")


def test_unicode_noncharacters_are_not_i_json() -> None:
    assert _poison({"s": "a\uffffb"}).reason == "invalid_unicode"
    assert _poison({"s": "\U0010fffe"}).reason == "invalid_unicode"
    # Astral characters and private-use characters are fine.
    assert sanitize_document({"s": "😀\ue000"}) == {"s": "😀\ue000"}


def test_non_string_keys_are_bad_keys() -> None:
    error = _poison({"prices": {1: "x"}})

    assert error.reason == "bad_key"
    assert error.path == "prices[<int key '1'>]"
    assert "int" in str(error)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (Decimal("1.5"), "decimal.Decimal"),
        (date(2026, 1, 2), "datetime.date"),
        (object(), "object"),
    ],
)
def test_unsupported_types_name_the_field_and_the_type(value, type_name) -> None:
    error = _poison({"order": {"lines": [{"qty": value}]}})

    assert error.reason == "unsupported_type"
    assert error.path == "order.lines[0].qty"
    assert type_name in str(error)


def test_poison_error_message_has_no_values() -> None:
    error = _poison({"ssn": "123-45-6789", "card": {"number": {"4111 1111 1111 1111"}}})

    assert "4111" not in str(error)
    assert "123-45" not in str(error)


def test_poison_error_survives_pickling() -> None:
    error = _poison({"a": [0, {"b": {1, 2}}]})
    error.record_id = "r1"
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes

    assert (copy.reason, copy.path, copy.record_id, str(copy)) == (
        "unsupported_type",
        "a[1].b",
        "r1",
        str(error),
    )


def test_a_document_that_is_not_a_mapping_is_poison() -> None:
    assert _poison([1, 2]).reason == "unsupported_type"


# ---------------------------------------------------------------------------------------------
# Records


def _product(**fields) -> dict:
    return {"_id": OID, "name": "Desk Lamp", "updatedAt": NAIVE, **fields}


def test_record_has_every_certyo_field() -> None:
    record = to_certyo_record(_product(certyo_status="pending"), SPEC, TENANT)

    assert record == {
        "tenantId": "acme-corp",
        "database": "productdb",
        "collection": "products",
        "recordId": "65a1b2c3d4e5f6a7b8c9d0e1",
        "recordVersion": "1767323045678",
        "operationType": "upsert",
        "sourceTimestamp": "2026-01-02T03:04:05.678+00:00",
        "idempotencyKey": "mongo:productdb.products:65a1b2c3d4e5f6a7b8c9d0e1:1767323045678",
        "recordPayload": {
            "_id": "65a1b2c3d4e5f6a7b8c9d0e1",
            "name": "Desk Lamp",
            "updatedAt": "2026-01-02T03:04:05.678+00:00",
        },
    }
    orjson.dumps(record)


def test_timestamp_may_be_a_dotted_path() -> None:
    spec = CollectionSpec("productdb", "orders", "meta.updatedAt")
    doc = {"_id": "o-1", "meta": {"updatedAt": AWARE}}

    record = to_certyo_record(doc, spec, TENANT)

    assert record["recordVersion"] == "1767323045678"
    assert record["sourceTimestamp"] == "2026-01-02T03:04:05.678+00:00"
    assert document_version(doc, spec) == 1767323045678


def test_document_version_needs_no_sanitizing() -> None:
    # A field with no JSON form does not stop the cheap version lookup.
    doc = _product(bad={1, 2})

    assert document_version(doc, SPEC) == 1767323045678
    with pytest.raises(PoisonDocumentError):
        to_certyo_record(doc, SPEC, TENANT)


def test_two_updates_on_one_day_get_two_keys_and_a_retry_gets_the_same_key() -> None:
    morning = to_certyo_record(_product(updatedAt=datetime(2026, 3, 1, 9, 0)), SPEC, TENANT)
    evening = to_certyo_record(_product(updatedAt=datetime(2026, 3, 1, 21, 0)), SPEC, TENANT)
    retry = to_certyo_record(_product(updatedAt=datetime(2026, 3, 1, 9, 0)), SPEC, TENANT)

    assert morning["idempotencyKey"] != evening["idempotencyKey"]
    assert retry["idempotencyKey"] == morning["idempotencyKey"]
    assert retry == morning


def test_keys_differ_by_database_and_collection() -> None:
    keys = {
        idempotency_key(CollectionSpec(db, coll), "1", 5)
        for db, coll in [("a", "b"), ("a", "c"), ("b", "b")]
    }
    assert len(keys) == 3


def test_long_record_ids_are_hashed_into_the_key() -> None:
    long_id = "x" * 300
    key = idempotency_key(SPEC, long_id, 1767323045678)

    digest = hashlib.sha256(long_id.encode("utf-8")).hexdigest()
    assert key == f"mongo:productdb.products:sha256-{digest}:1767323045678"
    assert len(key) <= 200
    assert key != idempotency_key(SPEC, "x" * 301, 1767323045678)
    # Exactly at the limit the id is kept; multi-byte ids are measured in UTF-8 bytes.
    prefix = "mongo:productdb.products:"
    fits = "y" * (200 - len(prefix) - len(":1"))
    assert idempotency_key(SPEC, fits, 1) == f"{prefix}{fits}:1"
    assert "sha256-" in idempotency_key(SPEC, "é" * 100, 1)


@pytest.mark.parametrize(
    ("doc", "reason", "path"),
    [
        ({"_id": 1, "name": "x"}, "missing_timestamp", "updatedAt"),
        ({"_id": 1, "updatedAt": None}, "bad_timestamp", "updatedAt"),
        ({"_id": 1, "updatedAt": "2026-01-02T03:04:05Z"}, "bad_timestamp", "updatedAt"),
        ({"_id": 1, "updatedAt": 1767323045678}, "bad_timestamp", "updatedAt"),
        ({"_id": 1, "updatedAt": NAIVE, "s": "\ud800"}, "invalid_unicode", "s"),
        ({"updatedAt": NAIVE}, "missing_id", ""),
        ({"_id": {"k": {1}}, "updatedAt": NAIVE}, "unsupported_type", "_id.k"),
    ],
)
def test_records_of_poison_documents_name_the_reason_and_field(doc, reason, path) -> None:
    with pytest.raises(PoisonDocumentError) as caught:
        to_certyo_record(doc, SPEC, TENANT)

    assert caught.value.reason == reason
    assert caught.value.path == path
    if path:
        assert f"field {path}" in str(caught.value)


def test_missing_dotted_timestamp() -> None:
    spec = CollectionSpec("productdb", "orders", "meta.updatedAt")
    for doc in ({"_id": 1}, {"_id": 1, "meta": "flat"}, {"_id": 1, "meta": {}}):
        with pytest.raises(PoisonDocumentError) as caught:
            document_version(doc, spec)
        assert caught.value.reason == "missing_timestamp"
        assert caught.value.path == "meta.updatedAt"


def test_too_large_payloads_are_poison_and_name_the_record() -> None:
    doc = _product(description="x" * 2_000)

    with pytest.raises(PoisonDocumentError) as caught:
        to_certyo_record(doc, SPEC, TENANT, max_payload_bytes=1_000)

    assert caught.value.reason == "too_large"
    assert caught.value.record_id == "65a1b2c3d4e5f6a7b8c9d0e1"
    assert "1000-byte limit" in str(caught.value)
    assert to_certyo_record(doc, SPEC, TENANT, max_payload_bytes=3_000)


# ---------------------------------------------------------------------------------------------
# recordId


@pytest.mark.parametrize(
    ("doc_id", "expected"),
    [
        (OID, "65a1b2c3d4e5f6a7b8c9d0e1"),
        ("sku-123", "sku-123"),
        ("", ""),
        (42, "42"),
        (-7, "-7"),
        (Int64(2**62), "4611686018427387904"),
        (2**70, "1180591620717411303424"),
        (UID, "12345678-1234-4678-9234-567812345678"),
        (Binary(UID.bytes, 4), "12345678-1234-4678-9234-567812345678"),
        (Decimal128("1.10"), "1.10"),
        (NAIVE, "2026-01-02T03:04:05.678+00:00"),
        (1.5, "1.5"),
        (True, "true"),
        (None, "null"),
        ({"region": "eu", "n": 1}, '{"n":1,"region":"eu"}'),
        ({"n": 1, "region": "eu"}, '{"n":1,"region":"eu"}'),
        (
            SON([("at", NAIVE), ("oid", OID)]),
            '{"at":"2026-01-02T03:04:05.678+00:00","oid":"65a1b2c3d4e5f6a7b8c9d0e1"}',
        ),
        ([1, "a"], '[1,"a"]'),
    ],
)
def test_record_id_of_every_id_type(doc_id, expected) -> None:
    assert record_id_of(doc_id) == expected


def test_record_ids_of_different_types_can_collide_as_documented() -> None:
    # docs/sanitize.md: the recordId is the JSON text of the id, not its BSON type.
    assert record_id_of("1") == record_id_of(1) == record_id_of(Int64(1))
    assert record_id_of(OID) == record_id_of(str(OID))


def test_record_id_rejects_lone_surrogates() -> None:
    with pytest.raises(PoisonDocumentError) as caught:
        record_id_of("id\ud800")
    assert caught.value.reason == "invalid_unicode"


def test_subclasses_get_the_form_of_their_base_type() -> None:
    class Color(str, enum.Enum):
        TEAL = "teal"

    class Size(enum.IntEnum):
        LARGE = 3

    raw = RawBSONDocument(bson.encode({"price": Decimal128("2.50"), "at": NAIVE}))
    doc = {"ordered": OrderedDict(b=1, a=2), "color": Color.TEAL, "size": Size.LARGE, "raw": raw}

    payload = sanitize_document(doc)

    assert payload == {
        "ordered": {"b": 1, "a": 2},
        "color": "teal",
        "size": 3,
        "raw": {"price": "2.50", "at": "2026-01-02T03:04:05.678+00:00"},
    }
    assert type(payload["color"]) is str and type(payload["size"]) is int
    assert orjson.dumps(payload) == orjson.dumps(orjson.loads(orjson.dumps(payload)))


def test_paths_inside_wrapper_forms() -> None:
    assert _poison({"ref": DBRef("c", {1})}).path == "ref.$id"
    assert _poison({"js": Code("f()", {"v": {2}})}).path == "js.$scope.v"
    assert _poison({"re": Regex("a\ud800")}).path == "re.$regex"
