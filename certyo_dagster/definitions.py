"""The code location: `defs` for every collection named in the environment."""

from certyo_dagster.settings import PipelineSettings
from certyo_dagster.wiring import build_definitions

defs = build_definitions(PipelineSettings.from_env())
