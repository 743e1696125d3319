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
from typing import Any, Literal, get_args

DEFAULT_DATABASE = "productdb"
DEFAULT_COLLECTIONS = "products"
DEFAULT_TIMESTAMP_FIELD = "updatedAt"
# How a collection's changes are read (the component's `capture` attribute and
# CERTYO_CAPTURE): `polling` (time windows of the timestamp field), `change_stream` (MongoDB
# change streams) or `debezium` (Debezium's events from Kafka).
Capture = Literal["polling", "change_stream", "debezium"]
CAPTURE_MODES: tuple[str, ...] = get_args(Capture)
DEFAULT_CAPTURE: Capture = "polling"
DEFAULT_LOOKBACK_MINUTES = 5
DEFAULT_SCHEDULE_MINUTE = 5
DEFAULT_SENSOR_INTERVAL_SECONDS = 30
MIN_SENSOR_INTERVAL_SECONDS = 5
DEFAULT_OPEN_HOUR_INTERVAL_MINUTES = 5
DEFAULT_VERIFY_CRON = "*/2 * * * *"
DEFAULT_TAMPER_AUDIT_CRON = "30 3 * * *"
DEFAULT_VERIFY_MAX_DOCUMENTS = 10_000
DEFAULT_VERIFY_CONCURRENCY = 8
DEFAULT_VERIFY_DEADLINE_HOURS = 24

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ConfigError(ValueError):
    """A setting that cannot be used, with the variable and the reason."""


# A fixed default: a start that moved with the clock would drop the oldest hours from the
# partition set every day, and with them any version still waiting in them.
DEFAULT_PARTITION_START = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class CollectionSpec:
    """One watched MongoDB collection and everything that can be set for it.

    The defaults here are the only ones: `PipelineSettings.from_env` (CERTYO_* variables) and
    the `CertyoCollection` component (YAML attributes) both fall back to them.
    """

    database: str
    collection: str
    timestamp_field: str = DEFAULT_TIMESTAMP_FIELD
    capture: Capture = DEFAULT_CAPTURE
    partition_start: datetime = DEFAULT_PARTITION_START
    lookback_minutes: int = DEFAULT_LOOKBACK_MINUTES
    schedule_minute: int = DEFAULT_SCHEDULE_MINUTE
    sensor_interval_seconds: int = DEFAULT_SENSOR_INTERVAL_SECONDS
    # How often the sensor may request the hour still in progress again (closed hours are
    # requested as soon as they hold an unacknowledged version).
    open_hour_interval_minutes: int = DEFAULT_OPEN_HOUR_INTERVAL_MINUTES
    verify_cron: str = DEFAULT_VERIFY_CRON
    verify_max_documents: int = DEFAULT_VERIFY_MAX_DOCUMENTS
    verify_max_in_flight: int = DEFAULT_VERIFY_CONCURRENCY
    verify_deadline_hours: int = DEFAULT_VERIFY_DEADLINE_HOURS
    tamper_audit_cron: str = DEFAULT_TAMPER_AUDIT_CRON

    def __post_init__(self) -> None:
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
        if self.capture not in CAPTURE_MODES:
            raise ConfigError(
                f"capture {self.capture!r} of collection {self.collection!r} is not one of "
                f"{', '.join(CAPTURE_MODES)}"
            )
        start = self.partition_start
        if start.tzinfo is None or start.utcoffset() or start.minute or start.second:
            raise ConfigError(
                f"partition start {start.isoformat()} of collection {self.collection!r} must "
                "be a UTC hour"
            )
        if not 0 <= self.schedule_minute <= 59:
            raise ConfigError(
                f"schedule minute {self.schedule_minute} of collection {self.collection!r} "
                "must be between 0 and 59"
            )
        for name, value, minimum in (
            ("lookback_minutes", self.lookback_minutes, 0),
            ("sensor_interval_seconds", self.sensor_interval_seconds, MIN_SENSOR_INTERVAL_SECONDS),
            ("open_hour_interval_minutes", self.open_hour_interval_minutes, 0),
            ("verify_max_documents", self.verify_max_documents, 1),
            ("verify_max_in_flight", self.verify_max_in_flight, 1),
            ("verify_deadline_hours", self.verify_deadline_hours, 1),
        ):
            if value < minimum:
                raise ConfigError(
                    f"{name}={value} of collection {self.collection!r} must be at least {minimum}"
                )

    @property
    def cursor_id(self) -> str:
        """`_id` of this collection's row in `_certyo_cursors` (the reference poller's name)."""
        return f"poll_{self.collection}"

    @property
    def stream_cursor_id(self) -> str:
        """`_id` of this collection's change-stream position in `_certyo_cursors`."""
        return self.collection

    @property
    def is_change_stream(self) -> bool:
        return self.capture == "change_stream"


def parse_capture(value: str | None) -> Capture:
    """`CERTYO_CAPTURE`: polling (the default), change_stream or debezium."""
    raw = (value or "").strip().lower()
    if not raw:
        return DEFAULT_CAPTURE
    if raw not in CAPTURE_MODES:
        raise ConfigError(f"CERTYO_CAPTURE={value!r} must be one of {', '.join(CAPTURE_MODES)}")
    return raw  # type: ignore[return-value]


def parse_collections(value: str, database: str, **settings: Any) -> list[CollectionSpec]:
    """Parse `products,orders:modifiedAt` into specs sharing `settings`; names must be unique."""
    specs: list[CollectionSpec] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, _, ts_field = entry.partition(":")
        specs.append(
            CollectionSpec(
                database,
                name.strip(),
                ts_field.strip() or DEFAULT_TIMESTAMP_FIELD,
                **settings,
            )
        )
    if not specs:
        raise ConfigError("CERTYO_COLLECTIONS names no collection")
    check_unique(specs, "CERTYO_COLLECTIONS")
    return specs


def check_unique(specs: list[CollectionSpec], where: str) -> None:
    """Collection names become asset-key and job-name parts: each may appear once."""
    names = [s.collection for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where} names {', '.join(duplicates)} more than once")


def parse_partition_start(value: str | None, what: str = "CERTYO_PARTITION_START") -> datetime:
    """A UTC hour; DEFAULT_PARTITION_START when unset."""
    if not value:
        return DEFAULT_PARTITION_START
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(
            f"{what}={value!r} is not an ISO 8601 time such as 2026-01-01T00:00"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    parsed = parsed.astimezone(timezone.utc)
    if parsed.minute or parsed.second or parsed.microsecond:
        raise ConfigError(f"{what}={value!r} must be on the hour")
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


def collections_named_in(env: Mapping[str, str]) -> str:
    """The CERTYO_COLLECTIONS (or MONGO_COLLECTION) value, empty when neither is set."""
    return env.get("CERTYO_COLLECTIONS", "").strip() or env.get("MONGO_COLLECTION", "").strip()


@dataclass(frozen=True)
class PipelineSettings:
    """The watched collections, and what applies to the whole code location."""

    collections: list[CollectionSpec] = field(
        default_factory=lambda: [CollectionSpec(DEFAULT_DATABASE, DEFAULT_COLLECTIONS)]
    )
    # Sensors and schedules start RUNNING instead of STOPPED.
    demo_mode: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PipelineSettings:
        env = os.environ if env is None else env
        database = env.get("MONGO_DATABASE", "").strip() or DEFAULT_DATABASE
        minute = _int(env, "CERTYO_SCHEDULE_MINUTE", DEFAULT_SCHEDULE_MINUTE)
        if minute > 59:
            raise ConfigError(f"CERTYO_SCHEDULE_MINUTE={minute} must be between 0 and 59")
        shared = {
            "capture": parse_capture(env.get("CERTYO_CAPTURE")),
            "partition_start": parse_partition_start(env.get("CERTYO_PARTITION_START")),
            "lookback_minutes": _int(env, "CERTYO_LOOKBACK_MINUTES", DEFAULT_LOOKBACK_MINUTES),
            "schedule_minute": minute,
            "sensor_interval_seconds": _int(
                env,
                "CERTYO_SENSOR_INTERVAL_SECONDS",
                DEFAULT_SENSOR_INTERVAL_SECONDS,
                minimum=MIN_SENSOR_INTERVAL_SECONDS,
            ),
            "open_hour_interval_minutes": _int(
                env, "CERTYO_OPEN_HOUR_INTERVAL_MINUTES", DEFAULT_OPEN_HOUR_INTERVAL_MINUTES
            ),
            "verify_cron": env.get("CERTYO_VERIFY_CRON", "").strip() or DEFAULT_VERIFY_CRON,
            "tamper_audit_cron": env.get("CERTYO_TAMPER_AUDIT_CRON", "").strip()
            or DEFAULT_TAMPER_AUDIT_CRON,
            "verify_max_documents": _int(
                env, "CERTYO_VERIFY_MAX_DOCUMENTS", DEFAULT_VERIFY_MAX_DOCUMENTS, minimum=1
            ),
            "verify_max_in_flight": _int(
                env, "CERTYO_VERIFY_CONCURRENCY", DEFAULT_VERIFY_CONCURRENCY, minimum=1
            ),
            "verify_deadline_hours": _int(
                env, "CERTYO_VERIFY_DEADLINE_HOURS", DEFAULT_VERIFY_DEADLINE_HOURS, minimum=1
            ),
        }
        return cls(
            collections=parse_collections(
                collections_named_in(env) or DEFAULT_COLLECTIONS, database, **shared
            ),
            demo_mode=demo_mode_from_env(env),
        )


def demo_mode_from_env(env: Mapping[str, str]) -> bool:
    return env.get("CERTYO_DEMO_MODE", "").strip().lower() in {"1", "true", "yes"}
