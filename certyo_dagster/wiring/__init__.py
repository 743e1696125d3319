"""Dagster wiring: one set of assets, jobs, schedules, sensors and checks per collection.

`build_definitions` builds them for any list of collections, so tests and users can compose
them; `certyo_dagster.definitions` calls it with the settings read from the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.wiring.change_stream import build_change_stream_defs
from certyo_dagster.wiring.debezium import build_debezium_defs
from certyo_dagster.wiring.ingestion import build_ingestion_defs
from certyo_dagster.wiring.proofs import build_proof_defs
from certyo_dagster.wiring.resources import default_resources
from certyo_dagster.wiring.verification import build_verification_defs


def build_collection_definitions(
    spec: CollectionSpec, settings: PipelineSettings
) -> dg.Definitions:
    """Everything Dagster shows for one collection (no resources)."""
    # Proof bundles and the hourly count check read the polling receipts' hours.
    if spec.is_change_stream:
        return dg.Definitions.merge(
            build_change_stream_defs(spec, settings), build_verification_defs(spec, settings)
        )
    if spec.capture == "debezium":
        return dg.Definitions.merge(
            build_debezium_defs(spec, settings), build_verification_defs(spec, settings)
        )
    return dg.Definitions.merge(
        build_ingestion_defs(spec, settings),
        build_verification_defs(spec, settings),
        build_proof_defs(spec, settings),
    )


def build_definitions(
    settings: PipelineSettings, resources: Mapping[str, Any] | None = None
) -> dg.Definitions:
    """All collections' definitions plus the `mongo` and `certyo` resources."""
    per_collection = [build_collection_definitions(s, settings) for s in settings.collections]
    resources = dict(resources) if resources is not None else default_resources(settings)
    return dg.Definitions.merge(*per_collection, dg.Definitions(resources=resources))
