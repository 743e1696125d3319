"""Change-stream capture against its limits: one SecantusDB and one sandbox, one run.

The same N catalog documents are used in every phase, each phase on a collection of its own:

- watch: the raw `watch()` read rate of N insert events (a backlog read from a token taken
  before the inserts), pymongo only.
- sandbox: the records the stream would send, encoded into 1000-record bulk bodies before
  the clock starts, POSTed one at a time in order (how the stream ships) on a kept-alive
  session.
- write_back: N conditional `UpdateOne`s by `_id` in unordered bulks of 1000, pymongo only
  (the labels verification needs; the stream writes one per insert, update and replace).
- stream: `ChangeStreamCapture` draining the N events: map, ship, write back, save the token.
- keyset: the raw `_id`-ordered read of N documents, pymongo only.
- snapshot: `ChangeStreamCapture`'s first run over N existing documents.

The lower limit of a capture phase is the slowest of the parts it cannot avoid (read,
Certyo, write-back); the target is at least 0.7 of it. Memory: the peak of Python
allocations (tracemalloc) while draining N and 2N events must not grow with N.

`--latency-minutes M` instead measures, for M minutes at `--writes-per-second` inserts, the
time from each write to Certyo's acceptance (the write-back's `certyo_ingested_at`), with a
run every `--interval` seconds (the sensor's default, 30 s), and reports p50/p95.

    .venv/bin/python benchmarks/stream_throughput.py --documents 10000
    .venv/bin/python benchmarks/stream_throughput.py --latency-minutes 10
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import tracemalloc
from datetime import datetime, timezone
from itertools import islice

import orjson
import pymongo
import requests
from _common import API_KEY, TENANT, CatalogSource, file_sandbox, write_result
from pymongo import UpdateOne

from certyo_dagster.capture.change_events import map_event
from certyo_dagster.capture.change_stream import ChangeStreamCapture
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.client import CertyoClient
from certyo_demo.servers import SecantusServer

DATABASE = "streambench"
BULK = 1000
BULK_PATH = "/api/v1/records/bulk"


def spec(name: str) -> CollectionSpec:
    return CollectionSpec(DATABASE, name, capture="change_stream")


def insert(db, name: str, source: CatalogSource, start: int = 0) -> None:
    docs = (source.document(i) for i in range(start, start + source.count))
    while chunk := list(islice(docs, BULK)):
        db[name].insert_many(chunk, ordered=False)


def capture(db, name: str, client: CertyoClient, **options) -> ChangeStreamCapture:
    options.setdefault("max_seconds", 3600.0)
    options.setdefault("max_events", 10_000_000)
    return ChangeStreamCapture(
        database=db, spec=spec(name), client=client, tenant_id=TENANT, run_id="bench", **options
    )


def timed(fn) -> tuple[float, object]:
    began = time.perf_counter()
    value = fn()
    return time.perf_counter() - began, value


def phase_watch(db, source: CatalogSource) -> tuple[float, list[dict]]:
    with db["raw"].watch(max_await_time_ms=500, batch_size=BULK) as stream:
        token = stream.resume_token
    insert(db, "raw", source)
    events: list[dict] = []

    def read() -> None:
        with db["raw"].watch(resume_after=token, max_await_time_ms=500, batch_size=BULK) as stream:
            while len(events) < source.count:
                event = stream.try_next()
                if event is not None:
                    events.append(event)

    seconds, _ = timed(read)
    return source.count / seconds, events


def phase_sandbox(base_url: str, events: list[dict]) -> float:
    records = [map_event(e, spec("raw"), TENANT).json for e in events]
    prefix = b'{"tenantId":' + orjson.dumps(TENANT) + b',"records":['
    bodies = [
        prefix + b",".join(records[i : i + BULK]) + b"]}" for i in range(0, len(records), BULK)
    ]
    session = requests.Session()
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}

    def post() -> None:
        for body in bodies:
            response = session.post(base_url + BULK_PATH, data=body, headers=headers, timeout=60)
            if response.status_code != 202:
                raise SystemExit(f"sandbox: {response.status_code} {response.text[:300]}")

    seconds, _ = timed(post)
    return len(records) / seconds


def phase_write_back(db, source: CatalogSource) -> float:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    ids = [d["_id"] for d in db["raw"].find({}, {"_id": 1})]

    def write() -> None:
        for i in range(0, len(ids), BULK):
            db["raw"].bulk_write(
                [
                    UpdateOne(
                        {"_id": doc_id, "certyo_version": {"$not": {"$gte": "x"}}},
                        {"$set": {"certyo_status": "pending", "certyo_ingested_at": now}},
                    )
                    for doc_id in ids[i : i + BULK]
                ],
                ordered=False,
            )

    seconds, _ = timed(write)
    return len(ids) / seconds


def phase_stream(db, name: str, source: CatalogSource, client: CertyoClient) -> float:
    capture(db, name, client).run()  # the (empty) snapshot and the position
    insert(db, name, source)
    seconds, report = timed(lambda: capture(db, name, client).run())
    if report.accepted != source.count:
        raise SystemExit(f"stream: {report.accepted} of {source.count} accepted")
    return source.count / seconds


def phase_keyset(db, name: str) -> float:
    def read() -> int:
        with db[name].find({}).sort("_id", 1).batch_size(BULK) as cursor:
            return sum(1 for _ in cursor)

    seconds, count = timed(read)
    return count / seconds


def phase_snapshot(db, name: str, client: CertyoClient, count: int) -> float:
    seconds, report = timed(lambda: capture(db, name, client).run())
    if report.snapshot_read != count or not report.snapshot_complete:
        raise SystemExit(f"snapshot: read {report.snapshot_read} of {count}")
    return count / seconds


def peak_bytes(db, name: str, source: CatalogSource, client: CertyoClient, start: int) -> int:
    """Peak Python allocations while capture drains `source.count` new events (in as many
    runs as it takes: a run may end early on a slow server, never lose events)."""
    insert(db, name, source, start)
    tracemalloc.start()
    try:
        drained = 0
        for _ in range(20):
            drained += capture(db, name, client).run().events
            if drained >= source.count:
                break
        if drained != source.count:
            raise SystemExit(f"memory: drained {drained} of {source.count} events")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def throughput(args: argparse.Namespace) -> None:
    source = CatalogSource(args.documents, pool=min(args.pool, args.documents))
    with SecantusServer(cache_size="256M") as server, file_sandbox() as sandbox:
        db = pymongo.MongoClient(server.uri)[DATABASE]
        with CertyoClient(sandbox.base_url, API_KEY, TENANT, allow_insecure_http=True) as client:
            rates: dict[str, float] = {}
            rates["watch"], events = phase_watch(db, source)
            rates["sandbox"] = phase_sandbox(sandbox.base_url, events)
            del events
            rates["write_back"] = phase_write_back(db, source)
            rates["stream"] = phase_stream(db, "streamed", source, client)
            insert(db, "snap", source)
            rates["keyset"] = phase_keyset(db, "snap")
            rates["snapshot"] = phase_snapshot(db, "snap", client, source.count)
            half = CatalogSource(args.documents // 2, pool=min(args.pool, args.documents))
            memory = {}
            capture(db, "mem", client).run()
            memory["peak_bytes_n_half"] = peak_bytes(db, "mem", half, client, 0)
            memory["peak_bytes_n"] = peak_bytes(db, "mem", source, client, 10_000_000)
    stream_limit = min(rates["watch"], rates["sandbox"], rates["write_back"])
    snapshot_limit = min(rates["keyset"], rates["sandbox"], rates["write_back"])
    ratios = {
        "stream_vs_lower_limit": rates["stream"] / stream_limit,
        "snapshot_vs_lower_limit": rates["snapshot"] / snapshot_limit,
        "memory_n_vs_half": memory["peak_bytes_n"] / memory["peak_bytes_n_half"],
    }
    for name, rate in rates.items():
        print(f"  {name:>10}: {rate:9,.0f} per second")
    print(f"  stream ÷ min(watch, sandbox, write_back) = {ratios['stream_vs_lower_limit']:.2f}")
    print(
        f"  snapshot ÷ min(keyset, sandbox, write_back) = {ratios['snapshot_vs_lower_limit']:.2f}"
    )
    print(
        f"  peak Python memory: {memory['peak_bytes_n_half'] / 1e6:.1f} MB for N/2 events, "
        f"{memory['peak_bytes_n'] / 1e6:.1f} MB for N (ratio {ratios['memory_n_vs_half']:.2f})"
    )
    path = write_result(
        "stream_throughput",
        {"documents": args.documents, "rates": rates, "memory": memory, "ratios": ratios},
    )
    print(f"  result: {path}")


def latency_run(args: argparse.Namespace) -> None:
    """Writes at a steady rate; a capture run every `interval` s; write → acceptance times."""
    with SecantusServer(cache_size="256M") as server, file_sandbox() as sandbox:
        db = pymongo.MongoClient(server.uri)[DATABASE]
        with CertyoClient(sandbox.base_url, API_KEY, TENANT, allow_insecure_http=True) as client:
            capture(db, "live", client).run()
            stop = threading.Event()
            written = [0]

            def writer() -> None:
                period = 1.0 / args.writes_per_second
                writes = pymongo.MongoClient(server.uri)[DATABASE]["live"]
                next_at = time.monotonic()
                while not stop.is_set():
                    writes.insert_one({"n": written[0], "writtenAt": datetime.now(timezone.utc)})
                    written[0] += 1
                    next_at += period
                    time.sleep(max(0.0, next_at - time.monotonic()))

            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            ends = time.monotonic() + args.latency_minutes * 60
            runs = 0
            while time.monotonic() < ends:
                time.sleep(args.interval)
                capture(db, "live", client, max_events=10_000, max_seconds=60.0).run()
                runs += 1
            stop.set()
            thread.join()
            capture(db, "live", client).run()
            delays = sorted(
                (d["certyo_ingested_at"] - d["writtenAt"]).total_seconds()
                for d in db["live"].find({}, {"certyo_ingested_at": 1, "writtenAt": 1})
                if d.get("certyo_ingested_at")
            )
    p50 = statistics.median(delays)
    p95 = delays[int(0.95 * (len(delays) - 1))]
    rate = written[0] / (args.latency_minutes * 60)
    print(
        f"  {written[0]} writes ({rate:.0f}/s) over {args.latency_minutes} min, {runs} runs "
        f"every {args.interval} s: write → accepted p50 {p50:.1f} s, p95 {p95:.1f} s, "
        f"max {delays[-1]:.1f} s (target p95 ≤ 60 s)"
    )
    path = write_result(
        "stream_latency",
        {
            "minutes": args.latency_minutes,
            "writes": written[0],
            "writes_per_second": rate,
            "interval_seconds": args.interval,
            "runs": runs,
            "p50_seconds": p50,
            "p95_seconds": p95,
            "max_seconds": delays[-1],
        },
    )
    print(f"  result: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=10_000)
    parser.add_argument("--latency-minutes", type=float, default=0.0)
    parser.add_argument("--writes-per-second", type=float, default=200.0)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between runs")
    args = parser.parse_args()
    if args.latency_minutes:
        latency_run(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
