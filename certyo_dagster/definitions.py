"""The code location: `defs` for every collection named in the environment."""

import dagster as dg

defs = dg.Definitions()
