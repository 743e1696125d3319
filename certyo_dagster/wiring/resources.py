"""The `mongo` and `certyo` resources, configured from the environment through EnvVar."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from certyo_dagster.settings import PipelineSettings
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import MongoResource

SANDBOX_BASE_URL = "http://127.0.0.1:8080"
SANDBOX_TENANT_ID = "sandbox-tenant"


def default_resources(settings: PipelineSettings) -> dict[str, Any]:
    database = settings.collections[0].database
    return {
        "mongo": MongoResource(uri=dg.EnvVar("MONGO_URI"), database=database),
        "certyo": CertyoResource(
            base_url=os.environ.get("CERTYO_BASE_URL", "").strip() or SANDBOX_BASE_URL,
            api_key=dg.EnvVar("CERTYO_API_KEY"),
            tenant_id=os.environ.get("CERTYO_TENANT_ID", "").strip() or SANDBOX_TENANT_ID,
        ),
    }
