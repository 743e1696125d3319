"""The code location: the collections declared in `defs/` and those named in the environment.

- No `CertyoCollection` in `certyo_dagster/defs/`: the collections come from
  CERTYO_COLLECTIONS (default `products`) with the CERTYO_* settings, as they always have.
- `CertyoCollection` components present: those, plus the collections CERTYO_COLLECTIONS (or
  MONGO_COLLECTION) names explicitly. A collection declared both ways is a configuration error.

Either way the `mongo` and `certyo` resources are configured from the environment.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from certyo_dagster.components.collection import CertyoCollection
from certyo_dagster.settings import (
    ConfigError,
    PipelineSettings,
    check_unique,
    collections_named_in,
)
from certyo_dagster.wiring import build_collection_definitions
from certyo_dagster.wiring.resources import default_resources

DEFS_MODULE = "certyo_dagster.defs"


def build_location(
    env: Mapping[str, str] | None = None, defs_module: str = DEFS_MODULE
) -> dg.Definitions:
    """Everything in the defs folder, the environment's collections, and the resources."""
    env = os.environ if env is None else env
    module = importlib.import_module(defs_module)
    folder = Path(module.__file__).parent
    tree = dg.ComponentTree.from_module(defs_module=module, project_root=folder.parent.parent)
    declared = [c.spec() for c in tree.get_all_components(CertyoCollection)]
    check_unique(declared, f"the CertyoCollection components in {folder}")

    settings = PipelineSettings.from_env(env)
    from_env = settings.collections if (collections_named_in(env) or not declared) else []
    both = sorted({s.collection for s in declared} & {s.collection for s in from_env})
    if both:
        raise ConfigError(
            f"collection {', '.join(both)} is declared in {folder} and named in "
            "CERTYO_COLLECTIONS; declare each collection once"
        )
    collections = declared + from_env
    databases = sorted({s.database for s in collections})
    if len(databases) > 1:
        raise ConfigError(
            f"collections of one code location must share a database (one `mongo` resource); "
            f"found {', '.join(databases)}"
        )
    everything = PipelineSettings(collections=collections, demo_mode=settings.demo_mode)
    with warnings.catch_warnings():
        # Loading Python files of a defs folder is marked preview; it is what dg does itself.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        folder_defs = tree.build_defs()
    return dg.Definitions.merge(
        folder_defs,
        *(build_collection_definitions(spec, settings) for spec in from_env),
        dg.Definitions(resources=default_resources(everything)),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_location()
