"""How many runs each way of backfilling makes, and where each shows its partition statuses.

The UI's backfills: GraphQL is the webserver's own schema, run against the code location in a
code server of its own (as `dagster dev` runs it), and the daemon's backfill iteration makes
the runs, with a launcher that records them without executing them (what is under test is how
they are cut and tagged). The CLI's `dg launch` runs for real, against SecantusDB and the
sandbox.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import dagster as dg
import pymongo
import pytest
from dagster._cli.job import execute_backfill_command
from dagster._cli.workspace.cli_target import WorkspaceOpts
from dagster._daemon.backfill import execute_backfill_iteration
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql
from fixtures.sandbox import TENANT_A, TEST_KEY_A

REPO = Path(__file__).resolve().parents[2]
HOURS = ["2026-11-30-06:00", "2026-11-30-07:00", "2026-11-30-08:00", "2026-11-30-09:00"]
RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")

LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""
STATUSES = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      isAssetBackfill
      partitionStatuses { results { partitionName runId runStatus } }
      assetBackfillData {
        assetBackfillStatuses {
          ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted }
        }
      }
    }
  }
}
"""


@pytest.fixture
def ui(monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith(("MONGO_", "CERTYO_"))]:
        monkeypatch.delenv(name)
    # Resolved when a run is created; nothing connects to them (runs are not executed).
    monkeypatch.setenv("MONGO_URI", "mongodb://127.0.0.1:9/")
    monkeypatch.setenv("CERTYO_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CERTYO_API_KEY", "unused-key")
    monkeypatch.setenv("CERTYO_TENANT_ID", "unused-tenant")
    monkeypatch.chdir(REPO)
    overrides = {
        "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}
    }
    with (
        dg.instance_for_test(overrides=overrides, temp_dir=str(tmp_path)) as instance,
        define_out_of_process_context(str(REPO / "workspace.yaml"), None, instance) as context,
    ):
        yield context


def _backfill(context, params: dict) -> tuple[str, list[dg.DagsterRun]]:
    result = execute_dagster_graphql(context, LAUNCH, {"params": params})
    launched = result.data["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]
    for _ in range(3):  # the daemon's loop, a few times over
        list(execute_backfill_iteration(context.process_context, logging.getLogger("backfill")))
    runs = context.instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    return backfill_id, runs


def _statuses(context, backfill_id: str) -> dict:
    result = execute_dagster_graphql(context, STATUSES, {"id": backfill_id})
    assert not result.errors, result.errors
    return result.data["partitionBackfillOrError"]


def test_a_job_backfill_from_the_ui_is_one_run_and_shows_every_hours_status(ui):
    backfill_id, runs = _backfill(
        ui,
        {
            "selector": {
                "partitionSetName": "ingest_products_partition_set",
                "repositorySelector": {
                    "repositoryLocationName": "certyo_dagster",
                    "repositoryName": "__repository__",
                },
            },
            "partitionNames": HOURS,
        },
    )
    (run,) = runs
    assert (run.tags[RANGE_TAGS[0]], run.tags[RANGE_TAGS[1]]) == (HOURS[0], HOURS[-1])
    statuses = _statuses(ui, backfill_id)["partitionStatuses"]["results"]
    assert {s["partitionName"]: s["runId"] for s in statuses} == dict.fromkeys(HOURS, run.run_id)


def test_an_asset_backfill_from_the_ui_is_one_run_and_shows_its_partitions(ui):
    keys = ["changed_documents", "certyo_records", "ingestion_receipts"]
    backfill_id, runs = _backfill(
        ui,
        {
            "assetSelection": [{"path": ["productdb", "products", k]} for k in keys],
            "partitionNames": HOURS,
        },
    )
    (run,) = runs
    assert (run.tags[RANGE_TAGS[0]], run.tags[RANGE_TAGS[1]]) == (HOURS[0], HOURS[-1])
    data = _statuses(ui, backfill_id)
    assert data["isAssetBackfill"]
    targeted = {
        "/".join(s["assetKey"]["path"]): s["numPartitionsTargeted"]
        for s in data["assetBackfillData"]["assetBackfillStatuses"]
    }
    assert targeted == {f"productdb/products/{k}": len(HOURS) for k in keys}


def test_dagster_job_backfill_makes_one_run_per_hour_so_the_readme_does_not_use_it(ui):
    # Dagster's `dagster job backfill` launches each partition on its own, whatever the
    # backfill policy, and the backfill page then expects range tags those runs do not have.
    execute_backfill_command(
        workspace_opts=WorkspaceOpts(workspace=(str(REPO / "workspace.yaml"),)),
        start_partition=HOURS[0],
        end_partition=HOURS[-1],
        noprompt=True,
        job_name="ingest_products",
        instance=ui.instance,
        print_fn=lambda *_: None,
    )
    (backfill,) = ui.instance.get_backfills()
    runs = ui.instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill.backfill_id}))
    assert sorted(r.tags["dagster/partition"] for r in runs) == HOURS
    assert not any(RANGE_TAGS[0] in r.tags for r in runs)
    # Its page: "Partition statuses unavailable", from this error in the webserver.
    with pytest.raises(KeyError, match="asset_partition_range_start"):
        execute_dagster_graphql(ui, STATUSES, {"id": backfill.backfill_id})


def test_dg_launch_of_a_range_is_one_run_and_every_hour_shows_as_materialized(
    secantus, sandbox, tmp_path
):
    """The README's CLI backfill, against real servers, with the force config it documents."""
    database = f"backfill_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(secantus.uri)
    versions = [datetime(2026, 11, 30, h, m) for h in (6, 8) for m in (1, 2)]
    client[database]["products"].insert_many(
        [{"_id": f"p{i}", "updatedAt": ts} for i, ts in enumerate(versions)]
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO_", "CERTYO_"))}
    env.update(
        MONGO_URI=secantus.uri,
        MONGO_DATABASE=database,
        CERTYO_BASE_URL=sandbox.base_url,
        CERTYO_API_KEY=TEST_KEY_A,
        CERTYO_TENANT_ID=TENANT_A,
        CERTYO_PARTITION_START="2026-11-30T00:00",
        DAGSTER_HOME=str(home),
    )
    dg_cli = str(Path(sys.executable).with_name("dg"))
    hours = f"{HOURS[0]}...{HOURS[-1]}"
    force = '{"ops": {"ingest_products_window": {"config": {"force": true}}}}'
    try:
        for extra in ([], ["--config-json", force]):
            result = subprocess.run(
                [dg_cli, "launch", "--job", "ingest_products", "--partition-range", hours, *extra],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        with dg.DagsterInstance.from_config(str(home)) as instance:
            runs = instance.get_runs(dg.RunsFilter(job_name="ingest_products"))
            assert len(runs) == 2, "one run per command"
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
            assert {(r.tags[RANGE_TAGS[0]], r.tags[RANGE_TAGS[1]]) for r in runs} == {
                (HOURS[0], HOURS[-1])
            }
            key = dg.AssetKey([database, "products", "ingestion_receipts"])
            assert instance.get_materialized_partitions(key) == set(HOURS)
            latest = instance.get_latest_materialization_event(key).asset_materialization
            # The second run, with force: true, sent every version again: Certyo replayed them.
            assert latest.metadata["replayed"].value == 4
    finally:
        client.drop_database(database)
        client.close()
