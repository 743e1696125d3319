"""Definitions for `dagster job execute -f tests/security/secrets_harness.py` in the security test.

The resources read MONGO_URI and CERTYO_API_KEY through EnvVar, as users configure them. With
HARNESS_MOCK_MONGO=1, every process that imports this file (the CLI and each step's
subprocess) answers `mongo.test:27017` with its own mongomock holding a few documents.
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

if os.environ.get("HARNESS_MOCK_MONGO") == "1":
    import sys

    import mongomock
    import pymongo

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fixtures.mongo  # noqa: F401  (the same mongomock shims as the in-process tests)

    mongomock.patch(servers=(("mongo.test", 27017),)).start()
    seeded = pymongo.MongoClient(os.environ["MONGO_URI"])["productdb"]["products"]
    seeded.insert_many(
        [{"_id": f"p{i}", "sku": f"SKU-{i}", "updatedAt": datetime(2026, 11, 1, 1, i)}
         for i in range(15)]
    )  # fmt: skip

defs = build_definitions(
    PipelineSettings(collections=[CollectionSpec("productdb", "products", partition_start=START)]),
    resources={
        "mongo": MongoResource(uri=dg.EnvVar("MONGO_URI"), database="productdb"),
        "certyo": CertyoResource(
            base_url=os.environ["CERTYO_BASE_URL"],
            api_key=dg.EnvVar("CERTYO_API_KEY"),
            tenant_id=os.environ["CERTYO_TENANT_ID"],
            backoff_initial_seconds=0.01,
            backoff_max_seconds=0.05,
        ),
    },
)
