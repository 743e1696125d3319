"""The `kafka` resource: where Debezium's change events are read from, configured by EnvVar.

confluent-kafka is imported only when a consumer is made, so the product runs without it
unless a collection uses `capture: debezium` (`pip install 'certyo-dagster[debezium]'`).
The SASL password is a secret: it goes to librdkafka and nowhere else (not into logs, run
metadata, exceptions or `describe()`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from pydantic import Field

from certyo_dagster.settings import CollectionSpec, ConfigError

DEFAULT_TOPIC_PREFIX = "certyo"
GROUP_ID_PREFIX = "certyo-dagster-"

# Consumer settings the Debezium capture relies on (docs/debezium.md explains each one).
CONSUMER_SETTINGS: dict[str, Any] = {
    # Offsets are committed by hand, per partition, only after Certyo acknowledged them.
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    # A new group starts at the beginning of the topic: Debezium's snapshot comes first.
    "auto.offset.reset": "earliest",
    # Group joins and the takeover of a dead member's partitions in about 3 s, not 23 s.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    # "Caught up" is learned by reading to the end of each partition, not from the high
    # watermark a broker reports (some brokers report it too low).
    "enable.partition.eof": True,
    "fetch.wait.max.ms": 100,
}


class KafkaUnavailableError(RuntimeError):
    """confluent-kafka is not installed."""


def confluent_kafka() -> Any:
    """The confluent_kafka module, or a clear error saying how to install it."""
    try:
        import confluent_kafka as module
    except ImportError as exc:  # pragma: no cover - the test environment has it
        raise KafkaUnavailableError(
            "capture: debezium needs confluent-kafka: pip install 'certyo-dagster[debezium]'"
        ) from exc
    return module


class KafkaResource(dg.ConfigurableResource):
    """A Kafka cluster holding Debezium's topics `<topic_prefix>.<database>.<collection>`."""

    bootstrap_servers: str = Field(description="host:port[,host:port…] of the Kafka brokers.")
    topic_prefix: str = Field(
        default=DEFAULT_TOPIC_PREFIX, description="Debezium's `topic.prefix`."
    )
    group_id: str | None = Field(
        default=None,
        description="Consumer group; default `certyo-dagster-<collection>`.",
    )
    security_protocol: str | None = Field(
        default=None, description="`security.protocol`: PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL."
    )
    sasl_mechanism: str | None = Field(
        default=None, description="`sasl.mechanism`: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512."
    )
    sasl_username: str | None = Field(default=None, description="`sasl.username`.")
    sasl_password: str | None = Field(
        default=None, description="`sasl.password` (a secret; set it with an EnvVar)."
    )
    ssl_ca_location: str | None = Field(
        default=None, description="`ssl.ca.location`: the CA bundle that signs the brokers."
    )

    def topic_for(self, spec: CollectionSpec) -> str:
        return f"{self.topic_prefix}.{spec.database}.{spec.collection}"

    def group_for(self, spec: CollectionSpec) -> str:
        return self.group_id or f"{GROUP_ID_PREFIX}{spec.collection}"

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every client (with the password)."""
        if not self.bootstrap_servers.strip():
            raise ConfigError("CERTYO_KAFKA_BOOTSTRAP_SERVERS is empty")
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers.strip()}
        for name, value in (
            ("security.protocol", self.security_protocol),
            ("sasl.mechanism", self.sasl_mechanism),
            ("sasl.username", self.sasl_username),
            ("sasl.password", self.sasl_password),
            ("ssl.ca.location", self.ssl_ca_location),
        ):
            if value:
                config[name] = value
        return config

    def consumer_config(self, spec: CollectionSpec, **overrides: Any) -> dict[str, Any]:
        return {
            **self.client_config(),
            **CONSUMER_SETTINGS,
            "group.id": self.group_for(spec),
            **overrides,
        }

    def describe(self) -> str:
        """What a log line may say about this cluster: no password."""
        parts = [self.bootstrap_servers.strip()]
        if self.security_protocol:
            parts.append(self.security_protocol)
        if self.sasl_mechanism:
            parts.append(f"{self.sasl_mechanism} as {self.sasl_username or '?'}")
        return ", ".join(parts)

    def new_consumer(self, spec: CollectionSpec, **overrides: Any) -> Any:
        """A confluent_kafka.Consumer in this collection's group (not subscribed yet)."""
        return confluent_kafka().Consumer(self.consumer_config(spec, **overrides))

    def redact(self, text: str) -> str:
        """`text` without the password (librdkafka never echoes it, but be sure)."""
        if self.sasl_password and self.sasl_password in text:
            text = text.replace(self.sasl_password, "***")
        return text


@dataclass
class GroupLag:
    """Whether the consumer group has messages left to read, per partition.

    `behind[p]` is a lower bound of the messages after the committed offset (0 when the end
    was found by reading), `unknown` lists partitions whose end could not be established in
    time (treated as lag: a run that finds nothing ends at once).
    """

    topic: str
    exists: bool = True
    committed: dict[int, int] = field(default_factory=dict)  # -1: nothing committed yet
    behind: dict[int, int] = field(default_factory=dict)
    unknown: list[int] = field(default_factory=list)

    @property
    def has_lag(self) -> bool:
        return bool(self.unknown) or any(n > 0 for n in self.behind.values())

    def position(self) -> str:
        """The committed offsets as `p:offset,…` (a run key names them)."""
        return ",".join(f"{p}:{o}" for p, o in sorted(self.committed.items()))


def probe_lag(kafka: KafkaResource, spec: CollectionSpec, timeout: float = 10.0) -> GroupLag:
    """Compare the group's committed offsets with the end of each partition.

    The high watermark answers first when it proves lag (it is never above the real end).
    Otherwise the end is found by reading: a consumer assigned at the committed offset (it
    does not join the group and never commits) reads until it gets a message (lag) or the
    end-of-partition event (none). Some brokers report the high watermark too low (Tansu
    0.6.0 reports the base offset of the last record batch + 1), so it alone cannot prove
    that a group is caught up.
    """
    ck = confluent_kafka()
    topic = kafka.topic_for(spec)
    consumer = ck.Consumer(kafka.consumer_config(spec))
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            return GroupLag(topic, exists=False)
        partitions = [ck.TopicPartition(topic, p) for p in sorted(described.partitions)]
        lag = GroupLag(topic)
        probe = []
        for tp in consumer.committed(partitions, timeout=timeout):
            committed = tp.offset if tp.offset is not None and tp.offset >= 0 else -1
            lag.committed[tp.partition] = committed
            low, high = consumer.get_watermark_offsets(
                ck.TopicPartition(topic, tp.partition), timeout=timeout
            )
            start = committed if committed >= 0 else low
            if high > start:
                lag.behind[tp.partition] = high - start
            else:
                probe.append(
                    ck.TopicPartition(topic, tp.partition, committed if committed >= 0 else low)
                )
        if probe:
            _read_ends(consumer, ck, probe, lag, timeout)
        return lag
    finally:
        consumer.close()


def _read_ends(consumer: Any, ck: Any, probe: list, lag: GroupLag, timeout: float) -> None:
    undecided = {tp.partition for tp in probe}
    consumer.assign(probe)
    deadline = time.monotonic() + timeout
    while undecided and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is None:
            continue
        error = message.error()
        if error is None:
            if message.partition() in undecided:
                lag.behind[message.partition()] = 1
                undecided.discard(message.partition())
        elif error.code() == ck.KafkaError._PARTITION_EOF and message.partition() in undecided:
            lag.behind[message.partition()] = 0
            undecided.discard(message.partition())
    lag.unknown = sorted(undecided)
