"""The stack `make run` starts, driven the way a person would: through the webserver.

One stack for the module (SecantusDB, webserver, daemon, code server, sandbox, churn on free
ports, in a temporary run directory). The last test stops it and checks that no process is left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from certyo_dagster.capture.polling import HOUR_FORMAT
from certyo_dagster.source.mongo import close_all_clients, open_client
from certyo_demo.browser import chromium_binary, run_chromium
from certyo_demo.launcher import Stack, start_stack
from certyo_demo.servers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

LOCATION = "certyo_dagster"
REPO = Path(__file__).resolve().parents[2]
ASSETS = [
    "productdb/products",
    "productdb/products/changed_documents",
    "productdb/products/certyo_records",
    "productdb/products/ingestion_receipts",
    "productdb/products/anchoring_status",
    "productdb/products/tamper_audit",
    "productdb/products/proof_bundles",
]
PARTITIONED = ASSETS[1:4]


def _clean_environ() -> dict[str, str]:
    prefixes = ("CERTYO_", "MONGO_", "DAGSTER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _processes_of(stack: Stack, group_ids: set[int]) -> list[str]:
    """Live processes in the stack's process groups or naming its run directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, pgid = stat[0], int(stat[2])
        if state != "Z" and (pgid in group_ids or str(stack.run_dir) in cmdline):
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    run_dir = Path(tempfile.mkdtemp(prefix="certyo-e2e-"))
    started = start_stack(
        run_dir,
        dagster_port=free_port(),
        sandbox_port=free_port(),
        mongo_port=free_port(),
        environ=_clean_environ(),
        instance_config=REPO / "dagster.yaml",
        workspace=REPO / "workspace.yaml",
        seed_count=600,
    )
    try:
        started.wait_for_webserver(timeout=120)
        yield started
    finally:
        started.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _wait_for_location(stack: Stack) -> list[dict]:
    """Asset nodes, once the code location has loaded (the webserver answers earlier)."""
    deadline = time.monotonic() + 90
    while True:
        nodes = stack.graphql(
            "{ assetNodes { assetKey { path } isPartitioned partitionKeys groupName } }",
        )["assetNodes"]
        if nodes or time.monotonic() > deadline:
            return nodes
        time.sleep(1)


def _expected_partitions(stack: Stack) -> list[str]:
    start = datetime.strptime(stack.env["CERTYO_PARTITION_START"], "%Y-%m-%dT%H:%M")
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # partition keys are UTC hours
    keys, hour = [], start
    while hour <= now:
        keys.append(hour.strftime(HOUR_FORMAT))
        hour += timedelta(hours=1)
    return keys


def test_the_demo_database_is_secantusdb_in_the_run_directory(stack: Stack) -> None:
    assert stack.mongo_server is not None
    assert stack.env["MONGO_URI"] == stack.mongo_server.uri
    assert stack.mongo_server.storage == stack.run_dir / "secantus"
    assert stack.mongo_server.process.pid in stack.pids()
    close_all_clients()
    hello = open_client(stack.env["MONGO_URI"]).admin.command("hello")
    close_all_clients()
    assert hello["setName"] == "secantus"


def test_asset_graph_and_partitions_are_served(stack: Stack) -> None:
    nodes = {"/".join(n["assetKey"]["path"]): n for n in _wait_for_location(stack)}
    assert sorted(nodes) == sorted(ASSETS)
    expected = _expected_partitions(stack)
    for key in PARTITIONED:
        assert nodes[key]["isPartitioned"]
        assert nodes[key]["partitionKeys"][: len(expected)] == expected
    assert not nodes["productdb/products/anchoring_status"]["isPartitioned"]


def test_sensor_and_schedules_run_by_default_in_demo_mode(stack: Stack) -> None:
    repos = stack.graphql(
        """{ repositoriesOrError { ... on RepositoryConnection { nodes {
             location { name }
             sensors { name sensorState { status } }
             schedules { name scheduleState { status } } } } } }""",
    )["repositoriesOrError"]["nodes"]
    (repo,) = [r for r in repos if r["location"]["name"] == LOCATION]
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    schedules = {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]}
    assert sensors["products_change_sensor"] == "RUNNING"
    assert sensors["products_proof_bundles_automation"] == "RUNNING"
    assert schedules["ingest_products_hourly"] == "RUNNING"
    assert schedules["verify_products_schedule"] == "RUNNING"


def test_a_run_launched_through_graphql_ships_its_partition(stack: Stack) -> None:
    partition = _expected_partitions(stack)[0]  # seeded data only; churn writes to later hours
    launched = stack.graphql(
        """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
             __typename ... on LaunchRunSuccess { run { runId } }
             ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } }
           } }""",
        params={
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": "__repository__",
                "jobName": "ingest_products",
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    status, deadline = "QUEUED", time.monotonic() + 180
    while status not in {"SUCCESS", "FAILURE", "CANCELED"} and time.monotonic() < deadline:
        time.sleep(2)
        status = stack.graphql(
            "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", id=run_id
        )["runOrError"]["status"]
    assert status == "SUCCESS", stack.log_tail("dagster")

    start = datetime.strptime(partition, HOUR_FORMAT)
    close_all_clients()
    products = open_client(stack.env["MONGO_URI"])["productdb"]["products"]
    in_partition = products.count_documents(
        {"updatedAt": {"$gte": start, "$lt": start + timedelta(hours=1)}}
    )
    written_back = products.count_documents(
        {
            "updatedAt": {"$gte": start, "$lt": start + timedelta(hours=1)},
            "certyo_status": {"$exists": True},
        }
    )
    close_all_clients()
    stats = requests.get(f"{stack.sandbox_url}/_sandbox/stats", timeout=10).json()
    assert in_partition > 0
    assert stats["records_stored"] >= in_partition
    assert written_back == in_partition


def test_lineage_page_shows_the_assets_in_a_browser(stack: Stack, tmp_path: Path) -> None:
    chromium = chromium_binary()
    if chromium is None:
        pytest.skip(
            "chromium is not installed (apt-get install -y chromium): browser check skipped"
        )
    stack.graphql("mutation { setNuxSeen }")  # the first-visit newsletter dialog
    url = f"{stack.dagster_url}/locations/{LOCATION}/asset-groups/products/lineage"
    dom = run_chromium(chromium, "--dump-dom", url, profile=tmp_path / "profile").stdout
    for name in ("changed_documents", "certyo_records", "ingestion_receipts", "anchoring_status"):
        assert name in dom, f"{name} is not on the lineage page"


def test_stopping_leaves_no_process_behind(stack: Stack) -> None:
    groups = set(stack.pids())
    assert _processes_of(stack, groups)  # the check can see the stack while it runs
    stack.stop()
    deadline = time.monotonic() + 15
    while _processes_of(stack, groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_of(stack, groups) == []
