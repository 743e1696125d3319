"""The offline verifier: good bundles verify, and every kind of change is rejected by name."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from fixtures.bundles import tree_bundles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certyo_dagster.prove.bundle import bundle_digest, encode_bundle
from certyo_dagster.prove.verifier import REJECTED, VERIFIED, verify_bundle_bytes


def leaf_paths(value: Any, path: tuple = ()) -> list[tuple]:
    """The path of every scalar in a bundle (list items included)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaf_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in leaf_paths(v, (*path, i))]
    return [path]


def changed(value: Any) -> Any:
    """A different value of the same kind (or a plausible one for null)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value is None:
        return 1
    assert isinstance(value, str)
    if value.startswith(("sha256:", "0x")) or all(c in "0123456789abcdef" for c in value):
        last = value[-1]
        return value[:-1] + ("0" if last != "0" else "1")
    # Change one character inside, so the text keeps its form (a JSON payload stays JSON).
    i = next(i for i, c in enumerate(value) if c.isalnum())
    c = value[i]
    new = str((int(c) + 1) % 10) if c.isdigit() else ("X" if c != "X" else "Y")
    return value[:i] + new + value[i + 1 :]


def set_at(bundle: dict, path: tuple, value: Any) -> dict:
    copied = copy.deepcopy(bundle)
    target = copied
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return copied


@pytest.fixture(scope="module")
def bundle() -> dict:
    return tree_bundles(13, indexes=[6])[0]


def test_a_bundle_verifies_and_says_what_it_proves(bundle):
    verdict = verify_bundle_bytes(encode_bundle(bundle), "b.json")
    assert verdict.verdict == VERIFIED, verdict.line()
    assert verdict.passed == [
        "read",
        "format",
        "canonical-form",
        "digest",
        "record-hash",
        "identity",
        "inclusion",
    ]
    line = verdict.line()
    assert line.startswith("VERIFIED b.json: productdb.products recordId")
    assert "chain not checked" in line


@pytest.mark.parametrize("size", range(1, 301))
def test_every_leaf_of_trees_of_1_to_300_verifies(size):
    for b in tree_bundles(size):
        verdict = verify_bundle_bytes(encode_bundle(b))
        assert verdict.ok, (size, b["inclusionProof"]["leafIndex"], verdict.line())


def test_changing_any_field_is_rejected_by_the_digest(bundle):
    paths = leaf_paths(bundle)
    assert len(paths) > 20
    for path in paths:
        tampered = set_at(bundle, path, changed(_get(bundle, path)))
        verdict = verify_bundle_bytes(encode_bundle(tampered))
        assert verdict.verdict == REJECTED, path
        expected = "format" if path in {("format",), ("formatVersion",)} else "digest"
        assert verdict.step == expected, (path, verdict.line())


# A forger who also rewrites the digest is still stopped by the step that covers the field.
BOUND_FIELDS = {
    ("document", "id"): "identity",
    ("document", "recordId"): "identity",
    ("document", "version"): "identity",
    ("document", "timestampField"): "identity",
    ("record", "canonicalPayload"): "record-hash",
    ("record", "recordHash"): "record-hash",
    ("inclusionProof", "leafIndex"): "inclusion",
    ("inclusionProof", "treeSize"): "inclusion",
    ("inclusionProof", "root"): "inclusion",
    ("inclusionProof", "auditPath", 0): "inclusion",
    ("inclusionProof", "auditPath", 1): "inclusion",
    ("inclusionProof", "auditPath", 2): "inclusion",
    ("inclusionProof", "auditPath", 3): "inclusion",
}
# Covered only by the digest offline; the chain fields are checked with --rpc
# (tests/prove/test_proof_round_trip.py), the rest are claims (docs/proof-bundle.md).
DIGEST_ONLY = {
    ("document", "database"),
    ("document", "collection"),
    ("anchor", "chainId"),
    ("anchor", "transactionHash"),
    ("anchor", "blockNumber"),
    ("anchor", "ipfsCid"),
    ("times", "ingestedAt"),
    ("times", "anchoredAt"),
}


def test_a_rewritten_digest_does_not_save_a_changed_bound_field(bundle):
    assert set(leaf_paths(bundle)) == (
        set(BOUND_FIELDS) | DIGEST_ONLY | {("format",), ("formatVersion",), ("bundleDigest",)}
    )
    for path, step in BOUND_FIELDS.items():
        # An audit path fixes the tree's shape, not its size: leaf 6 has the same path in
        # trees of 13 and 14 leaves (the root covers the rest). 7 leaves is another shape.
        value = 7 if path == ("inclusionProof", "treeSize") else changed(_get(bundle, path))
        tampered = set_at(bundle, path, value)
        tampered["bundleDigest"] = bundle_digest(tampered)
        verdict = verify_bundle_bytes(encode_bundle(tampered))
        assert (verdict.verdict, verdict.step) == (REJECTED, step), (path, verdict.line())
    for path in DIGEST_ONLY:
        tampered = set_at(bundle, path, changed(_get(bundle, path)))
        tampered["bundleDigest"] = bundle_digest(tampered)
        assert verify_bundle_bytes(encode_bundle(tampered)).ok, path


def test_tree_size_is_bound_only_through_the_shape_of_the_audit_path(bundle):
    # Documented in docs/proof-bundle.md: the root, not the size, is what the chain anchors.
    tampered = set_at(bundle, ("inclusionProof", "treeSize"), 14)
    tampered["bundleDigest"] = bundle_digest(tampered)
    assert verify_bundle_bytes(encode_bundle(tampered)).ok


def test_messages_name_the_step_and_the_values(bundle):
    tampered = set_at(bundle, ("document", "version"), bundle["document"]["version"] + 5)
    tampered["bundleDigest"] = bundle_digest(tampered)
    line = verify_bundle_bytes(encode_bundle(tampered), "x.json").line()
    assert line.startswith("REJECTED x.json: identity failed: document.version is")
    assert str(bundle["document"]["version"]) in line


def test_whitespace_or_key_order_changes_are_rejected_as_not_canonical(bundle):
    pretty = json.dumps(bundle, indent=2).encode()
    assert verify_bundle_bytes(pretty).step == "canonical-form"
    assert verify_bundle_bytes(encode_bundle(bundle)[:-1]).step == "canonical-form"
    assert verify_bundle_bytes(encode_bundle(bundle) + b"\n").step == "canonical-form"


def test_broken_files_are_rejected_at_read_or_format(bundle):
    assert verify_bundle_bytes(b"").step == "read"
    assert verify_bundle_bytes(b"[1]\n").step == "read"
    assert verify_bundle_bytes(b"\xff\xfe").step == "read"
    extra = dict(bundle, extra=1)
    assert verify_bundle_bytes(encode_bundle(extra)).step == "format"
    missing = {k: v for k, v in bundle.items() if k != "anchor"}
    assert verify_bundle_bytes(encode_bundle(missing)).step == "format"


def test_a_payload_that_is_not_canonical_is_rejected_even_with_a_matching_hash(bundle):
    import hashlib

    text = json.dumps(json.loads(bundle["record"]["canonicalPayload"]), indent=1)
    tampered = copy.deepcopy(bundle)
    tampered["record"]["canonicalPayload"] = text
    tampered["record"]["recordHash"] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    tampered["bundleDigest"] = bundle_digest(tampered)
    verdict = verify_bundle_bytes(encode_bundle(tampered))
    assert (verdict.step, verdict.message) == (
        "record-hash",
        "canonicalPayload is not in RFC 8785 canonical form",
    )


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_corruptions_never_verify(bundle, data):
    raw = bytearray(encode_bundle(bundle))
    kind = data.draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "replace":
        new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]))
        raw[at] = new
    elif kind == "insert":
        raw.insert(at, data.draw(st.integers(0, 255)))
    elif kind == "delete":
        del raw[at]
    else:
        del raw[at:]
    verdict = verify_bundle_bytes(bytes(raw))
    assert verdict.verdict == REJECTED, (kind, at)
    assert verdict.step is not None and verdict.message


def _get(bundle: dict, path: tuple) -> Any:
    value: Any = bundle
    for part in path:
        value = value[part]
    return value


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), value=json_values, rewrite_digest=st.booleans())
def test_any_value_in_any_bound_field_is_rejected_without_a_crash(
    bundle, data, value, rewrite_digest
):
    path = data.draw(st.sampled_from(sorted(BOUND_FIELDS, key=str)))
    if value == _get(bundle, path):
        return
    tampered = set_at(bundle, path, value)
    if rewrite_digest:
        tampered["bundleDigest"] = bundle_digest(tampered) if _encodable(tampered) else "x"
    raw = encode_bundle(tampered) if _encodable(tampered) else json.dumps(tampered).encode()
    verdict = verify_bundle_bytes(raw)
    assert verdict.verdict == REJECTED, (path, value)


def _encodable(bundle: dict) -> bool:
    try:
        encode_bundle(bundle)
    except ValueError:
        return False
    return True
