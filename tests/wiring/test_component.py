"""The CertyoCollection component builds exactly what CERTYO_COLLECTIONS builds, and the two
ways of declaring collections combine as the README says."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import dagster as dg
import pytest

from certyo_dagster.definitions import build_location
from certyo_dagster.settings import ConfigError


def defs_package(root: Path, monkeypatch, yaml_by_folder: dict[str, str]) -> str:
    """A throwaway importable package whose `defs` folder holds the given component YAML."""
    name = f"shop_{uuid.uuid4().hex[:8]}"
    defs = root / name / "defs"
    defs.mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (defs / "__init__.py").write_text("")
    for folder, text in yaml_by_folder.items():
        (defs / folder).mkdir()
        (defs / folder / "defs.yaml").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    return f"{name}.defs"


def shape(defs: dg.Definitions) -> dict:
    """Everything `make run`, the UI and the CLI depend on, by name and value."""
    repo = defs.get_repository_def()
    graph = defs.resolve_asset_graph()
    jobs = [job for job in repo.get_all_jobs() if not job.name.startswith("__")]
    return {
        "assets": sorted(k.to_user_string() for k in graph.get_all_asset_keys()),
        "partitions": sorted(
            (key.to_user_string(), repr(graph.get(key).partitions_def))
            for key in graph.get_all_asset_keys()
        ),
        "checks": sorted(
            f"{key.asset_key.to_user_string()}:{key.name}" for key in graph.asset_check_keys
        ),
        "jobs": sorted((job.name, str(job.tags), str(job.run_config)) for job in jobs),
        "sensors": sorted(
            (
                s.name,
                tuple(sorted(target.job_name for target in s.targets)),
                s.minimum_interval_seconds,
                s.default_status.value,
                s.description,
            )
            for s in repo.sensor_defs
        ),
        "schedules": sorted(
            (
                s.name,
                s.job_name,
                s.cron_schedule,
                s.execution_timezone,
                s.default_status.value,
                s.description,
            )
            for s in repo.schedule_defs
        ),
        "resources": sorted(defs.resources or {}),
    }


SETTINGS_ENV = {
    "MONGO_DATABASE": "shop",
    "CERTYO_PARTITION_START": "2026-06-01T00:00",
    "CERTYO_LOOKBACK_MINUTES": "7",
    "CERTYO_SCHEDULE_MINUTE": "11",
    "CERTYO_SENSOR_INTERVAL_SECONDS": "45",
    "CERTYO_OPEN_HOUR_INTERVAL_MINUTES": "3",
    "CERTYO_VERIFY_CRON": "*/10 * * * *",
    "CERTYO_VERIFY_MAX_DOCUMENTS": "500",
    "CERTYO_VERIFY_CONCURRENCY": "3",
    "CERTYO_VERIFY_DEADLINE_HOURS": "6",
    "CERTYO_TAMPER_AUDIT_CRON": "15 2 * * *",
    "CERTYO_DEMO_MODE": "1",
}

ATTRIBUTES = """\
    database: shop
    partition_start: "2026-06-01T00:00"
    lookback_minutes: 7
    schedule_minute: 11
    sensor_interval_seconds: 45
    open_hour_interval_minutes: 3
    verify_cron: "*/10 * * * *"
    verify_max_documents: 500
    verify_max_in_flight: 3
    verify_deadline_hours: 6
    tamper_audit_cron: "15 2 * * *"
"""


def collection_yaml(collection: str, extra: str = "", attributes: str = ATTRIBUTES) -> str:
    return (
        "type: certyo_dagster.CertyoCollection\nattributes:\n"
        f"  collection: {collection}\n"
        + textwrap.indent(textwrap.dedent(attributes), "  ")
        + textwrap.indent(textwrap.dedent(extra), "  ")
    )


def test_yaml_components_build_the_same_definitions_as_certyo_collections(tmp_path, monkeypatch):
    # Demo mode belongs to the code location: components read it from the process environment.
    monkeypatch.setenv("CERTYO_DEMO_MODE", "1")
    from_env = build_location(
        {**SETTINGS_ENV, "CERTYO_COLLECTIONS": "products,orders:modifiedAt"},
        defs_module=defs_package(tmp_path / "a", monkeypatch, {}),
    )
    from_yaml = build_location(
        {"CERTYO_DEMO_MODE": "1"},
        defs_module=defs_package(
            tmp_path / "b",
            monkeypatch,
            {
                "products": collection_yaml("products"),
                "orders": collection_yaml("orders", "timestamp_field: modifiedAt\n"),
            },
        ),
    )
    expected = shape(from_env)
    assert shape(from_yaml) == expected
    # The comparison is about the names make run and users depend on, so pin a few.
    assert "shop/orders/ingestion_receipts" in expected["assets"]
    assert [s[:4] for s in expected["sensors"]][0] == (
        "orders_change_sensor",
        ("ingest_orders",),
        45,
        "RUNNING",
    )
    assert any(
        s[0] == "ingest_products_hourly" and s[2] == "11 * * * *" for s in expected["schedules"]
    )
    assert "shop/products/anchoring_status:no_failed_documents" in expected["checks"]
    assert expected["resources"] == ["certyo", "mongo"]


def test_the_default_yaml_equals_the_zero_configuration_environment(tmp_path, monkeypatch):
    minimal = "type: certyo_dagster.CertyoCollection\nattributes:\n  collection: products\n"
    from_yaml = build_location(
        {}, defs_module=defs_package(tmp_path, monkeypatch, {"products": minimal})
    )
    assert shape(from_yaml) == shape(build_location({}))


def test_environment_collections_join_the_yaml_ones_and_a_duplicate_is_refused(
    tmp_path, monkeypatch
):
    module = defs_package(tmp_path, monkeypatch, {"orders": collection_yaml("orders")})
    # With YAML present, the default `products` is not added: only what the env names.
    only_yaml = build_location({"MONGO_DATABASE": "shop"}, defs_module=module)
    assert {j.name for j in only_yaml.jobs} == {
        "ingest_orders",
        "verify_orders",
        "tamper_audit_orders",
    }

    both = build_location(
        {"MONGO_DATABASE": "shop", "CERTYO_COLLECTIONS": "products"}, defs_module=module
    )
    assert {"ingest_orders", "ingest_products"} <= {j.name for j in both.jobs}

    with pytest.raises(
        ConfigError, match="orders is declared in .* and named in CERTYO_COLLECTIONS"
    ):
        build_location(
            {"MONGO_DATABASE": "shop", "CERTYO_COLLECTIONS": "orders"}, defs_module=module
        )
    with pytest.raises(ConfigError, match="must share a database.*productdb, shop"):
        build_location({"CERTYO_COLLECTIONS": "products"}, defs_module=module)


def test_two_components_for_one_collection_are_refused(tmp_path, monkeypatch):
    module = defs_package(
        tmp_path,
        monkeypatch,
        {"a": collection_yaml("orders"), "b": collection_yaml("orders")},
    )
    with pytest.raises(ConfigError, match="names orders more than once"):
        build_location({}, defs_module=module)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("capture: cdc\n", "capture"),
        ('partition_start: "2026-06-01T00:30"\n', "on the hour"),
        ("collection_typo: 1\n", "collection_typo"),
    ],
)
def test_bad_yaml_is_a_clear_error(tmp_path, monkeypatch, extra, message):
    module = defs_package(
        tmp_path,
        monkeypatch,
        {"orders": collection_yaml("orders", extra, attributes="database: shop\n")},
    )
    with pytest.raises(Exception) as raised:
        build_location({}, defs_module=module)
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert message in "\n".join(chain)
