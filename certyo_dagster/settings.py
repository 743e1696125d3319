"""What to watch: collection specs and the settings read from the environment.

Everything here is plain data, parsed once, so tests can build definitions for any list of
collections without touching the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, get_args

DEFAULT_DATABASE = "productdb"
DEFAULT_COLLECTIONS = "products"
DEFAULT_TIMESTAMP_FIELD = "updatedAt"
DEFAULT_LOOKBACK_MINUTES = 5

# How a collection's changes are read: `polling` (time windows of the timestamp field),
# `change_stream` (MongoDB change streams) or `debezium` (Debezium's events from Kafka).
Capture = Literal["polling", "change_stream", "debezium"]
CAPTURE_MODES: tuple[str, ...] = get_args(Capture)
DEFAULT_CAPTURE = "polling"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ConfigError(ValueError):
    """A setting that cannot be used, with the variable and the reason."""


@dataclass(frozen=True)
class CollectionSpec:
    """One watched MongoDB collection and the field that stamps each document version."""

    database: str
    collection: str
    timestamp_field: str = DEFAULT_TIMESTAMP_FIELD
    capture: Capture = DEFAULT_CAPTURE

    def __post_init__(self) -> None:
        if self.capture not in CAPTURE_MODES:
            raise ConfigError(
                f"capture {self.capture!r} of collection {self.collection!r} must be one of "
                f"{', '.join(CAPTURE_MODES)} (CERTYO_CAPTURE)"
            )
        for what, value in (("database", self.database), ("collection", self.collection)):
            if not _NAME.match(value or ""):
                raise ConfigError(
                    f"{what} name {value!r} must start with a letter or _ and contain only "
                    "letters, digits, _ and - (it becomes part of Dagster asset keys)"
                )
        if not _FIELD.match(self.timestamp_field or ""):
            raise ConfigError(
                f"timestamp field {self.timestamp_field!r} of collection {self.collection!r} "
                "is not a valid field path"
            )

    @property
    def cursor_id(self) -> str:
        """`_id` of this collection's row in `_certyo_cursors` (the reference poller's name)."""
        return f"poll_{self.collection}"


def parse_collections(
    value: str, database: str, capture: Capture = DEFAULT_CAPTURE
) -> list[CollectionSpec]:
    """Parse `products,orders:modifiedAt` into specs; names must be unique."""
    specs: list[CollectionSpec] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, _, ts_field = entry.partition(":")
        specs.append(
            CollectionSpec(
                database, name.strip(), ts_field.strip() or DEFAULT_TIMESTAMP_FIELD, capture
            )
        )
    if not specs:
        raise ConfigError("CERTYO_COLLECTIONS names no collection")
    names = [s.collection for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"CERTYO_COLLECTIONS names {', '.join(duplicates)} more than once")
    return specs


# A fixed default: a start that moved with the clock would drop the oldest hours from the
# partition set every day, and with them any version still waiting in them.
DEFAULT_PARTITION_START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def parse_partition_start(value: str | None) -> datetime:
    """A UTC hour; DEFAULT_PARTITION_START when unset."""
    if not value:
        return DEFAULT_PARTITION_START
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(
            f"CERTYO_PARTITION_START={value!r} is not an ISO 8601 time such as 2026-01-01T00:00"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    parsed = parsed.astimezone(timezone.utc)
    if parsed.minute or parsed.second or parsed.microsecond:
        raise ConfigError(f"CERTYO_PARTITION_START={value!r} must be on the hour")
    return parsed


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from exc
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class PipelineSettings:
    """Settings shared by every collection's definitions."""

    collections: list[CollectionSpec] = field(
        default_factory=lambda: [CollectionSpec(DEFAULT_DATABASE, DEFAULT_COLLECTIONS)]
    )
    partition_start: datetime = field(default_factory=lambda: parse_partition_start(None))
    lookback_minutes: int = DEFAULT_LOOKBACK_MINUTES
    schedule_minute: int = 5
    sensor_interval_seconds: int = 30
    verify_cron: str = "*/2 * * * *"
    tamper_audit_cron: str = "30 3 * * *"
    verify_max_documents: int = 10_000
    verify_max_in_flight: int = 8
    verify_deadline_hours: int = 24
    demo_mode: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PipelineSettings:
        env = os.environ if env is None else env
        database = env.get("MONGO_DATABASE", "").strip() or DEFAULT_DATABASE
        collections_value = (
            env.get("CERTYO_COLLECTIONS", "").strip()
            or env.get("MONGO_COLLECTION", "").strip()
            or DEFAULT_COLLECTIONS
        )
        minute = _int(env, "CERTYO_SCHEDULE_MINUTE", 5)
        if minute > 59:
            raise ConfigError(f"CERTYO_SCHEDULE_MINUTE={minute} must be between 0 and 59")
        capture = env.get("CERTYO_CAPTURE", "").strip().lower() or DEFAULT_CAPTURE
        if capture not in CAPTURE_MODES:
            raise ConfigError(
                f"CERTYO_CAPTURE={capture!r} must be one of {', '.join(CAPTURE_MODES)}"
            )
        return cls(
            collections=parse_collections(collections_value, database, capture),  # type: ignore[arg-type]
            partition_start=parse_partition_start(env.get("CERTYO_PARTITION_START")),
            lookback_minutes=_int(env, "CERTYO_LOOKBACK_MINUTES", DEFAULT_LOOKBACK_MINUTES),
            schedule_minute=minute,
            sensor_interval_seconds=_int(env, "CERTYO_SENSOR_INTERVAL_SECONDS", 30, minimum=5),
            verify_cron=env.get("CERTYO_VERIFY_CRON", "").strip() or "*/2 * * * *",
            tamper_audit_cron=env.get("CERTYO_TAMPER_AUDIT_CRON", "").strip() or "30 3 * * *",
            verify_max_documents=_int(env, "CERTYO_VERIFY_MAX_DOCUMENTS", 10_000, minimum=1),
            verify_max_in_flight=_int(env, "CERTYO_VERIFY_CONCURRENCY", 8, minimum=1),
            verify_deadline_hours=_int(env, "CERTYO_VERIFY_DEADLINE_HOURS", 24, minimum=1),
            demo_mode=env.get("CERTYO_DEMO_MODE", "").strip().lower() in {"1", "true", "yes"},
        )
