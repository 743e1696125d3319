"""The code location loads, and the environment is parsed into clear settings or clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from certyo_dagster.settings import CollectionSpec, ConfigError, PipelineSettings

REPO = Path(__file__).resolve().parents[2]


def test_dagster_definitions_validate_passes_for_the_workspace(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO_", "CERTYO_"))}
    env["DAGSTER_HOME"] = str(tmp_path)
    env["CERTYO_COLLECTIONS"] = "products,orders:modifiedAt"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
         "workspace.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_collections_list_with_timestamp_fields():
    settings = PipelineSettings.from_env(
        {"MONGO_DATABASE": "shop", "CERTYO_COLLECTIONS": "products, orders:meta.modifiedAt"}
    )
    assert settings.collections == [
        CollectionSpec("shop", "products", "updatedAt"),
        CollectionSpec("shop", "orders", "meta.modifiedAt"),
    ]


def test_mongo_collection_is_accepted_like_the_reference_poller():
    settings = PipelineSettings.from_env({"MONGO_COLLECTION": "items"})
    assert [s.collection for s in settings.collections] == ["items"]
    assert settings.collections[0].database == "productdb"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CERTYO_COLLECTIONS": "products,products"}, "more than once"),
        ({"CERTYO_COLLECTIONS": "bad name"}, "collection name 'bad name'"),
        ({"CERTYO_COLLECTIONS": "orders:1field"}, "timestamp field '1field'"),
        ({"CERTYO_PARTITION_START": "yesterday"}, "CERTYO_PARTITION_START='yesterday'"),
        ({"CERTYO_PARTITION_START": "2026-01-01T00:30"}, "on the hour"),
        ({"CERTYO_LOOKBACK_MINUTES": "five"}, "CERTYO_LOOKBACK_MINUTES='five' is not a whole"),
        ({"CERTYO_SCHEDULE_MINUTE": "75"}, "between 0 and 59"),
        ({"CERTYO_SENSOR_INTERVAL_SECONDS": "1"}, "at least 5"),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        PipelineSettings.from_env(env)


def test_partition_start_is_a_utc_hour():
    settings = PipelineSettings.from_env({"CERTYO_PARTITION_START": "2026-03-01T05:00+02:00"})
    assert settings.collections[0].partition_start == datetime(2026, 3, 1, 3, tzinfo=timezone.utc)


def test_every_step_that_calls_certyo_is_in_the_certyo_pool_limited_by_dagster_yaml(tmp_path):
    import shutil

    import dagster as dg

    from certyo_dagster.wiring import build_definitions

    defs = build_definitions(PipelineSettings.from_env({}))
    pools = {
        node.name: node.pool
        for job in ("ingest_products", "verify_products")
        for node in defs.resolve_job_def(job).graph.node_defs
    }
    assert pools and set(pools.values()) == {"certyo"}, pools

    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    config = instance.get_concurrency_config()
    assert config.pool_config.default_pool_limit == 2
    assert config.run_queue_config.max_concurrent_runs == 4
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 2


def test_the_default_partition_start_is_fixed_not_moving_with_the_clock():
    first = PipelineSettings.from_env({}).collections[0].partition_start
    assert first == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert PipelineSettings.from_env({}).collections[0].partition_start == first


@pytest.mark.parametrize(
    ("unset", "job"),
    [
        ("CERTYO_BASE_URL", "ingest_products"),
        ("CERTYO_TENANT_ID", "ingest_products"),
        ("CERTYO_BASE_URL", "verify_products"),
    ],
)
def test_without_a_certyo_url_or_tenant_the_code_loads_and_a_run_fails_in_one_line(
    mongo, monkeypatch, unset, job
):
    import dagster as dg

    from certyo_dagster.wiring import build_definitions

    configured = {
        "MONGO_URI": mongo.uri,
        "CERTYO_API_KEY": "cty_sandbox_test_key_a",
        "CERTYO_BASE_URL": "http://127.0.0.1:9",
        "CERTYO_TENANT_ID": "tenant-a",
    }
    for name, value in configured.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(unset)
    defs = build_definitions(PipelineSettings.from_env({"MONGO_DATABASE": mongo.database}))
    partition = {"partition_key": "2026-01-01-00:00"} if job.startswith("ingest") else {}

    result = defs.resolve_job_def(job).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False, **partition
    )

    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    assert (error.cls_name, error.cause) == ("Failure", None)  # no chained traceback
    prefix, description = error.message.strip().split(": ", 1)
    assert prefix.endswith("Failure")
    assert description.startswith(f"{unset} is not set: set it to")
    assert "\n" not in description
