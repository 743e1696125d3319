"""Definitions for `dagster job execute -f tests/security/secrets_harness.py` in the security test.

The resources read MONGO_URI and CERTYO_API_KEY through EnvVar, as users configure them; the
database is MONGO_DATABASE, the test's own on a MongoDB server that requires authentication.
"""

from __future__ import annotations

import os
from datetime import datetime

import dagster as dg

from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import MongoResource
from certyo_dagster.wiring import build_definitions

START = datetime.fromisoformat("2026-11-01T00:00:00+00:00")
DATABASE = os.environ["MONGO_DATABASE"]

defs = build_definitions(
    PipelineSettings(collections=[CollectionSpec(DATABASE, "products", partition_start=START)]),
    resources={
        "mongo": MongoResource(uri=dg.EnvVar("MONGO_URI"), database=DATABASE),
        "certyo": CertyoResource(
            base_url=os.environ["CERTYO_BASE_URL"],
            api_key=dg.EnvVar("CERTYO_API_KEY"),
            tenant_id=os.environ["CERTYO_TENANT_ID"],
            backoff_initial_seconds=0.01,
            backoff_max_seconds=0.05,
        ),
    },
)
