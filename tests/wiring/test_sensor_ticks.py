"""How the change sensor paces the hour in progress, and how a failing tick reads."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from bson import ObjectId
from fixtures.pipeline import hour, pk

from certyo_dagster.capture.cursors import decode_position
from certyo_dagster.capture.polling import partition_key_for
from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import MongoResource, MongoUnavailableError
from certyo_dagster.wiring import build_definitions
from certyo_dagster.wiring.sensors import open_hour_on_hold
from certyo_demo.servers import free_port


def _doc(ts: datetime) -> dict:
    return {"_id": ObjectId(), "name": "widget", "updatedAt": ts}


def _now_with_time_left_in_the_hour() -> datetime:
    """Now, at least a minute before the hour ends (so "the hour in progress" stays one hour
    for the whole test)."""
    now = datetime.now(timezone.utc)
    if now.minute == 59:
        time.sleep(61 - now.second)
        now = datetime.now(timezone.utc)
    return now


def _add_run(instance: dg.DagsterInstance, partition_key: str) -> None:
    instance.add_run(
        dg.DagsterRun(
            job_name="ingest_products",
            run_id=str(uuid.uuid4()),
            status=dg.DagsterRunStatus.SUCCESS,
            tags={"dagster/partition": partition_key},
        )
    )


def test_the_hour_in_progress_is_requested_at_once_then_at_most_every_interval(pipeline):
    now = _now_with_time_left_in_the_hour()
    open_hour = partition_key_for(now)
    products = pipeline.db["products"]
    products.insert_many([_doc(hour(3, 10)), _doc(now.replace(tzinfo=None) - timedelta(seconds=1))])

    # The first change of a quiet hour is requested by the very next tick, like a closed hour.
    first = pipeline.tick()
    assert sorted(r.partition_key for r in first.run_requests) == [pk(3), open_hour]

    # The open hour's run has been made; another change arrives in that hour.
    _add_run(pipeline.instance, open_hour)
    second_change = now.replace(tzinfo=None)
    products.insert_one(_doc(second_change))
    held = pipeline.tick(cursor=first.cursor)
    # The closed hour is still requested at every tick; the open hour waits.
    assert [r.partition_key for r in held.run_requests] == [pk(3)]

    products.delete_many({"updatedAt": hour(3, 10)})
    only_open = pipeline.tick(cursor=held.cursor)
    assert not only_open.run_requests
    assert "at most every 5 min" in only_open.skip_message and open_hour in only_open.skip_message
    # Nothing is given up: the position stays before the versions still waiting.
    position = decode_position(only_open.cursor)
    assert position is None or position.ts < second_change


def test_the_hold_ends_after_the_interval_and_can_be_turned_off(pipeline):
    spec = pipeline.spec()
    now = _now_with_time_left_in_the_hour()
    _add_run(pipeline.instance, partition_key_for(now))
    held = open_hour_on_hold(pipeline.instance, "ingest_products", spec, now)
    assert held == {partition_key_for(now)}

    later = now + timedelta(minutes=spec.open_hour_interval_minutes, seconds=1)
    if partition_key_for(later) == partition_key_for(now):
        assert open_hour_on_hold(pipeline.instance, "ingest_products", spec, later) == set()
    off = CollectionSpec(spec.database, spec.collection, open_hour_interval_minutes=0)
    assert open_hour_on_hold(pipeline.instance, "ingest_products", off, now) == set()
    # Other hours are never held.
    other = CollectionSpec(spec.database, "orders")
    assert open_hour_on_hold(pipeline.instance, "ingest_orders", other, now) == set()


def _unreachable_mongo() -> tuple[MongoResource, str]:
    password = "s3cret-Passw0rd"
    port = free_port()  # nothing listens there
    uri = f"mongodb://certyo:{password}@127.0.0.1:{port}/?serverSelectionTimeoutMS=300"
    return MongoResource(uri=uri, database="productdb"), password


def _definitions(mongo: MongoResource) -> dg.Definitions:
    return build_definitions(
        PipelineSettings(collections=[CollectionSpec("productdb", "products")]),
        resources={
            "mongo": mongo,
            "certyo": CertyoResource(
                base_url="http://127.0.0.1:9", api_key="unused-key", tenant_id="t"
            ),
        },
    )


def _chain(error: BaseException | None) -> list[BaseException]:
    """The exceptions a traceback shows, outermost first."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def test_a_sensor_tick_against_an_unreachable_mongodb_fails_with_one_short_redacted_line():
    mongo, password = _unreachable_mongo()
    defs = _definitions(mongo)
    sensor = defs.resolve_sensor_def("products_change_sensor")
    with (
        dg.build_sensor_context(resources={"mongo": mongo}, definitions=defs) as context,
        pytest.raises(Exception) as raised,
    ):
        sensor.evaluate_tick(context)

    (error,) = [e for e in _chain(raised.value) if isinstance(e, MongoUnavailableError)]
    message = str(error)
    assert message.startswith("MongoDB at mongodb://certyo:***@127.0.0.1:")
    assert "ServerSelectionTimeoutError" in message and "Connection refused" in message
    assert "Topology Description" not in message and "configured timeouts" not in message
    assert len(message) < 300, message
    everything = "\n".join(str(e) for e in _chain(raised.value))
    assert password not in everything
    assert "Topology Description" not in everything  # pymongo's exception is not chained


def test_the_step_failure_reads_the_same():
    mongo, password = _unreachable_mongo()
    defs = _definitions(mongo)
    result = defs.resolve_job_def("verify_products").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("MongoDB at mongodb://certyo:***@127.0.0.1:")
    assert "Topology Description" not in description and password not in description
