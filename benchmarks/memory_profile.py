"""Memory of the real extract → ingest → write-back path over one partition.

`WindowIngestor` with the real `CertyoClient` streams one hourly partition into one
certyo-sandbox subprocess (SQLite file in a temp dir). By default the partition lives in one
SecantusDB server (loaded before the measurement starts), and every document is written back
into it; `--source generated` reads from an in-memory collection that decodes each document
from BSON as it is read instead (never holding the window). The RSS of this process (not the
sandbox's, not the server's) is read at 10%, 50% and 100% of the documents read, sampled
every 0.25 s in between, and its peak is VmHWM, reset before each run. The server's own peak
RSS is reported beside it.

    .venv/bin/python benchmarks/memory_profile.py --documents 1000000
    .venv/bin/python benchmarks/memory_profile.py --source generated --documents 1000000
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from _common import (
    LAZY_NOTE,
    PARTITION_KEY,
    SOURCE_NOTES,
    CatalogSource,
    GeneratedCollection,
    GeneratedDatabase,
    MongoSource,
    catalog_parser,
    check_written_back,
    file_sandbox,
    median,
    rss_mb,
    run_window,
    write_result,
)

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


def one_run(
    source: CatalogSource, run: int, in_flight: int, mongo: MongoSource | None = None
) -> dict[str, Any]:
    name = f"products_memory_{run}"
    marks = {round(source.count * m): m for m in MARKS}
    at_mark: dict[str, float] = {}
    samples: list[tuple[int, float]] = []

    def on_document(read: int) -> None:
        if read in marks:
            at_mark[f"{marks[read]:.0%}"] = rss_mb()

    if mongo is None:
        collection = GeneratedCollection(source, on_document=on_document)
        database: Any = GeneratedDatabase({name: collection})

        def documents_read() -> int:
            return collection.yielded

    else:
        real = mongo.load(source, name)
        database = mongo.database
        read_before = mongo.ops.documents_returned

        def documents_read() -> int:
            # Documents the driver received; the cursor hands them out one at a time.
            return mongo.ops.documents_returned - read_before

    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            read, rss = documents_read(), rss_mb()
            samples.append((read, rss))
            if mongo is not None:
                for count, mark in marks.items():
                    if read >= count:
                        at_mark.setdefault(f"{mark:.0%}", rss)

    with file_sandbox() as sandbox:
        start_rss = rss_mb()
        peak_reset = reset_peak_rss()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        report = run_window(
            database,
            name,
            sandbox.base_url,
            in_flight=in_flight,
            run_id="memory-profile",
            partition_key=PARTITION_KEY,
        )
        elapsed = time.perf_counter() - began
        stop.set()
        sampler.join()
        at_mark.setdefault("100%", rss_mb())
    peak = rss_mb("VmHWM")
    if report.accepted != source.count:
        raise SystemExit(f"{report.accepted} accepted of {source.count}")
    if mongo is None:
        if collection.log.updates != source.count:
            raise SystemExit(f"{collection.log.updates} written back of {source.count}")
    else:
        check_written_back(real, source.count, "memory profile")
        real.drop()
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
        "server_peak_rss_mb": mongo.rss_mb("VmHWM") if mongo is not None else None,
        "samples": samples[:: max(1, len(samples) // 60)],
    }
    server = f"; server peak {result['server_peak_rss_mb']:.0f} MB" if mongo is not None else ""
    print(
        f"  run {run + 1}: {source.count:,} documents in {elapsed:.0f} s "
        f"({source.count / elapsed:,.0f} docs/s); RSS at 10% {at_mark['10%']:.0f} MB, "
        f"50% {at_mark['50%']:.0f} MB, 100% {at_mark['100%']:.0f} MB; "
        f"peak {peak:.0f} MB{'' if peak_reset else ' (process lifetime)'}{server}",
        flush=True,
    )
    return result


def main() -> None:
    parser = catalog_parser(__doc__, documents=1_000_000, repeat=1)
    args = parser.parse_args()

    source = CatalogSource(args.documents, pool=args.pool)
    print(f"{args.documents:,} catalog documents in one partition ({source.pool_size:,} distinct)")
    notes = [SOURCE_NOTES[args.source]]
    if args.source == "generated":
        notes.append(LAZY_NOTE)
    for note in notes:
        print(f"note: {note}")
    with contextlib.ExitStack() as stack:
        mongo = stack.enter_context(MongoSource()) if args.source == "secantus" else None
        runs = [one_run(source, run, args.in_flight, mongo) for run in range(args.repeat)]
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
    if args.source == "secantus":
        server_peak = median([r["server_peak_rss_mb"] for r in runs])
        print(f"  SecantusDB server peak RSS {server_peak:.0f} MB (its own process, not counted)")
    path = write_result(
        "memory_profile",
        {
            "documents": args.documents,
            "distinct_products": source.pool_size,
            "in_flight": args.in_flight,
            "repeat": args.repeat,
            "source": args.source,
            "notes": notes,
            "median": medians,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
