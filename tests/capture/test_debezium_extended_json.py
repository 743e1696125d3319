"""`ejson_loads` gives exactly what `bson.json_util.loads` gives, value for value and type for
type, and raises exactly what it raises: on every Extended JSON string the real Debezium
connector wrote (tests/capture/envelopes), on demo-catalog documents in every JSON mode, and on
whatever Hypothesis generates. The fast path may only be faster, never different.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from datetime import datetime, timedelta

import orjson
import pytest
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
    json_util,
)
from bson.json_util import (
    CANONICAL_JSON_OPTIONS,
    RELAXED_JSON_OPTIONS,
    DatetimeRepresentation,
    JSONMode,
    JSONOptions,
)
from fixtures.kafka import captured
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certyo_dagster.capture import debezium
from certyo_dagster.capture.debezium import (
    EXTENDED_JSON_KEYS,
    JSON_OPTIONS,
    ejson_loads,
    encode_change,
    fast_after,
    parse_message,
)
from certyo_dagster.sanitize.documents import sanitize_document
from certyo_dagster.settings import CollectionSpec
from certyo_demo.catalog import TIMESTAMP_FIELD, product

LEGACY = JSONOptions(
    json_mode=JSONMode.LEGACY, datetime_representation=DatetimeRepresentation.LEGACY
)
SPEC = CollectionSpec("productdb", "products", TIMESTAMP_FIELD, capture="debezium")
MODES = {"legacy": LEGACY, "relaxed": RELAXED_JSON_OPTIONS, "canonical": CANONICAL_JSON_OPTIONS}


def reference(text: str):
    return json_util.loads(text, json_options=JSON_OPTIONS)


def same(a, b) -> bool:
    """Equal, of the same types all the way down, with members in the same order."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is Decimal128:
        return a.__getstate__() == b.__getstate__()  # NaN != NaN; the bits must match
    if type(a) is float and a != a:
        return b != b
    if type(a) is DBRef:
        return same(a.as_doc().to_dict(), b.as_doc().to_dict())
    if type(a) is Code:
        return str(a) == str(b) and same(a.scope, b.scope)
    if type(a) is float:
        return repr(a) == repr(b)  # -0.0 is not 0.0
    return a == b


def outcome(load, text: str):
    try:
        return ("value", load(text))
    except Exception as exc:  # noqa: BLE001 - comparing what each one raises
        return ("error", type(exc), str(exc))


def assert_same(text: str) -> None:
    fast, slow = outcome(ejson_loads, text), outcome(reference, text)
    if slow[0] == "error":
        assert fast == slow, text
    else:
        assert fast[0] == "value" and same(fast[1], slow[1]), text


def _texts_of(name: str) -> list[str]:
    texts = []
    for message in captured(name):
        for raw in (message["key"], message["value"]):
            if raw is None:
                continue
            body = json.loads(raw)
            body = body.get("payload", body) if isinstance(body, dict) else body
            if "id" in body:
                texts.append(body["id"])
            for field in ("after", "before"):
                if isinstance(body.get(field), str):
                    texts.append(body[field])
            description = body.get("updateDescription") or {}
            if isinstance(description.get("updatedFields"), str):
                texts.append(description["updatedFields"])
    return texts


def test_the_fast_path_knows_every_form_json_util_converts():
    # A form added to json_util is an object the fast path would otherwise leave a dict.
    assert set(json_util._PARSERS) == EXTENDED_JSON_KEYS


def test_every_captured_extended_json_string_parses_exactly_like_json_util():
    texts = [t for name in ("schemas_off", "schemas_on", "restart") for t in _texts_of(name)]
    forms = {m for text in texts for m in re.findall(r'"(\$[A-Za-z]+)"', text)}
    # What Debezium wrote: every wrapper the fast path converts in place, and a form it hands
    # to json_util ($timestamp); updatedFields hold ISO dates.
    assert {"$oid", "$numberDecimal", "$date", "$numberLong", "$binary", "$timestamp"} <= forms
    assert any(re.search(r'"\$date": "', text) for text in texts)
    assert len(texts) > 100
    for text in texts:
        assert_same(text)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_catalog_documents_parse_exactly_like_json_util_in_every_json_mode(mode):
    rng = random.Random(11)
    start = datetime(2026, 4, 1)
    for i in range(200):
        doc = product(rng, i, start + timedelta(seconds=i))
        text = json_util.dumps(doc, json_options=MODES[mode])
        assert same(ejson_loads(text), reference(text))


def test_the_fast_path_converts_the_catalog_wrappers_itself(monkeypatch):
    """The catalog's wrappers do not reach json_util.object_hook, except the DBRef."""
    seen: list[str] = []
    original = json_util.object_hook

    def spy(obj, options):
        seen.append(next(iter(obj)))
        return original(obj, options)

    monkeypatch.setattr(debezium.json_util, "object_hook", spy)
    doc = product(random.Random(3), 1, datetime(2026, 4, 1))
    value = ejson_loads(json_util.dumps(doc, json_options=LEGACY))
    assert type(value["price"]) is Decimal128 and type(value["_id"]) is ObjectId
    assert set(seen) <= {"$ref"}


@pytest.mark.parametrize(
    "text",
    [
        # What orjson reads differently from Python's json module.
        '{"a": NaN, "b": Infinity, "c": -Infinity}',
        '{"big": 123456789012345678901234567890, "neg": -9223372036854775809}',
        '{"max": 18446744073709551615, "over": 18446744073709551616}',
        '{"huge": 1e400, "tiny": 1e-400, "zero": -0, "negzero": -0.0}',
        '{"lone": "\\ud800", "pair": "\\ud83d\\ude00"}',
        '{"a": 1, "b": 2, "a": 3}',
        '{"x": 9.3e18, "y": [-9.3e18, 1.5e300]}',
        # Wrappers with wrong members or values: the same error as json_util.
        '{"_id": {"$oid": 5}}',
        '{"_id": {"$oid": "not-hex"}}',
        '{"_id": {"$oid": "65a4f0c2e4b0a1b2c3d4e5f6", "x": 1}}',
        '{"d": {"$date": "not a date"}}',
        '{"d": {"$date": 1e300}}',
        '{"d": {"$date": 99999999999999999}}',
        '{"d": {"$date": -62135596800001}}',
        '{"d": {"$date": 1700000000000.7}}',
        '{"d": {"$date": {"$numberLong": "1700000000000"}}}',
        '{"d": {"$date": "2026-12-01T14:40:07.707Z"}}',
        '{"d": {"$date": "2026-12-01T14:40:07+05:30"}}',
        '{"n": {"$numberLong": "x"}}',
        '{"n": {"$numberLong": 5}}',
        '{"n": {"$numberLong": " 12 "}}',
        '{"n": {"$numberDecimal": 5}}',
        '{"n": {"$numberDecimal": "NaN"}}',
        '{"n": {"$numberDecimal": "-Infinity"}}',
        '{"n": {"$numberDecimal": "1E+6144"}}',
        '{"n": {"$numberDecimal": "nope"}}',
        '{"n": {"$numberDecimal": " 1.5"}}',
        '{"n": {"$numberDecimal": "1_000.5"}}',
        '{"n": {"$numberDecimal": "+1.5"}}',
        '{"n": {"$numberDecimal": ".5"}}',
        '{"n": {"$numberDecimal": "5."}}',
        '{"n": {"$numberDecimal": "\\u0661\\u0662"}}',
        '{"n": {"$numberDecimal": "12345678901234567890123456789012345.5"}}',
        '{"n": {"$numberDecimal": "-0.000"}}',
        '{"b": {"$binary": "!!!", "$type": "00"}}',
        '{"b": {"$binary": "AAH+/w==", "$type": 0}}',
        '{"b": {"$binary": "AAH+/w==", "$type": "zz"}}',
        '{"b": {"$binary": "AAH+/w==", "$type": "03"}}',
        '{"b": {"$binary": "AAH+/w==", "$type": "80"}}',
        '{"b": {"$binary": "AAH+/w==", "$type": "ffffff80"}}',
        '{"b": {"$type": "04", "$binary": "EjRWeBI0VngSNFZ4EjRWeA=="}}',
        '{"b": {"$binary": {"base64": "AAH+/w==", "subType": "04"}}}',
        '{"b": {"$binary": "AAH+/w==", "$type": "00", "x": 1}}',
        '{"u": {"$uuid": "12345678-1234-5678-1234-567812345678"}}',
        '{"r": {"$ref": "c", "$id": {"$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}, "$db": "d", "k": 1}}',
        '{"r": {"$ref": 5, "$id": 1}}',
        '{"t": {"$timestamp": {"t": 1700000000, "i": 1}}}',
        '{"m": {"$minKey": 1}, "M": {"$maxKey": 1}, "u": {"$undefined": true}}',
        '{"x": {"$regularExpression": {"pattern": "a+", "options": "i"}}}',
        '{"x": {"$regex": "a+", "$options": "i"}, "q": {"$regex": {"$oid": 1}}}',
        '{"c": {"$code": "f()", "$scope": {"n": {"$numberInt": "1"}}}}',
        '{"s": {"$symbol": "s"}, "f": {"$numberDouble": "-Infinity"}}',
        '{"p": {"$dbPointer": {"$ref": "c", "$id": {"$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}}}}',
        '{"a": "x", "$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}',
        '{"deep": [[[{"$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}]]], "e": {}, "l": []}',
        '[{"$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}, 1]',
        '"just a string"',
        "12345678901234567890123",
        "1e400",
        "",
        "{",
        '{"a": 1} x',
        "[" * 2000 + "]" * 2000,
    ],
)
def test_edge_cases_give_what_json_util_gives_or_raise_what_it_raises(text):
    assert_same(text)


@settings(max_examples=3000, deadline=None)
@given(
    sign=st.sampled_from(["", "-"]),
    whole=st.text("0123456789", min_size=1, max_size=40),
    fraction=st.one_of(st.none(), st.text("0123456789", min_size=1, max_size=40)),
)
def test_plain_decimals_are_stored_with_the_bits_decimal128_gives_them(sign, whole, fraction):
    text = sign + whole + ("" if fraction is None else "." + fraction)
    assert_same(json.dumps({"$numberDecimal": text}))


_texts = st.text(max_size=8)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.floats(),
    _texts,
    st.binary(max_size=12),
    st.builds(Binary, st.binary(max_size=12), st.sampled_from([1, 2, 3, 5, 128])),
    st.builds(Binary, st.binary(min_size=16, max_size=16), st.sampled_from([3, 4])),
    st.uuids().map(lambda u: Binary.from_uuid(u)),
    st.binary(min_size=12, max_size=12).map(ObjectId),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda ts: ts.replace(microsecond=ts.microsecond // 1000 * 1000)
    ),
    st.builds(
        lambda s, c, e: Decimal128(f"{s}{c}E{e}"),
        st.sampled_from(["", "-"]),
        st.integers(0, 10**34 - 1),
        st.integers(-6176, 6111 - 33),
    ),
    st.decimals(allow_nan=False, places=3, min_value=-(10**6), max_value=10**6).map(
        lambda d: Decimal128(str(d))
    ),
    st.builds(Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(Regex, _texts, st.sampled_from(["", "i", "ms"])),
    st.builds(Code, _texts),
    st.builds(DBRef, _texts, st.binary(min_size=12, max_size=12).map(ObjectId)),
    st.just(MinKey()),
    st.just(MaxKey()),
)
_documents = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_texts, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(_texts, _documents, max_size=6), mode=st.sampled_from(sorted(MODES)))
def test_generated_documents_parse_exactly_like_json_util(doc, mode):
    try:
        text = json_util.dumps(doc, json_options=MODES[mode])
    except (ValueError, OverflowError):
        return  # a value json_util cannot write in this mode
    assert_same(text)


def test_a_uuid_read_as_binary_subtype_4_like_pymongo_returns_it():
    value = ejson_loads(json_util.dumps({"u": Binary.from_uuid(uuid.UUID(int=7))}))
    assert type(value["u"]) is Binary and value["u"].subtype == 4


# -- `after` sanitized straight from orjson's tree -----------------------------------------------


def slow_after(text: str, timestamp_field: str = "updatedAt"):
    """What the fast path must equal: the document parsed by json_util, then sanitized."""
    document = reference(text)
    value = document
    for part in timestamp_field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return sanitize_document(document), value if isinstance(value, datetime) else None


def assert_fast_after_matches(text: str, timestamp_field: str = "updatedAt") -> bool:
    """The fast path gives the slow result or nothing; True when it gave one."""
    try:
        tree = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    try:
        doc_id = reference(text)["_id"]
    except Exception:  # noqa: BLE001 - no document, or none with an _id: nothing to match
        doc_id = None
    # Given the text, the fast path skips the checks plain text cannot fail: same result.
    fast = fast_after(tree, doc_id, timestamp_field)
    given_text = fast_after(orjson.loads(text), doc_id, timestamp_field, text)
    assert (fast is None) == (given_text is None), text
    if fast is None:
        return False
    payload, timestamp = slow_after(text, timestamp_field)
    assert fast.payload_json == given_text.payload_json == orjson.dumps(payload), text
    assert same(fast.timestamp, timestamp) and same(given_text.timestamp, timestamp), text
    return True


def test_captured_documents_sanitize_on_the_fast_path_exactly_like_the_slow_one():
    texts = [t for name in ("schemas_off", "schemas_on", "restart") for t in _texts_of(name)]
    afters = [t for t in texts if t.startswith('{"_id"')]
    used = [assert_fast_after_matches(text, "created") for text in afters]
    assert sum(used) > len(afters) // 2, "the captured documents should take the fast path"


@pytest.mark.parametrize("mode", ["legacy", "relaxed"])
def test_catalog_documents_sanitize_on_the_fast_path_exactly_like_the_slow_one(mode):
    rng = random.Random(5)
    start = datetime(2026, 4, 1)
    used = 0
    for i in range(300):
        doc = product(rng, i, start + timedelta(seconds=i))
        doc["certyo_status"] = "pending"  # a write-back field: dropped from the payload
        used += assert_fast_after_matches(json_util.dumps(doc, json_options=MODES[mode]))
    if mode == "legacy":  # what Debezium writes: every catalog document is fast
        assert used == 300


@pytest.mark.parametrize(
    "text",
    [
        '{"_id": 1, "updatedAt": {"$date": 1775001600123}, "a": {"b": [1, {"c": "d"}]}}',
        '{"_id": 1, "certyo_status": "anchored", "certyo_x": {"$oid": "zz"}, "n": 1}',
        '{"_id": 1, "big": 9007199254740993, "neg": -9007199254740993, "f": 2.5}',
        '{"_id": 1, "l": {"$numberLong": "9007199254740993"}, "s": {"$numberLong": "12"}}',
        '{"_id": 1, "d": {"$numberDecimal": "0.0000001"}, "e": {"$numberDecimal": "0.000001"}}',
        '{"_id": 1, "d": {"$numberDecimal": "007.50"}, "e": {"$numberDecimal": "-0.00"}}',
        '{"_id": 1, "d": {"$numberDecimal": "1E+3"}, "e": {"$numberDecimal": "100"}}',
        '{"_id": 1, "d": {"$numberDecimal": "12345678901234567890123456789012345"}}',
        '{"_id": 1, "d": {"$numberDecimal": "1234567890123456789012345678901234"}, '
        '"e": {"$numberDecimal": "-12345678901234567890123456789.1234"}}',
        '{"_id": 1, "u": {"$binary": "EjRWeBI0VngSNFZ4EjRWeA==", "$type": "04"}}',
        '{"_id": 1, "u": {"$binary": "EjRWeBI0Vng=", "$type": "04"}}',
        '{"_id": 1, "u": {"$binary": "EjRWeBI0VngSNFZ4EjRWeA==", "$type": "03"}}',
        '{"_id": 1, "b": {"$binary": "AA H+/w", "$type": "00"}}',
        '{"_id": 1, "b": {"$binary": "AAH+/w==", "$type": "-1"}}',
        '{"_id": 1, "t": {"$timestamp": {"t": 1700000000, "i": 1}}}',
        '{"_id": 1, "t": {"$timestamp": {"t": 4294967296, "i": 1}}}',
        '{"_id": 1, "r": {"$ref": "c", "$id": {"$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}}}',
        '{"_id": 1, "r": {"$ref": "c", "$id": 5, "$db": null}, "q": {"$ref": "c", "$id": 5, '
        '"$db": "d"}}',
        '{"_id": 1, "r": {"$ref": 5, "$id": 5}}',
        '{"_id": 1, "r": {"$id": 5, "$ref": "c", "x": 1}}',
        '{"_id": 1, "o": {"$oid": "65A4F0C2E4B0A1B2C3D4E5F6"}}',
        '{"_id": {"$oid": "65A4F0C2E4B0A1B2C3D4E5F6"}, "n": 1}',
        '{"_id": {"$oid": "65a4f0c2e4b0a1b2c3d4e5f6", "x": 1}, "n": 1}',
        '{"_id": 1, "o": {"$oid": "65a4f0c2e4b0a1b2c3d4e5f"}}',
        '{"_id": 1, "d": {"$date": 253402300800000}}',
        '{"_id": 1, "d": {"$date": -62135596800000}}',
        '{"_id": 1, "updatedAt": {"$date": "2026-12-01T14:40:07.707Z"}}',
        '{"_id": 1, "updatedAt": "2026-12-01"}',
        '{"_id": {"$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}, "x": "\\ud800"}',
        '{"_id": 1, "\\ufdd0": 1}',
        '{"_id": 1, "caf\\u00e9": "cr\\u00e8me"}',
        '{"_id": 1, "caf\u00e9": "cr\u00e8me", "n": "\ufdd0"}',
        '{"_id": 1, "\ufdd0": 1}',
        '{"_id": 1, "x": "\\\\u0041", "note": "certyo_status is ours"}',
        '{"_id": 1, "certyo_status": "pending", "certyo_\\u00e9": 1, "n": 2}',
        '{"_id": 1, "x": 1e300, "y": -1e19}',
        '{"_id": 1, "deep": ' + "[" * 100 + "]" * 100 + "}",
        '{"_id": 1, "deep": ' + "[" * 101 + "]" * 101 + "}",
        '{"_id": 1, "deep": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}",
        '{"_id": 1, "deep": ' + '{"a": ' * 101 + "1" + "}" * 101 + "}",
        '{"_id": 1, "$oid": "65a4f0c2e4b0a1b2c3d4e5f6"}',
        '{"x": 1}',
    ],
)
def test_edge_documents_sanitize_on_the_fast_path_exactly_like_the_slow_one(text):
    try:
        slow_after(text)
    except Exception:  # noqa: BLE001 - the slow path rejects it: so must the fast one
        try:
            tree = orjson.loads(text)
        except orjson.JSONDecodeError:
            return  # the fast path never starts
        assert fast_after(tree, 1, "updatedAt") is None
        assert fast_after(orjson.loads(text), 1, "updatedAt", text) is None
        return
    assert_fast_after_matches(text)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=st.dictionaries(_texts, _documents, max_size=6),
    doc_id=_scalars,
    mode=st.sampled_from(["legacy", "relaxed"]),
)
def test_generated_documents_sanitize_on_the_fast_path_exactly_like_the_slow_one(doc, doc_id, mode):
    try:
        text = json_util.dumps({"_id": doc_id, **doc}, json_options=MODES[mode])
        slow_after(text)
    except Exception:  # noqa: BLE001 - json_util cannot write it, or the slow path rejects it
        return
    assert_fast_after_matches(text)


def test_a_parsed_change_builds_its_bson_document_only_when_asked():
    doc = product(random.Random(1), 1, datetime(2026, 4, 1))
    key = orjson.dumps({"id": json_util.dumps(doc["_id"], json_options=LEGACY)})
    envelope = json.loads(next(m["value"] for m in captured("schemas_off") if m["value"]))
    envelope["after"] = json_util.dumps(doc, json_options=LEGACY)
    envelope["op"] = "c"
    change = parse_message(key, orjson.dumps(envelope), SPEC)
    assert change.fast is not None and change.parsed_document is None
    record = encode_change(change, SPEC, "tenant-a")
    assert change.parsed_document is None
    assert record.as_record()["recordPayload"] == sanitize_document(doc)
    assert record.timestamp == doc["updatedAt"]
    assert same(change.document, reference(envelope["after"]))
