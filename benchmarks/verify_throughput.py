"""Verification throughput: pending documents verified per second, bounded concurrency vs one
call at a time (how the reference verification worker works), in the same run.

Both phases run the real `PendingVerifier` (select pending → verify call → re-hash and Merkle
proof check → conditional write-back) against one certyo-sandbox subprocess; only
`max_in_flight` differs. Documents are demo-catalog products, ingested first and anchored
(the sandbox flushes every 1000 records). The MongoDB side is one SecantusDB server
(`certyo_demo.servers.SecantusServer`, storage in a temp dir), whose cost is in both phases
alike.

Loopback has no network latency, which is what concurrency hides; `--latency-ms` (default
20, a typical round trip to a hosted API) makes the sandbox hold each verify response that
long after answering it, through its fault-injection `delay`. `--latency-ms 0` measures the
CPU-bound case.

    .venv/bin/python benchmarks/verify_throughput.py [--documents 2000] [--repeat 3]
        [--latency-ms 20]
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from _common import (
    API_KEY,
    TENANT,
    CatalogSource,
    MongoSource,
    Stopwatch,
    file_sandbox,
    latency,
    median,
    spec_for,
    write_result,
)

from certyo_dagster.sanitize.documents import version_ms
from certyo_dagster.sanitize.records import CertyoRecordEncoder
from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.shipping import Shipper
from certyo_dagster.verify.pending import PendingVerifier

PHASES = {"sequential (reference worker)": 1, "certyo_dagster (8 in flight)": 8}


def pending_collection(client: CertyoClient, mongo: MongoSource, name: str, count: int) -> Any:
    """`count` catalog documents, ingested into Certyo and marked pending as ingestion would."""
    spec = spec_for(name)
    source = CatalogSource(count)
    docs = [source.document(i) for i in range(count)]
    encoder = CertyoRecordEncoder(spec, TENANT)
    shipped = Shipper(client, TENANT).ship((encoder.encode(d), d) for d in docs)
    results = [receipt for batch in shipped for receipt in batch.receipts]
    now = datetime.utcnow()
    for doc, result in zip(docs, results, strict=True):
        doc.update(
            certyo_status="pending",
            certyo_record_hash=result["recordHash"],
            certyo_version=version_ms(doc[spec.timestamp_field]),
            certyo_ingested_at=now,
        )
    collection = mongo.database[name]
    collection.insert_many(docs)
    return spec, collection


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=2000, help="a multiple of 1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    if args.documents % 1000:
        parser.error("--documents must be a multiple of 1000 (the sandbox anchors per 1000)")

    runs: dict[str, list[float]] = {phase: [] for phase in PHASES}
    with file_sandbox(enable_fault_injection=True) as sandbox, MongoSource() as mongo:
        client = CertyoClient(sandbox.base_url, API_KEY, TENANT, pool_maxsize=16)
        for repeat in range(args.repeat):
            for phase, in_flight in PHASES.items():
                name = f"verify_r{repeat}_{in_flight}"
                spec, collection = pending_collection(client, mongo, name, args.documents)
                verifier = PendingVerifier(
                    collection=collection, spec=spec, client=client, max_in_flight=in_flight
                )
                latency(sandbox, "/api/v1/verify/record", args.latency_ms, args.documents)
                with Stopwatch() as watch:
                    report = verifier.run()
                if report.anchored != args.documents:
                    raise SystemExit(f"{phase}: only {report.anchored} anchored: {report}")
                runs[phase].append(args.documents / watch.wall)
                print(f"run {repeat + 1} {phase}: {args.documents / watch.wall:,.0f} docs/s")

    medians = {phase: median(values) for phase, values in runs.items()}
    sequential, concurrent = medians.values()
    print(
        f"\nverified and written back, medians of {args.repeat} runs, {args.documents} docs, "
        f"{args.latency_ms:g} ms simulated latency per verify call:"
    )
    for phase, value in medians.items():
        print(f"  {phase:32s} {value:8,.0f} docs/s")
    print(f"  ratio certyo_dagster / sequential: {concurrent / sequential:.2f}")
    print("  MongoDB side: one SecantusDB server, in both phases")
    path = write_result(
        "verify_throughput",
        {
            "documents": args.documents,
            "latency_ms": args.latency_ms,
            "runs_docs_per_second": runs,
            "median_docs_per_second": medians,
            "ratio_concurrent_over_sequential": concurrent / sequential,
        },
    )
    print(f"  result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
