"""Screenshots of the Dagster UI for the README: the lineage page and the partitions page.

Starts the `make run` stack in a temporary directory, waits until the sensor has materialized
every seeded partition and the verify schedule has run, then points headless Chromium
(Debian's `chromium`) at the pages. Usage: `.venv/bin/python scripts/screenshots.py [docs]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from certyo_demo.browser import chromium_binary, run_chromium
from certyo_demo.launcher import Stack, start_stack
from certyo_demo.servers import free_port

REPO = Path(__file__).resolve().parents[1]
LOCATION = "certyo_dagster"
PAGES = {
    "lineage.png": f"/locations/{LOCATION}/asset-groups/products/lineage",
    "partitions.png": "/assets/productdb/products/changed_documents?view=partitions",
}
STATUS_QUERY = """{
  assetNodes { assetKey { path } partitionStats { numMaterialized numPartitions }
               assetMaterializations(limit: 1) { timestamp } }
}"""


def pipeline_has_run(stack: Stack) -> bool:
    """Every partition of changed_documents materialized, and anchoring_status once."""
    nodes = {"/".join(n["assetKey"]["path"]): n for n in stack.graphql(STATUS_QUERY)["assetNodes"]}
    changed = nodes.get("productdb/products/changed_documents")
    anchoring = nodes.get("productdb/products/anchoring_status")
    if not changed or not anchoring:
        return False
    stats = changed["partitionStats"]
    return stats["numMaterialized"] == stats["numPartitions"] and bool(
        anchoring["assetMaterializations"]
    )


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = chromium_binary()
    if binary is None:
        sys.exit("chromium is not installed: apt-get update && apt-get install -y chromium")
    return run_chromium(binary, *args, profile=profile)


def main(out_dir: str = "docs") -> int:
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="certyo-screenshots-"))
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("CERTYO_", "MONGO_", "DAGSTER_"))
    }
    stack = start_stack(
        run_dir,
        dagster_port=free_port(),
        sandbox_port=free_port(),
        mongo_port=free_port(),
        environ=environ,
        instance_config=REPO / "dagster.yaml",
        workspace=REPO / "workspace.yaml",
    )
    try:
        stack.wait_for_webserver()
        deadline = time.monotonic() + 300
        while not pipeline_has_run(stack):
            if time.monotonic() > deadline:
                print("warning: the pipeline has not run everywhere yet", file=sys.stderr)
                break
            time.sleep(5)
        stack.graphql("mutation { setNuxSeen }")  # hide the first-visit newsletter dialog
        for name, path in PAGES.items():
            with tempfile.TemporaryDirectory() as profile:
                dom = chromium("--dump-dom", stack.dagster_url + path, profile=Path(profile))
            if "changed_documents" not in dom.stdout:
                print(f"warning: {path} did not render the assets", file=sys.stderr)
            with tempfile.TemporaryDirectory() as profile:
                chromium(
                    f"--screenshot={out / name}", stack.dagster_url + path, profile=Path(profile)
                )
            print(f"wrote {out / name}")
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
