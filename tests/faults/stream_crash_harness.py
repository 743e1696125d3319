"""Run change-stream capture of one collection in this process and SIGKILL it at a chosen point.

    python tests/faults/stream_crash_harness.py MONGO_URI DATABASE BASE_URL POINT N

The API key comes from CERTYO_API_KEY. Only this script wraps the Certyo client, so the
product carries no test hooks:

- `after_post`: the N-th request to Certyo was accepted; nothing of it is written back and
  the position is not saved.
- `after_write_back`: the N-th batch was written back, but its position is not saved.
"""

from __future__ import annotations

import os
import signal
import sys

import pymongo

from certyo_dagster.capture import change_stream
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.client import CertyoClient

POINTS = ("after_post", "after_write_back")
BATCH = 7


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _DyingClient:
    def __init__(self, real: CertyoClient, point: str, n: int):
        self._real, self._point, self._n, self._calls = real, point, n, 0

    def _count(self) -> None:
        self._calls += 1
        if self._point == "after_post" and self._calls == self._n:
            _die()

    def ingest_record(self, record):
        result = self._real.ingest_record(record)
        self._count()
        return result

    def post_bulk_body(self, body, count):
        result = self._real.post_bulk_body(body, count)
        self._count()
        return result


def main(argv: list[str]) -> int:
    uri, database, base_url, point, n = argv
    if point not in POINTS:
        raise SystemExit(f"POINT must be one of {', '.join(POINTS)}")
    if point == "after_write_back":
        real = change_stream.ChangeStreamCapture._write_back
        calls = {"n": 0}

        def write_back_then_die(self, items, report):
            real(self, items, report)
            calls["n"] += 1
            if calls["n"] == int(n):
                _die()

        change_stream.ChangeStreamCapture._write_back = write_back_then_die
    client = CertyoClient(
        base_url,
        os.environ["CERTYO_API_KEY"],
        os.environ["CERTYO_TENANT_ID"],
        backoff_initial_seconds=0.01,
        backoff_max_seconds=0.05,
        allow_insecure_http=True,
    )
    db = pymongo.MongoClient(uri)[database]
    capture = change_stream.ChangeStreamCapture(
        database=db,
        spec=CollectionSpec(database, "items", capture="change_stream"),
        client=_DyingClient(client, point, int(n)),
        tenant_id=os.environ["CERTYO_TENANT_ID"],
        run_id="crash-harness",
        batch_size=BATCH,
        max_await_ms=200,
    )
    report = capture.run()
    print(f"stream_crash_harness: finished without being killed: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
