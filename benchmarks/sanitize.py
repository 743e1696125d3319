"""Documents per CPU-second (one core, one thread) for sanitize + hash and reference encoders.

All rows run over the same catalog documents, decoded from BSON before timing. CPU time of
this process (not wall time) is used, so other load on the machine matters less; each row
reports the median of `--repeat` passes.

- sanitize + hash: `record_hash(sanitize_document(doc))`, what the verify job and the
  sandbox's recordHash cost per document version.
- certyo_dagster encode: `CertyoRecordEncoder.encode(doc)`, the whole per-document cost of
  the ingest path before the network (sanitize, envelope, JSON; no hash).
- orjson.dumps(doc, default=str): the fastest JSON encoder. orjson has no form for
  Decimal128, ObjectId, DBRef or bytes/Binary, so `default=str` turns them into str() (lossy
  for Binary: a Python bytes repr). A physical reference point, not a valid record.
- bson.json_util.dumps(doc): pymongo's Extended JSON (relaxed), which knows every BSON type.
- bson.decode: what a pymongo cursor spends per document before anything of ours runs.

    .venv/bin/python benchmarks/sanitize.py --documents 20000 --repeat 3
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import bson
import orjson
from _common import TENANT, CatalogSource, median, per_cpu_second, spec_for, write_result
from bson import json_util

from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.sanitize.documents import sanitize_document
from certyo_dagster.sanitize.records import CertyoRecordEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3, help="passes; medians are reported")
    parser.add_argument("--pool", type=int, default=10_000, help="distinct generated products")
    args = parser.parse_args()

    source = CatalogSource(args.documents, pool=args.pool)
    raw = [bson.encode(source.document(i)) for i in range(args.documents)]
    docs = [bson.decode(r) for r in raw]
    payloads = [sanitize_document(d) for d in docs]
    encoder = CertyoRecordEncoder(spec_for("products"), TENANT)
    sizes = [len(orjson.dumps(p)) for p in payloads]
    print(
        f"{args.documents:,} catalog documents ({source.pool_size:,} distinct), "
        f"{sum(sizes) / len(sizes):,.0f} bytes of payload JSON on average"
    )
    rows: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
        "sanitize + hash": (lambda d: record_hash(sanitize_document(d)), docs),
        "sanitize only": (sanitize_document, docs),
        "hash only (sanitized payload)": (record_hash, payloads),
        "certyo_dagster encode (ingest, no hash)": (encoder.encode, docs),
        "orjson.dumps(doc, default=str)": (lambda d: orjson.dumps(d, default=str), docs),
        "bson.json_util.dumps(doc)": (json_util.dumps, docs),
        "bson.decode (a cursor's cost)": (bson.decode, raw),
    }
    results: dict[str, dict[str, Any]] = {}
    for label, (function, items) in rows.items():
        rates = [per_cpu_second(function, items) for _ in range(args.repeat)]
        rate = median(rates)
        results[label] = {"docs_per_cpu_second": rate, "us_per_doc": 1e6 / rate, "runs": rates}
        print(f"  {label:<42} {rate:10,.0f} docs/s per core  ({1e6 / rate:6.1f} us/doc)")
    path = write_result(
        "sanitize",
        {
            "documents": args.documents,
            "distinct_products": source.pool_size,
            "payload_bytes_mean": sum(sizes) / len(sizes),
            "repeat": args.repeat,
            "median": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
