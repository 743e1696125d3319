"""What the benchmarks share: catalog documents, where they are read from, the sandbox, results.

Documents are demo-catalog products (`certyo_demo.catalog.product`: nested variants
and reviews, Decimal128 prices, UUID and binary fields, naive UTC dates, Int64 counters, a
DBRef). Building one costs ~270 us of `random` calls, which would dominate any benchmark,
so a pool of distinct products is built once and kept as BSON. Document `i` is pool entry
`i % pool` decoded with `bson.decode` (a fresh object graph, as a pymongo cursor gives) with
its own `_id`, `sku` and `updatedAt`, so every document is a distinct record.

By default the documents live in a real MongoDB-wire-compatible server: one SecantusDB
(`certyo_demo.servers.SecantusServer`, a separate process on a free loopback port, storage in
a temp dir) that the benchmark starts, loads before the clock starts, and stops. The pipeline
reads from it and writes back into it; `OpCounter` counts the commands the client sends.
`--source generated` reads instead from an in-memory stand-in for a pymongo collection
(`GeneratedCollection`), which generates documents lazily, never holding the window in a list,
and records the write-back operations it receives: the client's own cost with no database.

`run_window` is the one place that drives the product's ingest API.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import pymongo
from bson import ObjectId
from pymongo import monitoring

from certyo_dagster.capture.polling import ensure_indexes
from certyo_dagster.sanitize.records import CertyoRecordEncoder
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.ingest import IngestReport, WindowIngestor
from certyo_dagster.ship.shipping import Shipper
from certyo_dagster.source.mongo import APP_NAME, open_database
from certyo_demo.catalog import TIMESTAMP_FIELD, product
from certyo_demo.servers import SecantusServer
from certyo_sandbox.config import DEFAULT_API_KEY, DEFAULT_TENANT, SandboxConfig
from certyo_sandbox.server import SandboxProcess

API_KEY = DEFAULT_API_KEY
TENANT = DEFAULT_TENANT
DATABASE = "productdb"
# One hourly partition holds every generated document.
WINDOW_START = datetime(2026, 4, 1, 0, 0)
WINDOW_END = WINDOW_START + timedelta(hours=1)
PARTITION_KEY = "2026-04-01-00:00"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SOURCES = ("secantus", "generated")
SOURCE_NOTES = {
    "secantus": (
        "documents are read from, and written back to, one SecantusDB server (storage in a "
        "temp dir) on loopback, loaded before the clock starts; it shares the machine's cores "
        "with the client and the sandbox"
    ),
    "generated": (
        "documents come from an in-memory stand-in for a pymongo collection; write-backs are "
        "recorded, not stored: the client's cost with no database"
    ),
}
LOAD_CHUNK = 5000
PRELOAD_NOTE = (
    "documents are decoded from BSON before the clock starts (and gc.freeze()d); a real "
    "pymongo cursor adds "
    "its BSON decoding (see benchmarks/sanitize.py: bson.decode) to baseline and "
    "certyo_dagster alike"
)
LAZY_NOTE = (
    "documents are decoded from BSON one at a time as the cursor is read, like a pymongo "
    "cursor, and never held in a list"
)


def spec_for(collection: str) -> CollectionSpec:
    return CollectionSpec(DATABASE, collection, TIMESTAMP_FIELD)


class CatalogSource:
    """Document `i` of a generated catalog, built on demand from a pool of BSON products."""

    def __init__(self, count: int, *, pool: int = 10_000, seed: int = 7) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        # Distinct milliseconds inside the hour, so (updatedAt, _id) order is the index order.
        self.step_ms = 3_600_000 // count
        if self.step_ms < 1:
            raise ValueError("at most 3.6 million documents fit one hourly partition")
        rng = random.Random(seed)
        self._pool = [bson.encode(product(rng, i, WINDOW_START)) for i in range(min(pool, count))]
        self._epoch_seconds = int((WINDOW_START - datetime(1970, 1, 1)).total_seconds())
        self._docs: list[dict[str, Any]] | None = None

    def preload(self) -> None:
        """Decode every document now, so iterating costs nothing (throughput runs).

        The documents are then frozen out of the garbage collector: millions of preloaded
        objects would make every full collection rescan them, a cost a streaming cursor,
        which holds one batch, never has.
        """
        self._docs = [self.document(i) for i in range(self.count)]
        gc.collect()
        gc.freeze()

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    def timestamp(self, i: int) -> datetime:
        return WINDOW_START + timedelta(milliseconds=i * self.step_ms)

    def document(self, i: int) -> dict[str, Any]:
        if self._docs is not None:
            return self._docs[i]
        doc = bson.decode(self._pool[i % len(self._pool)])
        doc["_id"] = ObjectId(self._epoch_seconds.to_bytes(4, "big") + i.to_bytes(8, "big"))
        doc["sku"] = f"{doc['sku']}-{i:07d}"
        doc[TIMESTAMP_FIELD] = self.timestamp(i)
        return doc

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._docs is not None:
            return iter(self._docs)
        return map(self.document, range(self.count))


@dataclass
class WriteBackLog:
    """What a collection received: counts and order checks, not the operations themselves."""

    bulk_writes: int = 0
    updates: int = 0
    single_updates: int = 0
    out_of_order: int = 0
    last_id: Any = None


class GeneratedCursor:
    def __init__(self, collection: GeneratedCollection, start: datetime, end: datetime) -> None:
        self._collection = collection
        self._start, self._end = start, end

    def batch_size(self, _n: int) -> GeneratedCursor:
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        source = self._collection.source
        on_document = self._collection.on_document
        if source._docs is not None and on_document is None:
            # Preloaded (throughput runs): in (updatedAt, _id) order, every one in the window.
            if source.timestamp(0) < self._start or source.timestamp(source.count - 1) >= self._end:
                raise NotImplementedError("preloaded documents must all be in the window")
            self._collection.yielded += source.count
            yield from source._docs
            return
        for i in range(source.count):
            ts = source.timestamp(i)
            if self._start <= ts < self._end:
                self._collection.yielded += 1
                if on_document is not None:
                    on_document(self._collection.yielded)
                yield source.document(i)

    def close(self) -> None:
        pass


class GeneratedCollection:
    """Just enough of a pymongo collection for extract → ingest over generated documents."""

    def __init__(
        self,
        source: CatalogSource,
        *,
        on_document: Callable[[int], None] | None = None,
    ) -> None:
        self.source = source
        self.on_document = on_document
        self.yielded = 0
        self.log = WriteBackLog()

    def find(self, filter: dict, projection: Any = None, sort: Any = None) -> GeneratedCursor:  # noqa: A002
        window = filter.get(TIMESTAMP_FIELD)
        if not isinstance(window, dict) or set(window) != {"$gte", "$lt"}:
            raise NotImplementedError(f"only the plain window filter is generated, got {filter}")
        return GeneratedCursor(self, window["$gte"], window["$lt"])

    def bulk_write(self, ops: list, ordered: bool = True) -> None:
        log = self.log
        log.bulk_writes += 1
        log.updates += len(ops)
        for op in ops:
            doc_id = op._filter["_id"]
            if log.last_id is not None and doc_id <= log.last_id:
                log.out_of_order += 1
            log.last_id = doc_id

    def update_one(self, *_args: Any, **_kwargs: Any) -> None:
        self.log.single_updates += 1

    def update_many(self, *_args: Any, **_kwargs: Any) -> None:
        self.log.single_updates += 1

    def find_one(self, *_args: Any, **_kwargs: Any) -> None:
        return None  # no dead letters or cursors in a generated collection

    def create_index(self, *_args: Any, **_kwargs: Any) -> str:
        return "generated"


class GeneratedDatabase(dict):
    """`database[name]`: the generated collection, or an empty recorder for anything else."""

    def __init__(self, collections: dict[str, GeneratedCollection]) -> None:
        super().__init__(collections)

    def __missing__(self, name: str) -> GeneratedCollection:
        empty = GeneratedCollection(CatalogSource(1, pool=1))
        empty.source.count = 0
        self[name] = empty
        return empty


# -- the real server -------------------------------------------------------------------------


class OpCounter(monitoring.CommandListener):
    """What the client sent to MongoDB: commands by name, write statements, documents read.

    Thread-safe enough for counting: the listener runs on the thread that sent the command,
    and the counts are read only between phases or by a sampler that tolerates a stale value.
    """

    READS = frozenset({"find", "getMore", "aggregate", "count", "distinct"})
    WRITES = frozenset({"insert", "update", "delete", "findAndModify"})
    STATEMENTS = {"insert": "documents", "update": "updates", "delete": "deletes"}

    def __init__(self) -> None:
        self.commands: dict[str, int] = {}
        self.statements = 0
        self.documents_returned = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        self.commands[name] = self.commands.get(name, 0) + 1
        key = self.STATEMENTS.get(name)
        if key is not None:
            self.statements += len(event.command.get(key, ()))
        elif name == "findAndModify":
            self.statements += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor") if event.command_name in self.READS else None
        if isinstance(cursor, dict):
            batch = cursor.get("firstBatch", cursor.get("nextBatch", ()))
            self.documents_returned += len(batch)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        commands = dict(self.commands)
        return {
            "read_commands": sum(n for c, n in commands.items() if c in self.READS),
            "write_commands": sum(n for c, n in commands.items() if c in self.WRITES),
            "write_statements": self.statements,
            "documents_returned": self.documents_returned,
            "commands": commands,
        }


def ops_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The counts of `OpCounter.snapshot()` (or of serverStatus opcounters) in between."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = {k: v - before.get(key, {}).get(k, 0) for k, v in value.items()}
            out[key] = {k: v for k, v in out[key].items() if v}
        else:
            out[key] = value - before.get(key, 0)
    return out


class MongoSource:
    """One SecantusDB server holding the catalog, and a client that counts what it sends.

    The client has the options the product's `open_client` gives it (naive UTC datetimes,
    the pipeline's appName) plus the counting listener; the database is opened with the
    product's `open_database`.
    """

    def __init__(self) -> None:
        # On disk in a temp dir: with in-memory storage and the 256 MB cache, SecantusDB
        # refused inserts (WT_CACHE_FULL, "internal server error") at ~85,000 catalog documents.
        self._storage = tempfile.TemporaryDirectory(prefix="certyo-bench-mongo-")
        self.server = SecantusServer(Path(self._storage.name))
        self.ops = OpCounter()
        self.client: Any = None

    def __enter__(self) -> MongoSource:
        self.server.start()
        self.client = pymongo.MongoClient(
            self.server.uri, tz_aware=False, appname=APP_NAME, event_listeners=[self.ops]
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.client is not None:
            self.client.close()
        self.server.stop()
        self._storage.cleanup()

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server.process else None

    @property
    def database(self) -> Any:
        return open_database(self.client, DATABASE)

    def load(self, source: CatalogSource, name: str) -> Any:
        """A fresh collection `name` holding every document of `source`, with the pipeline's
        `(updatedAt, _id)` index; not timed by any phase."""
        collection = self.database[name]
        collection.drop()
        chunk: list[dict[str, Any]] = []
        for doc in source:
            chunk.append(doc)
            if len(chunk) == LOAD_CHUNK:
                collection.insert_many(chunk, ordered=False)
                chunk = []
        if chunk:
            collection.insert_many(chunk, ordered=False)
        warnings = ensure_indexes(collection, spec_for(name))
        if warnings:
            raise SystemExit(f"cannot benchmark without the pipeline's index: {warnings}")
        return collection

    def opcounters(self) -> dict[str, int]:
        """The server's own counters (serverStatus opcounters)."""
        return dict(self.client.admin.command("serverStatus")["opcounters"])

    def rss_mb(self, field_name: str = "VmRSS") -> float:
        """The server process's resident memory in MB (VmHWM: its peak)."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


def check_written_back(collection: Any, count: int, phase: str) -> None:
    """Every document of a real collection carries the pending status of its version."""
    pending = collection.count_documents({"certyo_status": "pending"})
    if pending != count:
        raise SystemExit(f"{phase}: {pending} of {count} documents written back as pending")


def run_window(
    database: Any,
    name: str,
    base_url: str,
    *,
    in_flight: int,
    run_id: str,
    partition_key: str | None = None,
) -> IngestReport:
    """One `ingest_*_window` run over the benchmark's partition: the product's ingest API,
    driven from this one place."""
    with CertyoClient(base_url, API_KEY, TENANT, pool_maxsize=in_flight) as client:
        return WindowIngestor(
            database=database,
            encoder=CertyoRecordEncoder(spec_for(name), TENANT),
            shipper=Shipper(client, TENANT, max_in_flight=in_flight),
            run_id=run_id,
            partition_key=partition_key,
        ).run(WINDOW_START, WINDOW_END)


@contextlib.contextmanager
def file_sandbox(*, enable_fault_injection: bool = False) -> Iterator[SandboxProcess]:
    """One certyo-sandbox subprocess on a SQLite file in a fresh temp dir.

    Fault injection is what lets a benchmark add network latency (`latency()`)."""
    with tempfile.TemporaryDirectory(prefix="certyo-bench-") as tmp:
        config = SandboxConfig(
            db_path=os.path.join(tmp, "sandbox.db"),
            enable_fault_injection=enable_fault_injection,
        )
        with SandboxProcess(config) as sandbox:
            yield sandbox


def latency(sandbox: SandboxProcess, path: str, milliseconds: float, requests: int) -> None:
    """Hold the next `requests` responses on `path` for `milliseconds` after answering them:
    the round trip to a hosted API that loopback does not have. No CPU is spent waiting."""
    sandbox.clear_faults()
    if milliseconds:
        delay = {"action": "delay", "seconds": milliseconds / 1000, "path": path}
        sandbox.script_faults([{**delay, "times": requests}])


def process_cpu_seconds(pid: int | None = None) -> float:
    """User+system CPU seconds of a process (Linux /proc); this process when pid is None."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    """`pid` and every descendant process (Linux /proc)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo.extend(int(child) for child in children.read().split())
        except OSError:
            pass
    return tree


def pin(pid: int, cores: set[int], *, descendants: bool = True) -> int:
    """Restrict every thread of `pid` (and of its descendants) to `cores`; return the threads.

    `os.sched_setaffinity` acts on one thread, so each task of each process is pinned;
    threads the process starts later inherit the mask of the thread that starts them."""
    pinned = 0
    for process in _process_tree(pid) if descendants else [pid]:
        try:
            tasks = [int(task) for task in os.listdir(f"/proc/{process}/task")]
        except OSError:
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(task, cores)
                pinned += 1
            except (ProcessLookupError, PermissionError):
                pass
    return pinned


@dataclass(frozen=True)
class Pinning:
    """Which cores the servers (broker, sandbox) and the benchmark's own process run on.

    Certyo is a remote service and a Kafka broker is another machine: neither shares the
    client's CPU in a deployment. Pinning them to one core and the client to another keeps
    them from taking each other's time, in every phase alike."""

    server_cores: frozenset[int]
    client_cores: frozenset[int]

    @classmethod
    def choose(cls, enabled: bool) -> Pinning | None:
        cores = sorted(os.sched_getaffinity(0))
        if not enabled or len(cores) < 2:
            return None
        return cls(frozenset(cores[:1]), frozenset(cores[1:2]))

    def pin_client(self) -> int:
        # Not its descendants: the servers it started are pinned apart.
        return pin(os.getpid(), set(self.client_cores), descendants=False)

    def pin_server(self, pid: int | None) -> int:
        if pid is None:
            raise SystemExit("cannot pin a server that is not running")
        return pin(pid, set(self.server_cores))

    def describe(self) -> dict[str, Any]:
        return {
            "server_cores": sorted(self.server_cores),
            "client_cores": sorted(self.client_cores),
            "note": (
                "the broker's and the sandbox's processes (every thread) share the server "
                "cores; this benchmark process (every thread) runs on the client cores; other "
                "processes on the machine are not pinned and may use either"
            ),
        }


def add_pin_option(parser: argparse.ArgumentParser) -> None:
    cores = len(os.sched_getaffinity(0))
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=cores >= 2,
        help=(
            "pin the servers (broker, sandbox) to one core and this process to another "
            f"(default: on with 2 or more cores; this machine lets us use {cores})"
        ),
    )


def rss_mb(field_name: str = "VmRSS") -> float:
    """Resident memory of this process in MB (VmHWM is the peak so far)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def per_cpu_second(function: Callable[[Any], Any], items: list[Any]) -> float:
    """`function` applied to each item: items per CPU-second of this process."""
    started = time.process_time()
    for item in items:
        function(item)
    return len(items) / (time.process_time() - started)


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Stopwatch:
    """Wall and CPU time of a phase, for this process and optionally the sandbox."""

    server_pid: int | None = None
    wall: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    _marks: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def __enter__(self) -> Stopwatch:
        server = process_cpu_seconds(self.server_pid) if self.server_pid else 0.0
        self._marks = (time.perf_counter(), process_cpu_seconds(), server)
        return self

    def __exit__(self, *_exc: object) -> None:
        wall, client, server = self._marks
        self.wall = time.perf_counter() - wall
        self.client_cpu = process_cpu_seconds() - client
        if self.server_pid:
            self.server_cpu = process_cpu_seconds(self.server_pid) - server


def catalog_parser(doc: str, *, documents: int, repeat: int) -> argparse.ArgumentParser:
    """The options every catalog-ingest benchmark takes; a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="secantus",
        help="secantus: a real SecantusDB server (default); generated: the in-memory stand-in",
    )
    parser.add_argument("--documents", type=int, default=documents)
    parser.add_argument("--repeat", type=int, default=repeat, help="runs; medians are reported")
    parser.add_argument("--in-flight", type=int, default=4, help="concurrent bulk requests")
    parser.add_argument("--pool", type=int, default=10_000, help="distinct generated products")
    return parser


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """`benchmarks/results/<name>-<UTC time>.json` with the command and the machine."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    document = {
        "benchmark": name,
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": machine(),
        **result,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
