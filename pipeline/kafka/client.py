"""The one place that turns :class:`~pipeline.config.Settings` into librdkafka configuration
dictionaries, and wraps confluent-kafka errors into the pipeline's exception tree."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, ConfigError


def bootstrap_servers(settings: Settings) -> str:
    if not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "kafka.bootstrap_servers is not set: name your cluster "
            "(PIPELINE_KAFKA__BOOTSTRAP_SERVERS=host:9092 or kafka.bootstrap_servers in "
            "pipeline.yaml), or use `pipeline up`, which starts an embedded broker"
        )
    return settings.kafka.bootstrap_servers


log = logging.getLogger("pipeline.kafka")
_CLIENT_LOGGER = logging.getLogger("pipeline.kafka.librdkafka")


class ClientLog:
    """librdkafka's own log lines, through the project's logger instead of raw to stderr:
    each kind of line once when it starts, then at most one reminder every ``every_s`` with
    how often it repeated and what to check (a broker that is down is retried every few
    hundred milliseconds, forever, and would otherwise print a line each time)."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # kind → (last written, repeats since)
        self._lock = threading.Lock()

    @staticmethod
    def kind(facility: str, message: str) -> str:
        # "Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state
        # CONNECT, 4 identical error(s) suppressed)" → the same kind however the numbers vary
        text = "".join("#" if c.isdigit() else c for c in message.split("(")[0])
        return f"{facility}|{text[:120]}"

    def log(self, level: int, fmt: str, *args: Any) -> None:
        facility = str(args[0]) if args else ""
        client = str(args[1]) if len(args) > 1 else ""
        message = str(args[2]) if len(args) > 2 else (fmt % args if args else fmt)
        key = self.kind(facility, message)
        now = self.clock()
        with self._lock:
            last, repeats = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.every_s:
                self._seen[key] = (last, repeats + 1)
                return
            self._seen[key] = (now, 0)
        hint = _hint(facility, message)
        if last is None:
            _CLIENT_LOGGER.log(level, "kafka client %s: %s%s", client, message, hint,
                               extra={"kafka_facility": facility})
        else:
            _CLIENT_LOGGER.log(level, "kafka client %s: still %s (%d more time(s) in %.0fs)%s",
                               client, message, repeats, now - last, hint,
                               extra={"kafka_facility": facility, "repeats": repeats})


def _hint(facility: str, message: str) -> str:
    low = message.lower()
    if "connect" in low or "refused" in low or "resolve" in low or "brokers are down" in low:
        return "; check that kafka.bootstrap_servers is right and the brokers are up"
    if "sasl" in low or "authentic" in low or "ssl" in low or "certificate" in low:
        return "; check kafka.security_protocol, the SASL credentials and kafka.ssl_ca_location"
    return ""


CLIENT_LOG = ClientLog()


def silence_client_logs() -> None:
    """For one-shot commands (``pipeline dlq``): librdkafka's own log lines are dropped; what
    fails reaches the user as one error."""
    _CLIENT_LOGGER.setLevel(logging.CRITICAL + 1)
    _CLIENT_LOGGER.propagate = False


def common_config(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers(settings),
        "client.id": k.client_id,
        "security.protocol": k.security_protocol,
        "socket.connection.setup.timeout.ms": int(k.request_timeout_s * 1000),
        # librdkafka waits reconnect.backoff.ms / 2 (50 ms by default) between picking brokers
        # for a cluster request: a new client's first request (after the bootstrap connection
        # is swapped for the broker's own) paid it, ~60 ms against ~20 ms, for every CLI
        # command and every helper reader. A failed connection's backoff still doubles up to
        # reconnect.backoff.max.ms (10 s).
        "reconnect.backoff.ms": 20,
    }
    conf["logger"] = CLIENT_LOG  # never raw to stderr
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
        conf["sasl.username"] = k.sasl_username or ""
        conf["sasl.password"] = k.sasl_password.get_secret_value() if k.sasl_password else ""
    if k.ssl_ca_location is not None:
        conf["ssl.ca.location"] = str(k.ssl_ca_location)
    conf["error_cb"] = _noting(settings, None)
    return conf


# -- security failures: what librdkafka reports once per connection attempt, as one line -----
_security_lock = threading.Lock()
_security_problem: tuple[float, str] | None = None
_SECURITY_CODES = {KafkaError._AUTHENTICATION, KafkaError._SSL}


def security_diagnosis(settings: Settings, err: KafkaError) -> str | None:
    """One line naming the listener and what to check, for an authentication or TLS failure
    (None for any other error). Never contains a secret."""
    if err.code() not in _SECURITY_CODES:
        return None
    k = settings.kafka
    text = err.str()
    where = f"Kafka at {k.bootstrap_servers} ({k.security_protocol}"
    if err.code() == KafkaError._AUTHENTICATION or "SASL" in text:
        return (
            f"{where}, SASL {k.sasl_mechanism} as user {k.sasl_username!r}) refused the login: "
            f"{text}; check kafka.sasl_username and kafka.sasl_password "
            "(PIPELINE_KAFKA__SASL_PASSWORD) against the broker's SCRAM users"
        )
    ca = f"now {k.ssl_ca_location}" if k.ssl_ca_location else "unset: the system's CAs are used"
    return (
        f"{where}): the TLS handshake failed: {text}; check kafka.ssl_ca_location ({ca}): it "
        "must name the PEM file of the CA that signed the broker's certificate"
    )


def last_security_problem(within_s: float = 120.0) -> str | None:
    """The newest authentication/TLS failure any client of this process met, if recent."""
    with _security_lock:
        if _security_problem and time.monotonic() - _security_problem[0] <= within_s:
            return _security_problem[1]
    return None


def _noting(settings: Settings, then: Callable[[KafkaError], None] | None) -> Any:
    """An ``error_cb`` that remembers security failures (so a timeout can name its cause), then
    calls ``then``."""

    def on_error(err: KafkaError) -> None:
        global _security_problem
        problem = security_diagnosis(settings, err)
        if problem is not None:
            with _security_lock:
                _security_problem = (time.monotonic(), problem)
        if then is not None:
            then(err)

    return on_error


def _with_overrides(settings: Settings, conf: dict[str, Any], overrides: dict[str, Any]) -> None:
    cb = overrides.pop("error_cb", None)
    conf.update(overrides)
    if cb is not None:
        conf["error_cb"] = _noting(settings, cb)


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, ordered, never-expiring delivery (DESIGN decisions 4 and 5).

    ``message.timeout.ms=0`` makes librdkafka retry a message until it is delivered instead of
    failing it after a deadline: a relay must wait out a broker outage, and an idempotent
    producer that let one message expire could let a later message of the same key overtake it.
    """
    conf = common_config(settings)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "message.timeout.ms": 0,
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500000,
        }
    )
    conf.update(settings.kafka.producer)
    _with_overrides(settings, conf, dict(overrides))
    return conf


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    conf = common_config(settings)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # what an aborted transaction wrote (a fenced relay, a failed replay) is never read
            "isolation.level": "read_committed",
        }
    )
    conf.update(settings.kafka.consumer)
    _with_overrides(settings, conf, dict(overrides))
    return conf


def resume_fetching(
    consumer: Any, parts: list[TopicPartition], at: Mapping[tuple[str, int], int] | None = None
) -> None:
    """Resume ``parts`` and have them fetched at once.

    After ``resume()`` alone librdkafka's fetcher took a resumed partition up only at its next
    wake-up, ~0.8 s later here (librdkafka 2.16, Apache Kafka 4.4, measured by
    ``pipeline bench worker``): a delay every due retry record and every backpressure pause
    paid. A seek to where the partition stands starts its fetch at once: to ``at[tp]`` when
    given (the offset it was rewound to), else to the consumer's position (one past the last
    record it returned). A partition with no position yet (nothing returned since it was
    assigned) is left to the resume, as is one the client refuses to seek."""
    if not parts:
        return
    consumer.resume(parts)
    at = at or {}
    rewound = [TopicPartition(p.topic, p.partition, at[(p.topic, p.partition)])
               for p in parts if (p.topic, p.partition) in at]
    rest = [p for p in parts if (p.topic, p.partition) not in at]
    try:
        placed = [p for p in consumer.position(rest) if p.offset >= 0] if rest else []
    except KafkaException as exc:
        log.debug("no positions to restart the fetch of %d partition(s) at: %s", len(rest), exc)
        placed = []
    for p in (*rewound, *placed):
        try:
            consumer.seek(p)
        except KafkaException as exc:  # not yet fetching (just assigned): the resume does it
            log.debug("seek %s[%d]@%d after resume refused: %s", p.topic, p.partition,
                      p.offset, exc)


def membership_config(
    protocol: str, *, session_timeout_ms: int, assignor: str
) -> dict[str, Any]:
    """The consumer-group properties of ``protocol``. Under ``consumer`` (KIP-848) the session
    timeout, heartbeat and assignor are the broker's (``group.consumer.*``); librdkafka refuses
    them on the client."""
    if protocol == "consumer":
        conf: dict[str, Any] = {"group.protocol": "consumer"}
        if assignor in ("range", "uniform"):  # the broker's assignors (KIP-848)
            conf["group.remote.assignor"] = assignor
        return conf
    return {
        "group.protocol": "classic",
        "partition.assignment.strategy": assignor,
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(100, session_timeout_ms // 5),
    }


def produce(
    producer: Any,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    *,
    headers: Any = None,
    on_delivery: Any = None,
    partition: int | None = None,
) -> None:
    """``producer.produce`` that waits (serving delivery reports) while the local queue is
    full, instead of raising BufferError. ``partition`` None: the key's (the partitioner's)."""
    extra = {} if partition is None else {"partition": partition}
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery, **extra)
            return
        except BufferError:
            producer.poll(0.05)


def admin_config(settings: Settings) -> dict[str, Any]:
    return common_config(settings)


_txn_support: dict[str, bool] = {}


def transactions_enabled(settings: Settings) -> bool:
    """``kafka.transactions``: ``on``/``off`` as said; ``auto`` asks the cluster once per
    process. A broker with a transaction coordinator reports its
    ``transaction.state.log.*`` configs; one that describes no config at all (tansu, whose
    read_committed consumers do not hide aborted records) gets none. A cluster that refuses to
    describe itself (ACLs of a managed Kafka) is taken to support them."""
    mode = settings.kafka.transactions
    if mode != "auto":
        return mode == "on"
    boot = bootstrap_servers(settings)
    if boot not in _txn_support:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

        admin = AdminClient(admin_config(settings))
        timeout = settings.kafka.request_timeout_s
        try:
            md = admin.list_topics(timeout=timeout)
            if not md.brokers:
                raise BrokerUnavailable(f"Kafka at {boot} lists no broker: is the cluster up?")
            res = ConfigResource(ConfigResource.Type.BROKER, str(next(iter(md.brokers))))
            configs = admin.describe_configs([res], request_timeout=timeout)[res].result()
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() in (KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                              KafkaError.TOPIC_AUTHORIZATION_FAILED):
                _txn_support[boot] = True
                return True
            raise wrap_kafka_error(exc, "asking the cluster whether it has transactions") from exc
        _txn_support[boot] = any(k.startswith("transaction.") for k in configs)
        log.info(
            "kafka.transactions auto: %s at %s", "on (the cluster has a transaction "
            "coordinator)" if _txn_support[boot] else "off (the broker describes no "
            "transaction configuration, e.g. tansu)", boot,
        )
    return _txn_support[boot]


def transactional_config(settings: Settings, transactional_id: str) -> dict[str, Any]:
    """Producer properties of a transactional producer. A transaction bounds how long a record
    may wait (librdkafka requires ``message.timeout.ms`` <= ``transaction.timeout.ms``): a
    batch that times out is aborted and sent again, never half-written."""
    timeout_ms = int(settings.kafka.transaction_timeout_s * 1000)
    return {
        "transactional.id": transactional_id,
        "transaction.timeout.ms": timeout_ms,
        "message.timeout.ms": timeout_ms,
        # back-to-back transactions meet the previous one's markers still being written
        # (CONCURRENT_TRANSACTIONS, KAFKA-5477): librdkafka retries requests after this
        # backoff (100 ms by default; it grows exponentially on real trouble). Its
        # AddPartitionsToTxn retry after that error is a fixed 20 ms whatever this says (seen
        # in its debug log; docs/benchmarks.md, 2026-12-04)
        "retry.backoff.ms": 10,
    }


def wrap_kafka_error(err: Any, doing: str, client: Any = None) -> BrokerUnavailable:
    """A KafkaError (or KafkaException) as BrokerUnavailable, keeping ``.code``. With the
    ``client`` that failed (an admin client, or a consumer with nothing assigned), its queued
    error callbacks are served first, so that a refused login or a failed TLS handshake behind
    a timeout is named instead of "transport failure"."""
    if client is not None:
        try:
            client.poll(0.2)
        except Exception:
            log.debug("serving error callbacks failed", exc_info=True)
    inner = (
        err.args[0] if hasattr(err, "args") and err.args and hasattr(err.args[0], "code") else err
    )
    code = inner.code() if hasattr(inner, "code") else None
    text = inner.str() if hasattr(inner, "str") else str(inner)
    # a timeout or transport failure whose real cause is a refused login or a failed TLS
    # handshake says so (and only such errors: a refused record keeps its own reason)
    security = last_security_problem() if code in _MAY_HIDE_SECURITY else None
    if security is not None:
        return BrokerUnavailable(f"cannot use Kafka while {doing}: {security}", code=code)
    return BrokerUnavailable(f"Kafka error while {doing}: {text}", code=code)


_MAY_HIDE_SECURITY = {
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
    KafkaError._RESOLVE,
}
