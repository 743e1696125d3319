"""The code location: `defs` for every collection named in the environment."""

from certyo_dagster.defs import build_definitions
from certyo_dagster.settings import PipelineSettings

defs = build_definitions(PipelineSettings.from_env())
