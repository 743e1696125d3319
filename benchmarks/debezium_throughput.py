"""Debezium capture throughput: raw Kafka consume rate, sandbox limit and debezium_<c>.

One run starts one Tansu broker (certyo_demo.servers.KafkaBroker) and one sandbox subprocess,
produces N Debezium MongoDB envelopes (schemas off, the captured shape) of catalog documents
to one partition before any clock starts, then measures on that same broker and sandbox:

- raw: a confluent-kafka consumer reads all N messages (no parsing): the broker's limit;
- limit: the same documents' Certyo records, encoded before the clock, POSTed in 1000-record
  bulk calls with `--in-flight` requests at once (the same number the capture is given);
- debezium: `DebeziumIngestor` (what debezium_<c> runs) as a fresh consumer-group member:
  consume, parse, sanitize, ship with `--in-flight` batches in flight, write back and commit
  batch after batch in Kafka order.
The target is debezium ≥ 0.7 × the lower of raw and limit, with memory flat: RSS is sampled
while the ingestor runs and the growth from 25 % to 100 % of the messages is reported.
The write-back goes to an in-memory stand-in (benchmarks/_common.py), not to MongoDB.

A new group member waits seconds for its first assignment (the group join); debezium_<c>
reads and ships ahead of it meanwhile (docs/debezium.md), and the phase reports its whole-run
rate, the join's length and how many messages were read ahead of it.

With `--pin` (the default on 2 or more cores) the broker and the sandbox run on one core and
this process on another, in every phase: in a deployment Certyo is a remote service and the
broker another machine, so neither takes the client's CPU. `--no-pin` lets them share.

    .venv/bin/python benchmarks/debezium_throughput.py --documents 20000 --repeat 3
"""

from __future__ import annotations

import cProfile
import math
import pstats
import threading
import time
from typing import Any

import orjson
from _common import (
    API_KEY,
    DATABASE,
    TENANT,
    CatalogSource,
    GeneratedCollection,
    GeneratedDatabase,
    Pinning,
    Stopwatch,
    add_pin_option,
    catalog_parser,
    file_sandbox,
    median,
    rss_mb,
    write_result,
)
from bson import json_util
from bson.json_util import DatetimeRepresentation, JSONMode, JSONOptions
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from ingest_throughput import run_limit

from certyo_dagster.capture.debezium import encode_change, parse_message
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.debezium import DebeziumIngestor
from certyo_dagster.source.kafka import KafkaResource
from certyo_demo.catalog import TIMESTAMP_FIELD
from certyo_demo.servers import KafkaBroker

BULK = 1000
COLLECTION = "products"
_EJSON = JSONOptions(
    json_mode=JSONMode.LEGACY, datetime_representation=DatetimeRepresentation.LEGACY
)
SOURCE_NOTE = (
    "the write-back goes to an in-memory stand-in for a pymongo collection; messages are "
    "Debezium MongoDB envelopes (schemas off) of demo-catalog documents"
)


def spec() -> CollectionSpec:
    return CollectionSpec(DATABASE, COLLECTION, TIMESTAMP_FIELD, capture="debezium")


def envelope(doc: dict, n: int) -> tuple[bytes, bytes]:
    ts_ms = 1_775_000_000_000 + n
    source = {
        "version": "3.6.3.Final",
        "connector": "mongodb",
        "name": "certyo",
        "ts_ms": ts_ms,
        "snapshot": "false",
        "db": DATABASE,
        "sequence": None,
        "ts_us": ts_ms * 1000,
        "ts_ns": ts_ms * 1_000_000,
        "collection": COLLECTION,
        "ord": 1 + n % 1000,
        "lsid": None,
        "txnNumber": None,
        "wallTime": ts_ms,
    }
    value = {
        "before": None,
        "after": json_util.dumps(doc, json_options=_EJSON),
        "updateDescription": None,
        "source": source,
        "op": "c",
        "ts_ms": ts_ms + 40,
        "transaction": None,
    }
    key = {"id": json_util.dumps(doc["_id"], json_options=_EJSON)}
    return orjson.dumps(key), orjson.dumps(value)


def _bulk_body(records: list[bytes]) -> bytes:
    head = b'{"tenantId":' + orjson.dumps(TENANT) + b',"records":['
    return b"".join((head, b",".join(records), b"]}"))


def produce_all(bootstrap: str, topic: str, source: CatalogSource) -> list[bytes]:
    """Send every envelope to the topic; return the records' bulk bodies for the limit."""
    limit_spec = CollectionSpec(DATABASE, "products_limit", TIMESTAMP_FIELD, capture="debezium")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1)]).values():
        future.result(10)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    bodies, records = [], []
    for n, doc in enumerate(source):
        key, value = envelope(doc, n)
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        # The limit's records are for another collection name: their idempotency keys must
        # not turn the debezium phase's records into replays.
        change = parse_message(key, value, spec())
        records.append(encode_change(change, limit_spec, TENANT).json)
        if len(records) == BULK:
            bodies.append(_bulk_body(records))
            records = []
    if records:
        bodies.append(_bulk_body(records))
    if producer.flush(60):
        raise SystemExit("the broker did not store every envelope")
    return bodies


def raw_consume(bootstrap: str, topic: str, count: int) -> int:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "raw-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    seen = 0
    try:
        while seen < count:
            for message in consumer.consume(1000, timeout=1.0):
                error = message.error()
                if error is None:
                    seen += 1
                elif error.code() != KafkaError._PARTITION_EOF:
                    raise SystemExit(f"raw consume failed: {error}")
    finally:
        consumer.close()
    return seen


class _Collection(GeneratedCollection):
    def bulk_write(self, ops: list, ordered: bool = True) -> Any:
        super().bulk_write(ops, ordered)
        return type("Result", (), {"modified_count": len(ops)})()


def run_debezium(
    bootstrap: str,
    base_url: str,
    source: CatalogSource,
    run: int,
    in_flight: int,
    profile: cProfile.Profile | None = None,
) -> dict:
    collection = _Collection(source)
    database = GeneratedDatabase({COLLECTION: collection})
    samples: list[tuple[int, float]] = []
    stop = threading.Event()
    with CertyoClient(base_url, API_KEY, TENANT, pool_maxsize=in_flight) as client:
        ingestor = DebeziumIngestor(
            database=database,
            spec=spec(),
            kafka=KafkaResource(bootstrap_servers=bootstrap, group_id=f"bench-{run}"),
            client=client,
            tenant_id=TENANT,
            run_id="benchmark",
            max_messages=source.count,
            max_seconds=600,
            batch_size=BULK,
            max_in_flight=in_flight,
        )
        report_box: list = []

        def sample() -> None:
            while not stop.wait(0.2):
                samples.append((collection.log.updates, rss_mb()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if profile is not None:
            profile.enable()
        thread_cpu = time.thread_time()
        try:
            report_box.append(ingestor.run())
        finally:
            thread_cpu = time.thread_time() - thread_cpu
            if profile is not None:
                profile.disable()
        stop.set()
        sampler.join()
    report = report_box[0]
    if report.accepted + report.replayed != source.count or collection.log.updates != source.count:
        raise SystemExit(
            f"debezium: {report.accepted} accepted, {collection.log.updates} written back of "
            f"{source.count}"
        )
    if collection.log.out_of_order:
        raise SystemExit(f"debezium: {collection.log.out_of_order} write-backs out of order")
    quarter = [rss for done, rss in samples if done >= source.count // 4]
    return {
        "messages": report.messages,
        "group_join_seconds": report.first_assignment_seconds or float("nan"),
        "first_message_seconds": report.first_message_seconds or 0.0,
        "read_ahead": report.read_ahead,
        "read_ahead_dropped": report.read_ahead_dropped,
        "replayed": report.replayed,
        # The thread that consumes, parses, writes back and commits; shipping runs beside it.
        "consume_thread_cpu_us_per_message": thread_cpu / report.messages * 1e6,
        "rss_at_25_percent_mb": quarter[0] if quarter else float("nan"),
        "rss_at_end_mb": samples[-1][1] if samples else float("nan"),
        "rss_growth_mb": (samples[-1][1] - quarter[0]) if quarter else float("nan"),
    }


PHASES = ("raw", "limit", "debezium")


def _median_sampled(values: list[float]) -> float:
    """The median of the runs that measured it. NaN marks a figure a run could not sample
    (RSS at 25 % of the write-backs when they all came in its last sample); NaN if none did."""
    sampled = [v for v in values if not math.isnan(v)]
    return median(sampled) if sampled else float("nan")


def one_run(
    source: CatalogSource,
    run: int,
    in_flight: int,
    pinning: Pinning | None,
    profile: cProfile.Profile | None = None,
) -> dict[str, dict[str, float]]:
    phases: dict[str, dict[str, float]] = {}
    topic = f"certyo.{DATABASE}.{COLLECTION}"
    with KafkaBroker() as broker, file_sandbox() as sandbox:
        if pinning is not None:
            # Before anything is produced, so every phase runs pinned the same way.
            pinning.pin_server(broker.process.pid if broker.process else None)
            pinning.pin_server(sandbox.pid)
            pinning.pin_client()
        bodies = produce_all(broker.bootstrap, topic, source)
        for phase in PHASES:
            extra: dict[str, float] = {}
            with Stopwatch(sandbox.pid) as watch:
                if phase == "raw":
                    count = raw_consume(broker.bootstrap, topic, source.count)
                elif phase == "limit":
                    count = run_limit(sandbox.base_url, bodies, in_flight)
                else:
                    extra = run_debezium(
                        broker.bootstrap, sandbox.base_url, source, run, in_flight, profile
                    )
                    count = source.count
            phases[phase] = {
                "per_second": count / watch.wall,
                "seconds": watch.wall,
                # CPU per message of this process (all threads) and of the sandbox: what the
                # rates cost whatever else the machine's cores were running.
                "client_cpu_us_per_message": watch.client_cpu / count * 1e6,
                "sandbox_cpu_us_per_message": watch.server_cpu / count * 1e6,
                **extra,
            }
            print(
                f"  run {run + 1} {phase:>14}: {count / watch.wall:9,.0f} msgs/s "
                f"({watch.wall:5.1f} s; CPU per message: client "
                f"{watch.client_cpu / count * 1e6:.0f} us, sandbox "
                f"{watch.server_cpu / count * 1e6:.0f} us)"
                + (
                    f"; group join {extra['group_join_seconds']:.1f} s, "
                    f"{extra['read_ahead']:,} read ahead of it "
                    f"({extra['read_ahead_dropped']:,} dropped)"
                    f"; consume thread {extra['consume_thread_cpu_us_per_message']:.0f} us CPU "
                    "per message"
                    f"; RSS {extra['rss_at_25_percent_mb']:.0f} MB at 25 %, "
                    f"{extra['rss_at_end_mb']:.0f} MB at the end"
                    if extra
                    else ""
                ),
                flush=True,
            )
    return phases


def main() -> None:
    parser = catalog_parser(__doc__, documents=30_000, repeat=3)
    add_pin_option(parser)
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="cProfile the debezium phase's consume thread (every run) and write the stats here",
    )
    args = parser.parse_args()
    pinning = Pinning.choose(args.pin)
    if pinning is not None:
        pinning.pin_client()
    source = CatalogSource(args.documents, pool=args.pool)
    print(f"{args.documents:,} Debezium envelopes of catalog documents, one partition")
    print(f"note: {SOURCE_NOTE}")
    print(f"{args.in_flight} bulk requests in flight in both the limit and debezium_<c>")
    if pinning is None:
        print("not pinned: the client, the broker and the sandbox share every core")
    else:
        print(
            f"pinned: broker and sandbox on core(s) {sorted(pinning.server_cores)}, "
            f"this process on core(s) {sorted(pinning.client_cores)}"
        )
    profile = cProfile.Profile() if args.profile else None
    runs = [one_run(source, run, args.in_flight, pinning, profile) for run in range(args.repeat)]
    if profile is not None:
        profile.dump_stats(args.profile)
        print(f"profile of the debezium phase written to {args.profile}; top by own time:")
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    medians = {
        phase: {key: _median_sampled([r[phase][key] for r in runs]) for key in runs[0][phase]}
        for phase in PHASES
    }
    lower = [min(r["raw"]["per_second"], r["limit"]["per_second"]) for r in runs]
    ratio = median([r["debezium"]["per_second"] / low for r, low in zip(runs, lower, strict=True)])
    growth = medians["debezium"]["rss_growth_mb"]
    print(f"medians of {args.repeat} runs:")
    for phase in PHASES:
        m = medians[phase]
        print(
            f"  {phase:>14}: {m['per_second']:9,.0f} msgs/s; CPU per message: client "
            f"{m['client_cpu_us_per_message']:.0f} us, sandbox "
            f"{m['sandbox_cpu_us_per_message']:.0f} us"
        )
    d = medians["debezium"]
    print(
        f"  {'group join':>14}: {d['group_join_seconds']:.1f} s, {d['read_ahead']:,.0f} messages "
        f"read ahead of it ({d['read_ahead_dropped']:,.0f} dropped)"
    )
    print(f"  debezium / lower limit (raw, limit), whole run: {ratio:.2f}  (target >= 0.7)")
    if not math.isnan(growth):
        print(
            f"  RSS growth from 25 % to 100 % of the messages: {growth:+.1f} MB "
            "(median of the runs that sampled it)"
        )
    else:
        print("  RSS growth: not sampled (every write-back came at the end, after the join)")
    path = write_result(
        "debezium_throughput",
        {
            "documents": args.documents,
            "repeat": args.repeat,
            "in_flight": args.in_flight,
            "pinning": pinning.describe() if pinning is not None else None,
            "notes": [SOURCE_NOTE],
            "median": medians,
            "ratio_debezium_over_lower_limit": ratio,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
