"""The `mongo`, `certyo` and (for capture: debezium) `kafka` resources, from the environment.

Nothing here has a default that points anywhere: an unset CERTYO_BASE_URL or CERTYO_TENANT_ID
is reported by `CertyoResource` when a run first needs Certyo, so the code location still
loads (`dagster definitions validate`) without them.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from certyo_dagster.settings import ConfigError, PipelineSettings
from certyo_dagster.ship.resource import BASE_URL_ENV, TENANT_ID_ENV, CertyoResource
from certyo_dagster.source.kafka import DEFAULT_TOPIC_PREFIX, KafkaResource
from certyo_dagster.source.mongo import MongoResource


def default_resources(settings: PipelineSettings) -> dict[str, Any]:
    database = settings.collections[0].database
    resources: dict[str, Any] = {
        "mongo": MongoResource(uri=dg.EnvVar("MONGO_URI"), database=database),
        "certyo": CertyoResource(
            base_url=os.environ.get(BASE_URL_ENV, "").strip(),
            api_key=dg.EnvVar("CERTYO_API_KEY"),
            tenant_id=os.environ.get(TENANT_ID_ENV, "").strip(),
        ),
    }
    if any(spec.capture == "debezium" for spec in settings.collections):
        resources["kafka"] = kafka_resource_from_env()
    return resources


def _optional(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def kafka_resource_from_env() -> KafkaResource:
    """The `kafka` resource: CERTYO_KAFKA_BOOTSTRAP_SERVERS (required) and CERTYO_KAFKA_*.

    The password is passed as an EnvVar, so Dagster keeps it out of the run's config.
    """
    if not _optional("CERTYO_KAFKA_BOOTSTRAP_SERVERS"):
        raise ConfigError(
            "CERTYO_KAFKA_BOOTSTRAP_SERVERS must name the Kafka brokers (host:port,...) "
            "when a collection uses capture: debezium"
        )
    return KafkaResource(
        bootstrap_servers=dg.EnvVar("CERTYO_KAFKA_BOOTSTRAP_SERVERS"),
        topic_prefix=_optional("CERTYO_KAFKA_TOPIC_PREFIX") or DEFAULT_TOPIC_PREFIX,
        group_id=_optional("CERTYO_KAFKA_GROUP_ID"),
        security_protocol=_optional("CERTYO_KAFKA_SECURITY_PROTOCOL"),
        sasl_mechanism=_optional("CERTYO_KAFKA_SASL_MECHANISM"),
        sasl_username=_optional("CERTYO_KAFKA_SASL_USERNAME"),
        sasl_password=(
            dg.EnvVar("CERTYO_KAFKA_SASL_PASSWORD")
            if _optional("CERTYO_KAFKA_SASL_PASSWORD")
            else None
        ),
        ssl_ca_location=_optional("CERTYO_KAFKA_SSL_CA_LOCATION"),
    )
