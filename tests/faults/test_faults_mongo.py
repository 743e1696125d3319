"""Fault matrix, MongoDB side: the watched collection fails in the middle of extraction.

The `mongo` resource is swapped for one whose watched collection hands out cursors that die
after a few documents (the test's own wrapper around mongomock; the product is unchanged).
"""

from __future__ import annotations

from typing import Any

from fixtures.ledger import change_history, drive, reconfigured
from fixtures.mongo import WrappedDatabase
from fixtures.pipeline import hour
from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

from certyo_dagster.source.mongo import MongoResource

# The failures the next cursors raise, in order, after reading `after` documents each.
_plan: dict[str, Any] = {"failures": [], "after": 5, "raised": 0}


def _dying_documents(docs):
    """The next scripted failure, raised after `after` documents of this cursor."""
    failure = _plan["failures"].pop(0) if _plan["failures"] else None
    for n, doc in enumerate(docs):
        if failure is not None and n == _plan["after"]:
            _plan["raised"] += 1
            raise failure
        yield doc


class FlakyMongoResource(MongoResource):
    def get_database(self):
        return WrappedDatabase(super().get_database(), "products", _dying_documents)


def _message(result) -> str:
    return result.failure_data_for_node("ingest_products_window").error.message


def test_mongodb_failing_mid_extraction_resumes_or_fails_clearly_and_loses_nothing(
    pipeline, loss_ledger
):
    current = pipeline.resources["mongo"]
    flaky = reconfigured(pipeline, mongo=FlakyMongoResource(**current.model_dump()))
    history = change_history(hour(1))
    _plan.update(failures=[], after=7, raised=0)

    # Three AutoReconnects in one window scan: each resumes after the last key read.
    loss_ledger.apply(history[0])
    tick = flaky.tick()
    _plan["failures"] = [AutoReconnect("primary stepped down")] * 3
    result = flaky.materialize(tick.run_requests[0].partition_key, raise_on_error=False)
    assert result.success and _plan["raised"] == 3
    loss_ledger.seen([tick.run_requests[0].partition_key])

    # A fourth in the same scan is one too many: the run fails and names the cause.
    loss_ledger.apply(history[1])
    tick = flaky.tick(cursor=tick.cursor)
    _plan.update(failures=[AutoReconnect("primary stepped down")] * 4, after=3)
    result = flaky.materialize(tick.run_requests[0].partition_key, raise_on_error=False)
    assert not result.success
    assert "MongoDB failed: AutoReconnect: primary stepped down" in _message(result)
    assert loss_ledger.note_cursor() == 0

    # No server to select (an AutoReconnect too), persistently: the run fails, naming it.
    _plan["failures"] = [ServerSelectionTimeoutError("mongo.test:27017: timed out")] * 4
    result = flaky.materialize(tick.run_requests[0].partition_key, raise_on_error=False)
    assert not result.success
    assert "MongoDB failed: ServerSelectionTimeoutError: mongo.test:27017" in _message(result)
    assert loss_ledger.note_cursor() == 0

    # MongoDB is back: the retry finishes the window and the later steps.
    _plan["failures"] = []
    cursor, failed = drive(flaky, loss_ledger, tick.cursor)
    assert not failed
    loss_ledger.apply(history[2])
    cursor, failed = drive(flaky, loss_ledger, cursor)
    assert not failed

    counts = loss_ledger.check()
    counts.assert_clean("6 MongoDB fails mid-extraction")
