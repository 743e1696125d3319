"""Run one ingestion of one partition in this process, and SIGKILL it at a chosen point.

    python tests/faults/crash_harness.py MONGO_URI DATABASE BASE_URL PARTITION_START \
        PARTITION_KEY POINT

The API key comes from CERTYO_API_KEY. The definitions are the ones users get
(`build_definitions`); only this script's process wraps the Certyo client and the write-back
function to die at POINT, so production code carries no test hooks:

- `after_post`: the first bulk POST was accepted by Certyo; nothing is written back yet.
- `after_write_back`: every accepted version is written back as pending, but the run never
  finishes, so no sensor tick moved the cursor over them.
- `mid_partition`: the second bulk POST is about to be sent while the first is in flight.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import datetime

import dagster as dg

from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship import ingest
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import MongoResource
from certyo_dagster.wiring import build_definitions

POINTS = ("after_post", "after_write_back", "mid_partition")
RUN_CONFIG = {"batch_size": 13, "max_in_flight": 2, "max_payload_bytes": 20_000}


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _DyingClient:
    def __init__(self, real, point: str):
        self._real = real
        self._point = point
        self._posts = 0
        self._lock = threading.Lock()

    def ingest_record(self, record):
        return self._real.ingest_record(record)

    def post_bulk_body(self, body, count):
        with self._lock:
            self._posts += 1
            posts = self._posts
        if self._point == "mid_partition" and posts == 2:
            _die()
        response = self._real.post_bulk_body(body, count)
        if self._point == "after_post":
            _die()
        return response


class DyingCertyoResource(CertyoResource):
    point: str = "none"

    def get_client(self):
        return _DyingClient(super().get_client(), self.point)


def main(argv: list[str]) -> int:
    mongo_uri, database, base_url, partition_start, partition_key, point = argv
    if point not in POINTS:
        raise SystemExit(f"POINT must be one of {', '.join(POINTS)}")
    if point == "after_write_back":
        real_run = ingest.WindowIngestor.run

        def run_then_die(self, start, end):
            real_run(self, start, end)
            _die()

        ingest.WindowIngestor.run = run_then_die
    settings = PipelineSettings(
        collections=[
            CollectionSpec(
                database, "products", partition_start=datetime.fromisoformat(partition_start)
            )
        ],
    )
    resources = {
        "mongo": MongoResource(uri=mongo_uri, database=database),
        "certyo": DyingCertyoResource(
            base_url=base_url,
            api_key=dg.EnvVar("CERTYO_API_KEY"),
            tenant_id=os.environ["CERTYO_TENANT_ID"],
            backoff_initial_seconds=0.01,
            backoff_max_seconds=0.05,
            point=point,
        ),
    }
    defs = build_definitions(settings, resources=resources)
    result = defs.resolve_job_def("ingest_products").execute_in_process(
        partition_key=partition_key,
        run_config={"ops": {"ingest_products_window": {"config": RUN_CONFIG}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    print(f"crash_harness: run finished without being killed, success={result.success}")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
