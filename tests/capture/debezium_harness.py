"""Run debezium_products once in this process; optionally SIGKILL it at a chosen point.

    python tests/capture/debezium_harness.py MONGO_URI DATABASE BOOTSTRAP BASE_URL POINT \
        [--batch-size N] [--max-seconds S] [--slow-ms MS]

The definitions are the ones users get (`build_definitions`); only this process wraps the
Certyo client (and the write-back) to die at POINT, so the product carries no test hooks:

- `none`: run to the end and print the run's counts as JSON.
- `after_post`: the second bulk call was accepted by Certyo; nothing of it is written back or
  committed.
- `after_write_back`: the second batch is written back; its offsets are not committed.
- `before_post`: the third bulk call is about to be sent; two batches are done.
`--slow-ms` sleeps before each call to Certyo, so a run lasts long enough to overlap another.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import dagster as dg

from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship import debezium as ship_debezium
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.kafka import KafkaResource
from certyo_dagster.source.mongo import MongoResource
from certyo_dagster.wiring import build_definitions

POINTS = ("none", "after_post", "after_write_back", "before_post")


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Client:
    def __init__(self, real, point: str, slow: float):
        self._real, self._point, self._slow = real, point, slow
        self._posts = 0
        self._lock = threading.Lock()

    def _before(self) -> int:
        # Batches are shipped concurrently: number each call when it starts.
        with self._lock:
            self._posts += 1
            number = self._posts
        if self._slow:
            time.sleep(self._slow)
        if self._point == "before_post" and number == 3:
            _die()
        return number

    def ingest_record(self, record):
        self._before()
        return self._real.ingest_record(record)

    def post_bulk_body(self, body, count):
        number = self._before()
        response = self._real.post_bulk_body(body, count)
        if self._point == "after_post" and number == 2:
            _die()
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mongo_uri")
    parser.add_argument("database")
    parser.add_argument("bootstrap")
    parser.add_argument("base_url")
    parser.add_argument("point", choices=POINTS)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=30)
    parser.add_argument("--slow-ms", type=float, default=0)
    args = parser.parse_args()

    certyo = CertyoResource(
        base_url=args.base_url,
        api_key=os.environ["CERTYO_API_KEY"],
        tenant_id=os.environ["CERTYO_TENANT_ID"],
        backoff_initial_seconds=0.01,
        backoff_max_seconds=0.05,
        read_timeout=10.0,
    )
    real_get_client = CertyoResource.get_client
    CertyoResource.get_client = lambda self: _Client(  # type: ignore[method-assign]
        real_get_client(self), args.point, args.slow_ms / 1000
    )
    if args.point == "after_write_back":
        real_bulk_update = ship_debezium.bulk_update
        writes = {"n": 0}

        def bulk_update(collection, updates, what):
            result = real_bulk_update(collection, updates, what)
            writes["n"] += 1
            if writes["n"] == 2:
                _die()
            return result

        ship_debezium.bulk_update = bulk_update

    spec = CollectionSpec(args.database, "products", capture="debezium")
    resources = {
        "mongo": MongoResource(uri=args.mongo_uri, database=args.database),
        "certyo": certyo,
        "kafka": KafkaResource(bootstrap_servers=args.bootstrap),
    }
    defs = build_definitions(PipelineSettings(collections=[spec]), resources=resources)
    op = f"{args.database}__products__debezium_events"
    config = {"batch_size": args.batch_size, "max_seconds": args.max_seconds}
    result = defs.resolve_job_def("debezium_products").execute_in_process(
        run_config={"ops": {op: {"config": config}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    events = result.get_asset_materialization_events()
    counts = {k: v.value for k, v in events[0].materialization.metadata.items()} if events else {}
    print(json.dumps({"success": result.success, **counts}, default=str))


if __name__ == "__main__":
    main()
