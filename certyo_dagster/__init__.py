"""certyo_dagster: make every change to a MongoDB collection provable with Certyo.

`certyo_dagster.CertyoCollection` is the Dagster Component for one collection. It is loaded on
first use, so importing a pure module such as `certyo_dagster.prove.hashing` does not import
Dagster.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["CertyoCollection"]


def __getattr__(name: str) -> Any:
    if name == "CertyoCollection":
        from certyo_dagster.components.collection import CertyoCollection

        return CertyoCollection
    raise AttributeError(f"module 'certyo_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
