"""Debezium messages per CPU-second (one core, one thread): the per-message path of
debezium_<c> with and without its fast Extended JSON path, in the same run.

The messages are the envelopes `debezium_throughput.py` produces (Debezium MongoDB `c`
events, schemas off, of demo-catalog documents), built before timing; the heap is then
frozen (`gc.freeze()`) so that every row pays the same garbage-collection cost. CPU time of
this process is used, so other load on the machine matters less; each row reports the median
of `--repeat` passes.

- parse + encode: `encode_change(parse_message(key, value))`, what debezium_<c> spends per
  message before the network and the write-back;
- the same without the fast path: `after` read by `bson.json_util.loads` into BSON types and
  then sanitized, as every message was before the fast path (and as any message the fast
  path does not know still is);
- json_util.loads(after) and orjson.loads(after) alone: reference points.

    .venv/bin/python benchmarks/debezium_parse.py --documents 20000 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import orjson
from _common import TENANT, CatalogSource, median, per_cpu_second, write_result
from bson import json_util
from debezium_throughput import envelope, spec

from certyo_dagster.capture import debezium
from certyo_dagster.capture.debezium import JSON_OPTIONS, encode_change, parse_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5, help="passes; medians are reported")
    parser.add_argument("--pool", type=int, default=10_000, help="distinct generated products")
    args = parser.parse_args()

    source = CatalogSource(args.documents, pool=args.pool)
    messages = [envelope(doc, n) for n, doc in enumerate(source)]
    afters = [orjson.loads(value)["after"] for _key, value in messages]
    collection = spec()
    gc.collect()
    gc.freeze()

    def fast(message: tuple[bytes, bytes]) -> Any:
        return encode_change(parse_message(*message, collection), collection, TENANT)

    fast_after, ejson_loads = debezium.fast_after, debezium.ejson_loads

    def slow(message: tuple[bytes, bytes]) -> Any:
        debezium.fast_after = lambda *_args: None
        debezium.ejson_loads = lambda text: json_util.loads(text, json_options=JSON_OPTIONS)
        try:
            return encode_change(parse_message(*message, collection), collection, TENANT)
        finally:
            debezium.fast_after, debezium.ejson_loads = fast_after, ejson_loads

    # Both paths give the same record.
    for message in messages[:500]:
        assert fast(message).json == slow(message).json

    rows: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
        "parse + encode": (fast, messages),
        "parse + encode without the fast path": (slow, messages),
        "json_util.loads(after) alone": (
            lambda text: json_util.loads(text, json_options=JSON_OPTIONS),
            afters,
        ),
        "orjson.loads(after) alone": (orjson.loads, afters),
    }
    print(f"{args.documents:,} Debezium envelopes of catalog documents")
    results: dict[str, dict[str, Any]] = {}
    for label, (function, items) in rows.items():
        rates = [per_cpu_second(function, items) for _ in range(args.repeat)]
        rate = median(rates)
        results[label] = {"messages_per_cpu_second": rate, "us_per_message": 1e6 / rate}
        print(f"  {label:<40} {rate:10,.0f} msgs/s per core  ({1e6 / rate:6.1f} us/msg)")
    speedup = (
        results["parse + encode"]["messages_per_cpu_second"]
        / results["parse + encode without the fast path"]["messages_per_cpu_second"]
    )
    print(f"  fast path / without it: {speedup:.2f}x")
    path = write_result(
        "debezium_parse",
        {
            "documents": args.documents,
            "repeat": args.repeat,
            "median": results,
            "speedup_fast_over_slow": speedup,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
