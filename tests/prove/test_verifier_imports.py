"""The verifier stays independent of the pipeline: an auditor needs only certyo_dagster.prove."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from fixtures.bundles import tree_bundles

from certyo_dagster.prove.bundle import BundleFormatError, check_shape

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "docs" / "proof-bundle.schema.json").read_text("utf-8")
)


def test_the_verifier_imports_nothing_outside_prove():
    code = "import sys, json, certyo_dagster.prove.verifier\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    ours = [
        m for m in modules if m.split(".")[0] in {"certyo_dagster", "certyo_sandbox", "certyo_demo"}
    ]
    outside = [
        m for m in ours if m != "certyo_dagster" and not m.startswith("certyo_dagster.prove")
    ]
    assert outside == [], outside
    for heavy in ("dagster", "pymongo", "bson", "pandas"):
        assert heavy not in modules, f"the verifier pulls in {heavy}"


def test_prove_modules_import_nothing_else_of_ours():
    prove = Path(__file__).parents[2] / "certyo_dagster" / "prove"
    for source in prove.glob("*.py"):
        for line in source.read_text("utf-8").splitlines():
            stripped = line.strip()
            if stripped.startswith(("import certyo", "from certyo")):
                assert stripped.startswith("from certyo_dagster.prove"), (source.name, stripped)


def test_written_bundles_match_the_json_schema():
    for bundle in tree_bundles(5):
        jsonschema.validate(bundle, SCHEMA)
        check_shape(bundle)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.pop("times"),
        lambda b: b.update(extra=1),
        lambda b: b["document"].update(version="1"),
        lambda b: b["document"].update(recordId=""),
        lambda b: b["record"].update(recordHash="sha256:ABC"),
        lambda b: b["inclusionProof"].update(leafIndex=-1),
        lambda b: b["inclusionProof"].update(treeSize=0),
        lambda b: b["inclusionProof"]["auditPath"].append("zz"),
        lambda b: b["inclusionProof"].update(root="0x" + "0" * 64),
        lambda b: b["anchor"].update(chainId=0),
        lambda b: b["anchor"].update(transactionHash="0x" + "A" * 64),
        lambda b: b["anchor"].update(blockNumber=1.5),
        lambda b: b["anchor"].update(ipfsCid=""),
        lambda b: b["times"].update(anchoredAt="2026-11-01 10:00"),
        lambda b: b.update(formatVersion=2),
    ],
)
def test_the_schema_and_the_verifier_refuse_the_same_shapes(change):
    # (A trailing line feed in a pattern-checked string is refused too, but Python's `re`
    # lets `$` match before it, so jsonschema here cannot show the schema's ECMA meaning.)
    bundle = tree_bundles(3, indexes=[1])[0]
    change(bundle)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bundle, SCHEMA)
    with pytest.raises(BundleFormatError):
        check_shape(bundle)
