"""Dagster wiring: one set of assets, jobs, schedules, sensors and checks per collection.

`build_definitions` builds them for any list of collections, so tests and users can compose
them; `certyo_dagster.definitions` calls it with the settings read from the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from certyo_dagster.defs.debezium import build_debezium_defs
from certyo_dagster.defs.ingestion import build_ingestion_defs
from certyo_dagster.defs.resources import default_resources
from certyo_dagster.defs.verification import build_verification_defs
from certyo_dagster.settings import CollectionSpec, PipelineSettings


def build_collection_definitions(
    spec: CollectionSpec, settings: PipelineSettings
) -> dg.Definitions:
    """Everything Dagster shows for one collection (no resources)."""
    if spec.capture == "debezium":
        capture = build_debezium_defs(spec, settings)
    else:
        capture = build_ingestion_defs(spec, settings)
    return dg.Definitions.merge(capture, build_verification_defs(spec, settings))


def build_definitions(
    settings: PipelineSettings, resources: Mapping[str, Any] | None = None
) -> dg.Definitions:
    """All collections' definitions plus the `mongo` and `certyo` (and `kafka`) resources."""
    per_collection = [build_collection_definitions(s, settings) for s in settings.collections]
    resources = dict(resources) if resources is not None else default_resources(settings)
    return dg.Definitions.merge(*per_collection, dg.Definitions(resources=resources))
