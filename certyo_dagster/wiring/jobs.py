"""Asset jobs resolved against their own assets, not the whole location's asset graph.

Dagster resolves every `define_asset_job` against the full asset graph of the code location,
and each resolution walks every asset definition: a location of N collections (3 asset jobs
each) spent N jobs × N assets when it loaded, the part that grew fastest with N. A job only
ever contains its selected assets, their checks and the definitions directly upstream of or
sharing an op with them (as unexecutable assets); that is all `get_asset_graph_for_job`
keeps of the full graph. `asset_job` builds the same job as `dg.define_asset_job`, but when
Dagster resolves it, it is handed just those definitions, taken from the location's graph.
Resolution stays lazy: a run worker that needs one job resolves only that one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.definitions.asset_selection import KeysAssetSelection
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)
from dagster_shared.record import as_dict


class OwnAssetsJob(UnresolvedAssetJobDefinition):
    """A `define_asset_job` job resolved against only the definitions it contains."""

    def resolve(
        self,
        asset_graph: Any,
        default_executor_def: dg.ExecutorDefinition | None = None,
        resource_defs: Mapping[str, dg.ResourceDefinition] | None = None,
    ) -> dg.JobDefinition:
        return super().resolve(
            asset_graph=job_neighbourhood(asset_graph, self.selection),
            default_executor_def=default_executor_def,
            resource_defs=resource_defs,
        )


def asset_job(name: str, keys: list[dg.AssetKey], **kwargs: Any) -> OwnAssetsJob:
    """`dg.define_asset_job(name, selection=keys, ...)`, resolved against its own assets."""
    job = dg.define_asset_job(name, selection=dg.AssetSelection.assets(*keys), **kwargs)
    return OwnAssetsJob(**as_dict(job))


def job_neighbourhood(graph: Any, selection: dg.AssetSelection) -> Any:
    """The part of `graph` a job of `selection` is built from; `graph` itself when unsure.

    That is the definitions of the selected assets and of the checks on them, plus every
    definition holding a key those read or produce, and the checks on those keys: everything
    `get_asset_graph_for_job` may take as executable or unexecutable. Definitions are taken
    as they are in `graph` (resources bound, dependencies resolved), so the job is the one
    Dagster would build from the whole graph.
    """
    if not isinstance(graph, AssetGraph) or not isinstance(selection, KeysAssetSelection):
        return graph
    selected = set(selection.selected_keys)
    if not all(graph.has(key) for key in selected):
        return graph  # Dagster names the missing keys
    own = {graph.assets_def_for_key(key) for key in selected}
    own.update(graph.assets_def_for_key(c) for key in selected for c in graph.get(key).check_keys)
    neighbours = {
        key
        for ad in own
        for key in (*ad.node_keys_by_input_name.values(), *ad.node_keys_by_output_name.values())
        if graph.has(key)
    }
    own.update(graph.assets_def_for_key(key) for key in neighbours)
    own.update(graph.assets_def_for_key(c) for key in neighbours for c in graph.get(key).check_keys)
    return AssetGraph.from_assets(list(own))
