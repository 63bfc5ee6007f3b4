"""A peer's Prometheus metrics, in a registry of its own (peers in one test process keep their
counts apart): what its exchanges moved and took, its training time, its heartbeats' round
trips, and the rounds and failures it reported. The runner and the round code update them at
their edges."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from dml.common.metrics import SECONDS_BUCKETS
from dml.v1 import control_pb2


class PeerMetrics:
    """The peer's counters and histograms (names ``dml_peer_*``), in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.bytes_sent = Counter("dml_peer_exchange_bytes_sent", "Parameter bytes sent to other peers "
                                  "(ring frames with their headers, gossip parameters)", ["aggregation"], registry=r)
        self.bytes_received = Counter("dml_peer_exchange_bytes_received", "Parameter bytes received from other "
                                      "peers (ring frames with their headers, gossip parameters)", ["aggregation"],
                                      registry=r)
        self.exchange_seconds = Histogram("dml_peer_exchange_seconds", "Time one round's all-reduce or one gossip "
                                          "step's exchange took", ["aggregation"], buckets=SECONDS_BUCKETS, registry=r)
        self.train_seconds = Histogram("dml_peer_train_seconds", "Time one round's or step's preparation and "
                                       "training took", ["aggregation"], buckets=SECONDS_BUCKETS, registry=r)
        self.heartbeat_seconds = Histogram("dml_peer_heartbeat_latency_seconds",
                                           "Round trip of a heartbeat the coordinator answered",
                                           buckets=SECONDS_BUCKETS, registry=r)
        self.heartbeat_failures = Counter("dml_peer_heartbeat_failures", "Heartbeats the coordinator did not "
                                          "answer, by status code", ["code"], registry=r)
        self.rounds_reported = Counter("dml_peer_rounds_reported", "Ring rounds and gossip steps reported to the "
                                       "coordinator", ["aggregation"], registry=r)
        self.failures_reported = Counter("dml_peer_failures_reported", "Exchange failures reported to the "
                                         "coordinator, by kind (dml.v1.FailureKind)", ["kind"], registry=r)

    def exchanged(self, aggregation: str, sent: int, received: int) -> None:
        """Bytes one exchange moved each way."""
        if sent > 0:
            self.bytes_sent.labels(aggregation).inc(sent)
        if received > 0:
            self.bytes_received.labels(aggregation).inc(received)

    def reported(self, aggregation: str, train_s: float, exchange_s: float) -> None:
        """One round (or gossip step) reported, with the time its training and exchange took."""
        self.rounds_reported.labels(aggregation).inc()
        self.train_seconds.labels(aggregation).observe(max(train_s, 0.0))
        self.exchange_seconds.labels(aggregation).observe(max(exchange_s, 0.0))

    def failure_reported(self, kind: int) -> None:
        """One failure reported, of ``kind`` (a ``dml.v1.FailureKind`` value)."""
        try:
            name = control_pb2.FailureKind.Name(kind).removeprefix("FAILURE_KIND_")
        except ValueError:
            name = str(kind)
        self.failures_reported.labels(name).inc()
