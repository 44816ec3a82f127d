"""Prometheus metrics for any locoswarm process: the metric set and a loopback exporter.

Generic on purpose: peers and validators export the same names (``validator`` imports
this module; ``protocol`` must not). Each process keeps its own ``CollectorRegistry`` rather than the global one, so
tests and several roles in one process never collide.

Names (all prefixed ``locoswarm_``):

    window                    gauge    the window the process last finished
    heldout_loss              gauge    loss of the global model on held-out sequences
    window_bytes              gauge    bytes of all payloads of the last window
    peers_included            gauge    peers whose payloads counted in the last window
    peer_weight{peer}         gauge    a validator's weight for each peer
    payload_bytes{peer}       gauge    size of each peer's last payload object
    rejections_total{reason}  counter  payloads refused, by check label
    bytes_sent, bytes_received gauge   bytes this process uploaded / downloaded so far
    peer_series_dropped       gauge    peers left without a series by the cap below

Series labelled by peer are capped (``MAX_PEER_SERIES``) and only well-formed peer ids get
one, so a swarm of fresh keys cannot grow a scraper's database without bound: at the end of
each window the series kept are those of the peers that window counted or weighted most.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from protocol.paths import is_peer_id

log = logging.getLogger(__name__)

MAX_PEER_SERIES = 64


class PeerGauge:
    """A gauge labelled by ``peer`` with at most ``cap`` series, for validated ids only."""

    def __init__(self, name: str, doc: str, registry: CollectorRegistry, dropped: Gauge, cap: int = MAX_PEER_SERIES):
        self._gauge = Gauge(name, doc, ["peer"], registry=registry)
        self._dropped = dropped
        self._slots: set[str] = set()
        """Peers that have, or were promised by ``keep``, a series."""
        self._series: set[str] = set()
        self._refused: set[str] = set()
        self.cap = cap

    def set(self, peer: str, value: float) -> bool:
        """Set ``peer``'s series; False (and counted) when the id is malformed or the cap is full."""
        if peer not in self._slots:
            if len(self._slots) >= self.cap or not is_peer_id(peer):
                self._refused.add(peer)
                self._dropped.set(len(self._refused))
                return False
            self._slots.add(peer)
        self._gauge.labels(peer=peer).set(value)
        self._series.add(peer)
        return True

    def keep(self, peers: Iterable[str]) -> None:
        """Keep only the series of ``peers`` (best first, cut at the cap), and hold their slots
        for the next window even if others are set first."""
        self._slots = {p for p in list(dict.fromkeys(peers))[: self.cap] if is_peer_id(p)}
        for peer in self._series - self._slots:
            self._gauge.remove(peer)
        self._series &= self._slots
        self._refused.clear()

    @property
    def peers(self) -> frozenset[str]:
        """Peers with a series now."""
        return frozenset(self._series)


class SwarmMetrics:
    """The gauges and counters above, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.window = Gauge("locoswarm_window", "Window last finished", registry=registry)
        self.heldout_loss = Gauge("locoswarm_heldout_loss", "Held-out loss of the global model", registry=registry)
        self.window_bytes = Gauge("locoswarm_window_bytes", "Bytes of all payloads of the last window", registry=registry)
        self.peers_included = Gauge("locoswarm_peers_included", "Peers counted in the last window", registry=registry)
        self.peer_series_dropped = Gauge("locoswarm_peer_series_dropped",
                                         "Peers this window left without a series by the cap", registry=registry)
        self.peer_weight = PeerGauge("locoswarm_peer_weight", "Validator weight of a peer", registry,
                                     self.peer_series_dropped)
        self.payload_bytes = PeerGauge("locoswarm_payload_bytes", "Size of a peer's last payload", registry,
                                       self.peer_series_dropped)
        self.rejections = Counter("locoswarm_rejections", "Payloads refused, by reason", ["reason"], registry=registry)
        self.bytes_sent = Gauge("locoswarm_bytes_sent", "Bytes uploaded by this process", registry=registry)
        self.bytes_received = Gauge("locoswarm_bytes_received", "Bytes downloaded by this process", registry=registry)


@dataclass
class MetricsServer:
    """A running exporter; ``close`` stops it and frees the port."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5.0)


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread (port 0: any free).

    Binds to loopback by default; expose it wider only behind a reverse proxy you control.
    """
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    server = MetricsServer(httpd, thread)
    log.info("metrics at %s", server.url)
    return server
