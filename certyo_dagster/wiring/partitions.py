"""Hourly UTC partitions, including the hour in progress."""

from __future__ import annotations

import dagster as dg

from certyo_dagster.capture.polling import HOUR_FORMAT
from certyo_dagster.settings import CollectionSpec


def hourly_partitions(spec: CollectionSpec) -> dg.HourlyPartitionsDefinition:
    # end_offset=1 makes the hour in progress a partition, so the sensor can request a run
    # for a change made a minute ago; that partition is re-materialized as changes arrive.
    return dg.HourlyPartitionsDefinition(
        start_date=spec.partition_start.strftime(HOUR_FORMAT),
        timezone="UTC",
        end_offset=1,
        fmt=HOUR_FORMAT,
    )
