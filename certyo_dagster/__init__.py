"""certyo_dagster: make every change to a MongoDB collection provable with Certyo."""

__version__ = "0.1.0"
