"""The code location: `defs` for every collection named in the environment."""

from certyo_dagster.config import PipelineSettings
from certyo_dagster.defs import build_definitions

defs = build_definitions(PipelineSettings.from_env())
