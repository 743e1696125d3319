"""The `mongo` and `certyo` resources, configured from the environment.

Nothing here has a default that points anywhere: an unset CERTYO_BASE_URL or CERTYO_TENANT_ID
is reported by `CertyoResource` when a run first needs Certyo, so the code location still
loads (`dagster definitions validate`) without them.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from certyo_dagster.settings import PipelineSettings
from certyo_dagster.ship.resource import BASE_URL_ENV, TENANT_ID_ENV, CertyoResource
from certyo_dagster.source.mongo import MongoResource


def default_resources(settings: PipelineSettings) -> dict[str, Any]:
    database = settings.collections[0].database
    return {
        "mongo": MongoResource(uri=dg.EnvVar("MONGO_URI"), database=database),
        "certyo": CertyoResource(
            base_url=os.environ.get(BASE_URL_ENV, "").strip(),
            api_key=dg.EnvVar("CERTYO_API_KEY"),
            tenant_id=os.environ.get(TENANT_ID_ENV, "").strip(),
        ),
    }
