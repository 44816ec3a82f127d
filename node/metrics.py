"""Prometheus metrics for any locoswarm process: the metric set and a loopback exporter.

Generic on purpose: peers and validators export the same names (``validator`` imports
this module; ``protocol`` must not). Each process keeps its own ``CollectorRegistry`` rather
than the global one, so tests and several roles in one process never collide.

Names follow Prometheus conventions (base units in the name, ``_total`` on counters); every
series carries the ``run`` label, and ``locoswarm_build_info`` says which version and role
exports them (join on ``run`` to see the version next to any series):

    build_info{run,version,role}           gauge    always 1
    window{run}                            gauge    the window the process last finished
    heldout_loss{run}                      gauge    loss of the global model on held-out sequences
    window_bytes{run}                      gauge    bytes of all payloads the last window counted
    peers_included{run}                    gauge    peers whose payloads counted in the last window
    peer_weight{run,peer}                  gauge    a validator's weight for each peer
    payload_bytes{run,peer}                gauge    size of each peer's last counted payload object
    rejections_total{run,reason}           counter  payloads refused, by check label
    sent_bytes_total{run}                  counter  bytes this process uploaded      } read from the
    received_bytes_total{run}              counter  bytes this process downloaded    } process's
    tokens_total{run}                      counter  tokens trained on                } ``Accounting``
    phase_seconds_total{run,phase}         counter  seconds spent per phase          } at scrape time
    store_errors_total{run}                counter  store operations failed after retries }
    peer_series_dropped{run}               gauge    peers left without a series by the cap below

Series labelled by peer are capped (``MAX_PEER_SERIES``) and only well-formed peer ids get
one, so a swarm of fresh keys cannot grow a scraper's database without bound: at the end of
each window the series kept are those of the peers that window counted or weighted most.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from node.accounting import Accounting
from protocol.paths import is_peer_id

log = logging.getLogger(__name__)

MAX_PEER_SERIES = 64


def package_version() -> str:
    """The installed locoswarm version ("0+unknown" when run from a source tree)."""
    try:
        return importlib.metadata.version("locoswarm")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class PeerGauge:
    """A gauge labelled by ``peer`` with at most ``cap`` series, for validated ids only."""

    def __init__(self, name: str, doc: str, registry: CollectorRegistry, dropped: Gauge, *, run: str,
                 cap: int = MAX_PEER_SERIES):
        self._gauge = Gauge(name, doc, ["run", "peer"], registry=registry)
        self._run = run
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
        self._gauge.labels(run=self._run, peer=peer).set(value)
        self._series.add(peer)
        return True

    def keep(self, peers: Iterable[str]) -> None:
        """Keep only the series of ``peers`` (best first, cut at the cap), and hold their slots
        for the next window even if others are set first."""
        self._slots = {p for p in list(dict.fromkeys(peers))[: self.cap] if is_peer_id(p)}
        for peer in self._series - self._slots:
            self._gauge.remove(self._run, peer)
        self._series &= self._slots
        self._refused.clear()

    @property
    def peers(self) -> frozenset[str]:
        """Peers with a series now."""
        return frozenset(self._series)


class AccountingCollector(Collector):
    """The totals of an ``Accounting`` as counters, read when scraped: the process keeps
    counting in one place and the exporter can never disagree with it."""

    def __init__(self, accounting: Accounting, run: str):
        self.acct = accounting
        self.run = run

    def collect(self) -> Iterator[Metric]:
        acct, run = self.acct, [self.run]
        for name, doc, value in (
            ("locoswarm_sent_bytes", "Bytes uploaded by this process", acct.bytes_up),
            ("locoswarm_received_bytes", "Bytes downloaded by this process", acct.bytes_down),
            ("locoswarm_tokens", "Tokens this process trained on", acct.tokens),
            ("locoswarm_store_errors", "Store operations that failed after all retries", acct.store_errors),
        ):
            family = CounterMetricFamily(name, doc, labels=["run"])
            family.add_metric(run, float(value))
            yield family
        phases = CounterMetricFamily("locoswarm_phase_seconds", "Seconds spent per phase of a window",
                                     labels=["run", "phase"])
        for phase, seconds in sorted(acct.seconds.items()):
            phases.add_metric([self.run, phase], float(seconds))
        yield phases


class SwarmMetrics:
    """The metrics above, registered in ``registry`` for one run; ``role`` is "peer" or
    "validator". With ``accounting``, its totals are exported as counters."""

    def __init__(self, registry: CollectorRegistry, *, run: str, role: str,
                 accounting: Accounting | None = None) -> None:
        self.registry = registry
        self.run = run

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["run"], registry=registry).labels(run=run)

        Gauge("locoswarm_build_info", "Version and role of the process exporting these series",
              ["run", "version", "role"], registry=registry).labels(run=run, version=package_version(), role=role).set(1)
        self.window = gauge("locoswarm_window", "Window last finished")
        self.heldout_loss = gauge("locoswarm_heldout_loss", "Held-out loss of the global model")
        self.window_bytes = gauge("locoswarm_window_bytes", "Bytes of all payloads the last window counted")
        self.peers_included = gauge("locoswarm_peers_included", "Peers counted in the last window")
        self.peer_series_dropped = gauge("locoswarm_peer_series_dropped",
                                         "Peers this window left without a series by the cap")
        self.peer_weight = PeerGauge("locoswarm_peer_weight", "Validator weight of a peer", registry,
                                     self.peer_series_dropped, run=run)
        self.payload_bytes = PeerGauge("locoswarm_payload_bytes", "Size of a peer's last counted payload", registry,
                                       self.peer_series_dropped, run=run)
        self._rejections = Counter("locoswarm_rejections", "Payloads refused, by reason", ["run", "reason"],
                                   registry=registry)
        if accounting is not None:
            registry.register(AccountingCollector(accounting, run))

    def rejected(self, reason: str) -> None:
        """Count one refused payload under its check label (a fixed vocabulary, never text
        from the network)."""
        self._rejections.labels(run=self.run, reason=reason).inc()


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
