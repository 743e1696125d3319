"""The MongoDB collection itself: the external asset upstream of each collection's capture."""

from __future__ import annotations

import dagster as dg

from certyo_dagster.settings import CollectionSpec


def collection_source(spec: CollectionSpec, description: str) -> dg.AssetsDefinition:
    """`<db>/<c>` as an external asset with a definition of its own.

    Dagster turns bare `AssetSpec`s into one definition per partitions definition, shared by
    every collection of the location and not subsettable, so each capture job would carry all
    N collections' sources as upstream nodes: N jobs × N nodes to resolve when the location
    loads. Its own definition keeps each job to its own collection; what the UI shows is the
    same.
    """
    return dg.AssetsDefinition(
        specs=[
            dg.AssetSpec(
                dg.AssetKey([spec.database, spec.collection]),
                description=description,
                group_name=spec.collection,
                kinds={"mongodb"},
            )
        ]
    )
