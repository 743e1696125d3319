"""capture: debezium settings and the `kafka` resource, without servers."""

from __future__ import annotations

import pytest

from certyo_dagster.settings import CollectionSpec, ConfigError, PipelineSettings
from certyo_dagster.source.kafka import CONSUMER_SETTINGS, KafkaResource
from certyo_dagster.wiring import build_definitions
from certyo_dagster.wiring.resources import default_resources


def test_capture_debezium_is_read_from_the_environment_and_checked():
    settings = PipelineSettings.from_env({"CERTYO_CAPTURE": "debezium"})
    assert [s.capture for s in settings.collections] == ["debezium"]
    assert PipelineSettings.from_env({}).collections[0].capture == "polling"
    with pytest.raises(ConfigError, match="CERTYO_CAPTURE='kafka' must be one of"):
        PipelineSettings.from_env({"CERTYO_CAPTURE": "kafka"})
    with pytest.raises(ConfigError, match="capture 'cdc' of collection 'products'"):
        CollectionSpec("productdb", "products", capture="cdc")  # type: ignore[arg-type]


def test_debezium_definitions_have_the_contract_names():
    spec = CollectionSpec("productdb", "products", capture="debezium")
    settings = PipelineSettings(collections=[spec])
    resources = {
        **default_resources(PipelineSettings()),
        "kafka": KafkaResource(bootstrap_servers="127.0.0.1:1"),
    }
    defs = build_definitions(settings, resources=resources)
    repo = defs.get_repository_def()
    assert {j.name for j in repo.get_all_jobs()} >= {
        "debezium_products",
        "verify_products",
        "tamper_audit_products",
    }
    assert "ingest_products" not in {j.name for j in repo.get_all_jobs()}
    assert [s.name for s in repo.sensor_defs] == ["products_debezium_sensor"]
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"productdb/products/debezium_events", "productdb/products/anchoring_status"} <= keys
    config = defs.resolve_job_def("debezium_products").run_config_schema
    fields = config.config_type.fields["ops"].config_type.fields
    op_config = fields["productdb__products__debezium_events"].config_type.fields["config"]
    defaults = {name: field.default_value for name, field in op_config.config_type.fields.items()}
    assert defaults["max_messages"] == 10_000 and defaults["max_seconds"] == 60


def test_the_kafka_resource_comes_from_the_environment_with_the_password_as_a_secret(
    monkeypatch,
):
    monkeypatch.setenv("CERTYO_CAPTURE", "debezium")
    for name in ("CERTYO_KAFKA_BOOTSTRAP_SERVERS", "CERTYO_KAFKA_SASL_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    settings = PipelineSettings.from_env()
    with pytest.raises(ConfigError, match="CERTYO_KAFKA_BOOTSTRAP_SERVERS"):
        default_resources(settings)
    monkeypatch.setenv("CERTYO_KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("CERTYO_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CERTYO_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("CERTYO_KAFKA_SASL_USERNAME", "certyo")
    monkeypatch.setenv("CERTYO_KAFKA_SASL_PASSWORD", "pw-s3cret-kafka")
    kafka = default_resources(settings)["kafka"]
    assert isinstance(kafka, KafkaResource)
    assert kafka.topic_prefix == "certyo"
    resolved = KafkaResource(
        bootstrap_servers="k1:9092,k2:9092",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="certyo",
        sasl_password="pw-s3cret-kafka",
    )
    spec = settings.collections[0]
    config = resolved.consumer_config(spec)
    assert config["sasl.password"] == "pw-s3cret-kafka"
    assert config["group.id"] == "certyo-dagster-products"
    assert config["enable.auto.commit"] is False and CONSUMER_SETTINGS["enable.partition.eof"]
    assert resolved.topic_for(spec) == "certyo.productdb.products"
    assert "pw-s3cret-kafka" not in resolved.describe()
    assert "pw-s3cret-kafka" not in resolved.redact("auth failed for pw-s3cret-kafka")
