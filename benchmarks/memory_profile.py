"""Memory of the real extract → ingest path over one partition of a million documents.

`WindowIngestor` with the real `CertyoClient` streams one hourly partition from an in-memory
collection that decodes each document from BSON as it is read (never holding the window)
into one certyo-sandbox subprocess (SQLite file in a temp dir). The RSS of this process
(not the sandbox's) is read at 10%, 50% and 100% of the documents read, sampled every
0.25 s in between, and its peak is VmHWM, reset before each run.

    .venv/bin/python benchmarks/memory_profile.py --documents 1000000 --repeat 3
"""

from __future__ import annotations

import threading
import time
from typing import Any

from _common import (
    API_KEY,
    LAZY_NOTE,
    SOURCE_NOTE,
    TENANT,
    WINDOW_END,
    WINDOW_START,
    CatalogSource,
    GeneratedCollection,
    GeneratedDatabase,
    catalog_parser,
    file_sandbox,
    median,
    rss_mb,
    spec_for,
    write_result,
)

from certyo_dagster.sanitize.records import CertyoRecordEncoder
from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.ingest import WindowIngestor
from certyo_dagster.ship.shipping import Shipper

MARKS = (0.1, 0.5, 1.0)
TARGET_PEAK_MB = 300


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def one_run(source: CatalogSource, run: int, in_flight: int) -> dict[str, Any]:
    name = f"products_memory_{run}"
    marks = {round(source.count * m): m for m in MARKS}
    at_mark: dict[str, float] = {}
    samples: list[tuple[int, float]] = []
    collection: GeneratedCollection

    def on_document(read: int) -> None:
        if read in marks:
            at_mark[f"{marks[read]:.0%}"] = rss_mb()

    collection = GeneratedCollection(source, on_document=on_document)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            samples.append((collection.yielded, rss_mb()))

    with file_sandbox() as sandbox:
        start_rss = rss_mb()
        peak_reset = reset_peak_rss()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        with CertyoClient(sandbox.base_url, API_KEY, TENANT, pool_maxsize=in_flight) as client:
            report = WindowIngestor(
                database=GeneratedDatabase({name: collection}),
                encoder=CertyoRecordEncoder(spec_for(name), TENANT),
                shipper=Shipper(client, TENANT, max_in_flight=in_flight),
                run_id="memory-profile",
                partition_key="2026-04-01-00:00",
            ).run(WINDOW_START, WINDOW_END)
        elapsed = time.perf_counter() - began
        stop.set()
        sampler.join()
    peak = rss_mb("VmHWM")
    if report.accepted != source.count or collection.log.updates != source.count:
        raise SystemExit(
            f"{report.accepted} accepted and {collection.log.updates} written back "
            f"of {source.count}"
        )
    after_10 = [rss for read, rss in samples if read >= source.count * 0.1]
    result = {
        "seconds": elapsed,
        "docs_per_second": source.count / elapsed,
        "rss_mb_before": start_rss,
        "rss_mb_at": at_mark,
        "peak_rss_mb": peak,
        "peak_is_this_run": peak_reset,
        "max_sampled_rss_mb_after_10pct": max(after_10, default=float("nan")),
        "growth_mb_10_to_100pct": at_mark["100%"] - at_mark["10%"],
        "samples": samples[:: max(1, len(samples) // 60)],
    }
    print(
        f"  run {run + 1}: {source.count:,} documents in {elapsed:.0f} s "
        f"({source.count / elapsed:,.0f} docs/s); RSS at 10% {at_mark['10%']:.0f} MB, "
        f"50% {at_mark['50%']:.0f} MB, 100% {at_mark['100%']:.0f} MB; "
        f"peak {peak:.0f} MB{'' if peak_reset else ' (process lifetime)'}",
        flush=True,
    )
    return result


def main() -> None:
    parser = catalog_parser(__doc__, documents=1_000_000, repeat=1)
    args = parser.parse_args()

    source = CatalogSource(args.documents, pool=args.pool)
    print(f"{args.documents:,} catalog documents in one partition ({source.pool_size:,} distinct)")
    print(f"note: {SOURCE_NOTE}")
    print(f"note: {LAZY_NOTE}")
    runs = [one_run(source, run, args.in_flight) for run in range(args.repeat)]
    medians = {
        "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
        "rss_mb_at": {m: median([r["rss_mb_at"][m] for r in runs]) for m in runs[0]["rss_mb_at"]},
        "growth_mb_10_to_100pct": median([r["growth_mb_10_to_100pct"] for r in runs]),
        "docs_per_second": median([r["docs_per_second"] for r in runs]),
    }
    at = medians["rss_mb_at"]
    print(f"medians of {args.repeat} runs:")
    print(f"  RSS at 10% {at['10%']:.0f} MB, 50% {at['50%']:.0f} MB, 100% {at['100%']:.0f} MB")
    print(
        f"  growth 10% → 100%: {medians['growth_mb_10_to_100pct']:+.1f} MB; "
        f"peak {medians['peak_rss_mb']:.0f} MB (target <= {TARGET_PEAK_MB} MB, no upward trend)"
    )
    print(f"  {medians['docs_per_second']:,.0f} docs/s (includes BSON decoding of every document)")
    path = write_result(
        "memory_profile",
        {
            "documents": args.documents,
            "distinct_products": source.pool_size,
            "in_flight": args.in_flight,
            "repeat": args.repeat,
            "notes": [SOURCE_NOTE, LAZY_NOTE],
            "median": medians,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
