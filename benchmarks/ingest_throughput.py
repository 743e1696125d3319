"""Documents per second into one certyo-sandbox: the endpoint's limit, the naive poller, us.

One run starts one sandbox subprocess (SQLite file in a temp dir) and sends the same N
catalog documents three ways, each under its own collection name so no phase is served
from idempotent replays:

- limit: the records certyo_dagster would send, encoded into 1000-record bulk bodies before
  the clock starts, POSTed by `--in-flight` threads on kept-alive sessions. The ceiling.
- baseline: the reference poller's algorithm (top-level ObjectId/datetime mapping, stdlib
  json, `requests.post` without a session, one request at a time, 1000 records per call)
  without its 30 s sleep and 5000-document cap, so its best case.
- certyo_dagster: `WindowIngestor` and `Shipper` with the real `CertyoClient` (extract →
  sanitize → map → encode → up to `--in-flight` bulk posts → in-order write-back).

The phase order rotates between repeats, because the sandbox's database grows during a run.
`--latency-ms N` holds every bulk response N ms after the sandbox answered it, for the round
trip to a hosted API that loopback lacks (default 0: the loopback figures).

    .venv/bin/python benchmarks/ingest_throughput.py --documents 100000 --repeat 3
"""

from __future__ import annotations

import json
import queue
import threading
from datetime import datetime, timezone
from typing import Any

import orjson
import requests
from _common import (
    API_KEY,
    DATABASE,
    PRELOAD_NOTE,
    SOURCE_NOTE,
    TENANT,
    WINDOW_END,
    WINDOW_START,
    CatalogSource,
    GeneratedCollection,
    GeneratedDatabase,
    Stopwatch,
    catalog_parser,
    file_sandbox,
    latency,
    median,
    spec_for,
    write_result,
)
from bson import Int64, ObjectId

from certyo_dagster.sanitize.records import CertyoRecordEncoder, to_certyo_record
from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.ingest import WindowIngestor
from certyo_dagster.ship.shipping import Shipper

BULK = 1000
BULK_PATH = "/api/v1/records/bulk"
BASELINE_NOTE = (
    "baseline = the reference poller without its 30 s sleep and 5000-document cap. To be "
    "accepted at all it appends '+00:00' to its offset-less isoformat() sourceTimestamp, "
    "encodes with json.dumps(default=str) (the cheapest way to make Decimal128, Binary, "
    "DBRef and nested datetimes encodable: they become str()) and turns top-level Int64 into "
    "str (a JSON number past 2**53 is refused as not I-JSON). Its payloads are lossy."
)


# -- limit -----------------------------------------------------------------------------------


def limit_bodies(source: CatalogSource, collection: str) -> list[bytes]:
    """Our records for the same documents, encoded into bulk bodies before the clock."""
    spec = spec_for(collection)
    bodies = []
    records: list[dict] = []
    for doc in source:
        records.append(to_certyo_record(doc, spec, TENANT))
        if len(records) == BULK:
            bodies.append(orjson.dumps({"tenantId": TENANT, "records": records}))
            records = []
    if records:
        bodies.append(orjson.dumps({"tenantId": TENANT, "records": records}))
    return bodies


def run_limit(base_url: str, bodies: list[bytes], in_flight: int) -> int:
    """POST every body with `in_flight` threads, each on its own kept-alive connection."""
    todo: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    for body in bodies:
        todo.put(body)
    accepted = [0] * in_flight
    errors: list[str] = []

    def worker(slot: int) -> None:
        session = requests.Session()
        headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
        while not errors:
            try:
                body = todo.get_nowait()
            except queue.Empty:
                return
            response = session.post(base_url + BULK_PATH, data=body, headers=headers, timeout=60)
            if response.status_code != 202:
                errors.append(f"{response.status_code}: {response.text[:300]}")
                return
            accepted[slot] += orjson.loads(response.content)["accepted"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"limit: bulk call failed: {errors[0]}")
    return sum(accepted)


# -- baseline: the reference poller's algorithm -----------------------------------------------


def naive_record(doc: dict, collection: str) -> dict:
    doc_id = str(doc["_id"])
    payload = {}
    for key, value in doc.items():
        if isinstance(value, ObjectId):
            payload[key] = str(value)
        elif isinstance(value, datetime):
            payload[key] = value.isoformat()
        elif isinstance(value, Int64) or (type(value) is int and abs(value) > 2**53 - 1):
            payload[key] = str(value)  # not in the poller: a bigger JSON number is refused
        else:
            payload[key] = value
    updated_at = doc.get("updatedAt")
    return {
        "tenantId": TENANT,
        "database": DATABASE,
        "collection": collection,
        "recordId": doc_id,
        "recordVersion": "1",
        "operationType": "upsert",
        "recordPayload": payload,
        # The poller's isoformat() of a naive datetime has no offset; the API refuses that.
        "sourceTimestamp": updated_at.isoformat() + "+00:00"
        if isinstance(updated_at, datetime)
        else datetime.now(timezone.utc).isoformat(),
        "idempotencyKey": f"mongo-poll-{collection}-{doc_id}-"
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}",
    }


def run_baseline(base_url: str, collection: GeneratedCollection, name: str) -> int:
    """Poll cycles of 5000 documents: map them all, then post 1000 at a time, sequentially."""
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    accepted = 0
    cycle: list[dict] = []

    def flush() -> int:
        records = [naive_record(doc, name) for doc in cycle]
        done = 0
        for i in range(0, len(records), BULK):
            batch = records[i : i + BULK]
            body = json.dumps({"tenantId": TENANT, "records": batch}, default=str)
            resp = requests.post(base_url + BULK_PATH, headers=headers, data=body.encode())
            if not resp.ok:
                raise SystemExit(f"baseline: bulk failed: {resp.status_code} {resp.text[:300]}")
            done += resp.json()["accepted"]
        cycle.clear()
        return done

    for doc in collection.find({"updatedAt": {"$gte": WINDOW_START, "$lt": WINDOW_END}}).batch_size(
        1000
    ):
        cycle.append(doc)
        if len(cycle) == 5000:
            accepted += flush()
    if cycle:
        accepted += flush()
    return accepted


# -- certyo_dagster ---------------------------------------------------------------------------


def run_certyo_dagster(
    base_url: str, collection: GeneratedCollection, name: str, in_flight: int
) -> int:
    database = GeneratedDatabase({name: collection})
    with CertyoClient(base_url, API_KEY, TENANT, pool_maxsize=in_flight) as client:
        report = WindowIngestor(
            database=database,
            encoder=CertyoRecordEncoder(spec_for(name), TENANT),
            shipper=Shipper(client, TENANT, max_in_flight=in_flight),
            run_id="benchmark",
        ).run(WINDOW_START, WINDOW_END)
    log = collection.log
    if report.accepted != collection.source.count or log.updates != report.accepted:
        raise SystemExit(
            f"certyo_dagster: {report.accepted} accepted, {log.updates} written back, "
            f"{report.dead_lettered} dead-lettered of {collection.source.count}"
        )
    if log.out_of_order:
        raise SystemExit(f"certyo_dagster: {log.out_of_order} write-backs out of order")
    return report.accepted


# -- driver ------------------------------------------------------------------------------------


PHASES = ("limit", "baseline", "certyo_dagster")


def one_run(
    source: CatalogSource, run: int, in_flight: int, latency_ms: float = 0.0
) -> dict[str, dict[str, float]]:
    order = PHASES[run % 3 :] + PHASES[: run % 3]
    bodies = limit_bodies(source, f"products_limit_{run}")
    phases: dict[str, dict[str, float]] = {}
    with file_sandbox(enable_fault_injection=bool(latency_ms)) as sandbox:
        for phase in order:
            name = f"products_{phase}_{run}"
            collection = GeneratedCollection(source)
            if latency_ms:
                latency(sandbox, BULK_PATH, latency_ms, len(bodies) + 10)
            with Stopwatch(sandbox.pid) as watch:
                if phase == "limit":
                    count = run_limit(sandbox.base_url, bodies, in_flight)
                elif phase == "baseline":
                    count = run_baseline(sandbox.base_url, collection, name)
                else:
                    count = run_certyo_dagster(sandbox.base_url, collection, name, in_flight)
            if count != source.count:
                raise SystemExit(f"{phase}: {count} of {source.count} documents accepted")
            phases[phase] = {
                "docs_per_second": count / watch.wall,
                "seconds": watch.wall,
                "client_cpu_seconds": watch.client_cpu,
                "server_cpu_seconds": watch.server_cpu,
            }
            print(
                f"  run {run + 1} {phase:>14}: {count / watch.wall:9,.0f} docs/s "
                f"({watch.wall:5.1f} s; CPU client {watch.client_cpu:5.1f} s, "
                f"server {watch.server_cpu:5.1f} s)",
                flush=True,
            )
    return phases


def main() -> None:
    parser = catalog_parser(__doc__, documents=100_000, repeat=3)
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="simulated round trip per bulk call"
    )
    args = parser.parse_args()

    source = CatalogSource(args.documents, pool=args.pool)
    source.preload()
    if args.latency_ms:
        print(f"note: every bulk response is held {args.latency_ms:g} ms (simulated latency)")
    print(f"{args.documents:,} catalog documents ({source.pool_size:,} distinct products)")
    print(f"note: {SOURCE_NOTE}")
    print(f"note: {PRELOAD_NOTE}")
    print(f"note: {BASELINE_NOTE}")
    runs = []
    for run in range(args.repeat):
        runs.append(one_run(source, run, args.in_flight, args.latency_ms))
    medians: dict[str, Any] = {
        phase: {
            key: median([r[phase][key] for r in runs])
            for key in ("docs_per_second", "seconds", "client_cpu_seconds", "server_cpu_seconds")
        }
        for phase in PHASES
    }
    ratios = {
        "certyo_dagster_over_limit": median(
            [r["certyo_dagster"]["docs_per_second"] / r["limit"]["docs_per_second"] for r in runs]
        ),
        "certyo_dagster_over_baseline": median(
            [
                r["certyo_dagster"]["docs_per_second"] / r["baseline"]["docs_per_second"]
                for r in runs
            ]
        ),
    }
    print(f"medians of {args.repeat} runs:")
    for phase in PHASES:
        m = medians[phase]
        per_server_cpu = args.documents / m["server_cpu_seconds"]
        print(
            f"  {phase:>14}: {m['docs_per_second']:9,.0f} docs/s  "
            f"(server {per_server_cpu:,.0f} docs per server CPU-second)"
        )
    print(
        f"  certyo_dagster / limit:    {ratios['certyo_dagster_over_limit']:.2f}  (target >= 0.7)"
    )
    print(
        f"  certyo_dagster / baseline: {ratios['certyo_dagster_over_baseline']:.2f}  (target >= 3)"
    )
    path = write_result(
        "ingest_throughput",
        {
            "documents": args.documents,
            "distinct_products": source.pool_size,
            "in_flight": args.in_flight,
            "latency_ms": args.latency_ms,
            "repeat": args.repeat,
            "notes": [SOURCE_NOTE, PRELOAD_NOTE, BASELINE_NOTE],
            "median": medians,
            "ratios": ratios,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
