"""Documents per second from MongoDB into one certyo-sandbox: both limits, the naive poller, us.

One run starts one certyo-sandbox subprocess (SQLite file in a temp dir) and, by default, one
SecantusDB server holding N catalog documents (loaded before the clock starts), and moves the
same documents four ways:

- mongo_read: the raw pymongo read of the window, the query certyo_dagster sends (`updatedAt`
  range, sorted on `(updatedAt, _id)`, batches of 1000), decoded and dropped. The MongoDB-side
  limit.
- limit: the records certyo_dagster would send, encoded into 1000-record bulk bodies before
  the clock starts, POSTed by `--in-flight` threads on kept-alive sessions. The sandbox's
  acceptance limit.
- baseline: the reference poller's algorithm (top-level ObjectId/datetime mapping, stdlib
  json, `requests.post` without a session, one request at a time, 1000 records per call)
  without its 30 s sleep and 5000-document cap, so its best case. It writes nothing back.
- certyo_dagster: `WindowIngestor` with the real `CertyoClient` (extract → sanitize → map →
  encode → up to `--in-flight` bulk posts → in-order write-back into the same collection).
  It must write back every document, or the run fails.

Each phase ships under its own collection name, so none is served from idempotent replays,
and the phase order rotates between repeats. MongoDB operations are counted twice: by the
client (a pymongo `CommandListener`) and by the server (serverStatus opcounters).

`--source generated` reads from the in-memory stand-in instead (no mongo_read phase; the
write-backs are recorded, not stored): the client's cost with no database. `--latency-ms N`
holds every bulk response N ms after the sandbox answered it, for the round trip to a hosted
API that loopback lacks (default 0: the loopback figures).

    .venv/bin/python benchmarks/ingest_throughput.py --documents 20000 --repeat 3
    .venv/bin/python benchmarks/ingest_throughput.py --source generated --documents 100000
"""

from __future__ import annotations

import contextlib
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
    SOURCE_NOTES,
    TENANT,
    WINDOW_END,
    WINDOW_START,
    CatalogSource,
    GeneratedCollection,
    GeneratedDatabase,
    MongoSource,
    Stopwatch,
    catalog_parser,
    check_written_back,
    file_sandbox,
    latency,
    median,
    ops_between,
    process_cpu_seconds,
    run_window,
    spec_for,
    write_result,
)
from bson import Int64, ObjectId

from certyo_dagster.capture.polling import sort_keys, window_filter
from certyo_dagster.sanitize.records import to_certyo_record

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


def run_baseline(base_url: str, collection: Any, name: str) -> int:
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


# -- MongoDB-side limit ----------------------------------------------------------------------


def run_mongo_read(collection: Any, name: str) -> int:
    """The window query certyo_dagster sends, read to the end with plain pymongo."""
    spec = spec_for(name)
    cursor = collection.find(
        window_filter(spec, WINDOW_START, WINDOW_END), sort=sort_keys(spec)
    ).batch_size(BULK)
    return sum(1 for _ in cursor)


# -- certyo_dagster ---------------------------------------------------------------------------


def run_certyo_dagster(base_url: str, collection: Any, name: str, in_flight: int) -> int:
    """One window run; a real collection's write-back is checked after the clock stops."""
    generated = isinstance(collection, GeneratedCollection)
    database = GeneratedDatabase({name: collection}) if generated else collection.database
    report = run_window(database, name, base_url, in_flight=in_flight, run_id="benchmark")
    if report.dead_lettered:
        raise SystemExit(f"certyo_dagster: {report.dead_lettered} dead-lettered")
    if generated:
        log = collection.log
        if log.updates != report.accepted:
            raise SystemExit(f"certyo_dagster: {log.updates} of {report.accepted} written back")
        if log.out_of_order:
            raise SystemExit(f"certyo_dagster: {log.out_of_order} write-backs out of order")
    return report.accepted


# -- driver ------------------------------------------------------------------------------------


PHASES = {
    "secantus": ("mongo_read", "limit", "baseline", "certyo_dagster"),
    "generated": ("limit", "baseline", "certyo_dagster"),
}
TARGET_OVER_LOWER_LIMIT = 0.8
TIMES = ("docs_per_second", "seconds", "client_cpu_seconds", "server_cpu_seconds")


def one_run(
    source: CatalogSource,
    run: int,
    in_flight: int,
    latency_ms: float = 0.0,
    mongo: MongoSource | None = None,
) -> dict[str, dict[str, Any]]:
    phases_of_run = PHASES["generated" if mongo is None else "secantus"]
    shift = run % len(phases_of_run)
    order = phases_of_run[shift:] + phases_of_run[:shift]
    bodies = limit_bodies(source, f"products_limit_{run}")
    collection_name = f"products_{run}"
    real = mongo.load(source, collection_name) if mongo is not None else None
    phases: dict[str, dict[str, Any]] = {}
    with file_sandbox(enable_fault_injection=bool(latency_ms)) as sandbox:
        for phase in order:
            name = collection_name if phase == "certyo_dagster" else f"products_{phase}_{run}"
            collection = real if real is not None else GeneratedCollection(source)
            if latency_ms:
                latency(sandbox, BULK_PATH, latency_ms, len(bodies) + 10)
            if mongo is not None:
                ops_before, server_before = mongo.ops.snapshot(), mongo.opcounters()
                mongo_cpu = process_cpu_seconds(mongo.pid)
            with Stopwatch(sandbox.pid) as watch:
                if phase == "mongo_read":
                    count = run_mongo_read(collection, collection_name)
                elif phase == "limit":
                    count = run_limit(sandbox.base_url, bodies, in_flight)
                elif phase == "baseline":
                    count = run_baseline(sandbox.base_url, collection, name)
                else:
                    count = run_certyo_dagster(sandbox.base_url, collection, name, in_flight)
            if count != source.count:
                raise SystemExit(f"{phase}: {count} of {source.count} documents")
            row: dict[str, Any] = {
                "docs_per_second": count / watch.wall,
                "seconds": watch.wall,
                "client_cpu_seconds": watch.client_cpu,
                "server_cpu_seconds": watch.server_cpu,
            }
            mongo_note = ""
            if mongo is not None:
                row["mongo_cpu_seconds"] = process_cpu_seconds(mongo.pid) - mongo_cpu
                row["mongo_ops"] = ops_between(ops_before, mongo.ops.snapshot())
                row["mongo_server_opcounters"] = ops_between(server_before, mongo.opcounters())
                mongo_note = f", MongoDB {row['mongo_cpu_seconds']:5.1f} s"
            phases[phase] = row
            if phase == "certyo_dagster" and real is not None:
                check_written_back(real, source.count, phase)
            print(
                f"  run {run + 1} {phase:>14}: {count / watch.wall:9,.0f} docs/s "
                f"({watch.wall:5.1f} s; CPU client {watch.client_cpu:5.1f} s, "
                f"sandbox {watch.server_cpu:5.1f} s{mongo_note})",
                flush=True,
            )
    if real is not None:
        real.drop()
    return phases


def per_version(row: dict[str, Any], documents: int) -> dict[str, float]:
    """MongoDB operations per shipped version, as the client and the server counted them."""
    ops, server = row["mongo_ops"], row["mongo_server_opcounters"]
    return {
        "read_commands": ops["read_commands"] / documents,
        "write_commands": ops["write_commands"] / documents,
        "write_statements": ops["write_statements"] / documents,
        "server_reads": (server.get("query", 0) + server.get("getmore", 0)) / documents,
        "server_writes": (server.get("update", 0) + server.get("insert", 0)) / documents,
    }


def main() -> None:
    parser = catalog_parser(__doc__, documents=0, repeat=3)
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="simulated round trip per bulk call"
    )
    args = parser.parse_args()
    # A real server loads and writes back every document: a smaller default partition.
    args.documents = args.documents or (20_000 if args.source == "secantus" else 100_000)
    phases = PHASES[args.source]

    source = CatalogSource(args.documents, pool=args.pool)
    notes = [SOURCE_NOTES[args.source], BASELINE_NOTE]
    if args.source == "generated":
        source.preload()
        notes.insert(1, PRELOAD_NOTE)
    if args.latency_ms:
        print(f"note: every bulk response is held {args.latency_ms:g} ms (simulated latency)")
    print(f"{args.documents:,} catalog documents ({source.pool_size:,} distinct products)")
    for note in notes:
        print(f"note: {note}")
    runs = []
    with contextlib.ExitStack() as stack:
        mongo = stack.enter_context(MongoSource()) if args.source == "secantus" else None
        for run in range(args.repeat):
            runs.append(one_run(source, run, args.in_flight, args.latency_ms, mongo))
    medians: dict[str, Any] = {
        phase: {key: median([r[phase][key] for r in runs]) for key in TIMES} for phase in phases
    }
    limits = [p for p in ("mongo_read", "limit") if p in phases]
    ratios = {
        "certyo_dagster_over_lower_limit": median(
            [
                r["certyo_dagster"]["docs_per_second"]
                / min(r[p]["docs_per_second"] for p in limits)
                for r in runs
            ]
        ),
        "certyo_dagster_over_baseline": median(
            [
                r["certyo_dagster"]["docs_per_second"] / r["baseline"]["docs_per_second"]
                for r in runs
            ]
        ),
    }
    print(f"medians of {args.repeat} runs:")
    for phase in phases:
        m = medians[phase]
        per_cpu = []
        if phase != "mongo_read":
            per_cpu.append(f"{args.documents / m['server_cpu_seconds']:,.0f} per sandbox")
        if phase != "limit" and args.source == "secantus":
            mongo_cpu = median([r[phase]["mongo_cpu_seconds"] for r in runs])
            per_cpu.append(f"{args.documents / mongo_cpu:,.0f} per MongoDB")
        print(
            f"  {phase:>14}: {m['docs_per_second']:9,.0f} docs/s  "
            f"(docs per CPU-second: {', '.join(per_cpu)})"
        )
    print(
        f"  certyo_dagster / lower of {' and '.join(limits)}: "
        f"{ratios['certyo_dagster_over_lower_limit']:.2f}  (target >= {TARGET_OVER_LOWER_LIMIT})"
    )
    print(f"  certyo_dagster / baseline: {ratios['certyo_dagster_over_baseline']:.2f}")
    operations = None
    if args.source == "secantus":
        operations = {
            phase: {
                key: median([per_version(r[phase], args.documents)[key] for r in runs])
                for key in per_version(runs[0][phase], args.documents)
            }
            for phase in ("mongo_read", "baseline", "certyo_dagster")
        }
        mongo_cpu = {p: median([r[p]["mongo_cpu_seconds"] for r in runs]) for p in phases}
        ops = operations["certyo_dagster"]
        print(
            f"  MongoDB operations per shipped version (certyo_dagster): "
            f"{ops['read_commands']:.4f} read commands, {ops['write_commands']:.4f} write "
            f"commands holding {ops['write_statements']:.2f} update statements; server "
            f"opcounters {ops['server_reads']:.4f} reads, {ops['server_writes']:.4f} writes"
        )
        print(
            "  MongoDB server CPU per phase: "
            + ", ".join(f"{p} {mongo_cpu[p]:.1f} s" for p in phases)
        )
    path = write_result(
        "ingest_throughput",
        {
            "source": args.source,
            "documents": args.documents,
            "distinct_products": source.pool_size,
            "in_flight": args.in_flight,
            "latency_ms": args.latency_ms,
            "repeat": args.repeat,
            "notes": notes,
            "median": medians,
            "ratios": ratios,
            "mongo_operations_per_version": operations,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
