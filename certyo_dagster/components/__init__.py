"""Dagster Components: collections declared in YAML under the `defs/` folder."""
