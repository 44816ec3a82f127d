"""The validator's web dashboard: who is present, in sync and trusted, the loss, bytes per window.

The validator's loop writes into a ``DashboardState`` (thread-safe: one lock, and every
reader gets a copied snapshot); ``Dashboard`` serves it with the standard library's
``ThreadingHTTPServer`` on 127.0.0.1 by default:

    /             the page, rendered on the server: facts, leaderboard, inline SVG charts,
                  a glossary of every column. No external assets or CDN. A few lines of
                  JavaScript replace its live part from /live every ``refresh_seconds``
                  (without JavaScript the page reloads itself instead).
    /live         the live part alone (HTML)
    /api/state    the same snapshot as JSON
    /metrics      Prometheus exposition of the state's registry (``node.metrics``)

What the page says is what the validator saw, not what it last remembered: a peer that did
not publish in the newest window is shown absent (since when, and for how long), and
whether a peer is in sync comes from the base digest its newest payload was built on.
Everything that came from the network (peer ids, reasons) is HTML-escaped.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from node.accounting import Accounting
from node.metrics import SwarmMetrics
from protocol.scores import PeerScore
from validator.charts import human_bytes, svg_bar_chart, svg_line_chart

log = logging.getLogger(__name__)

SHOWN_COMPONENTS = ("score", "gain_unassigned", "gain_assigned", "evidence", "evidence_ema")
"""Score components shown in the leaderboard, in this order (others are in /api/state)."""

COLUMNS: dict[str, str] = {
    "#": "Rank by this validator's weight; peers absent from the newest window come last.",
    "peer": "The peer's id: the first 24 hex digits of the hash of its public key.",
    "present": "Whether the peer published a payload in the newest window; if not, the last window it "
               "published in, and for how many windows and how long it has been gone.",
    "rating μ ± σ": "This validator's OpenSkill rating of the peer, from how its updates ranked window after "
                    "window: μ is the skill estimate, σ its uncertainty (it grows while the peer is away).",
    "weight": "0 to 1, from the rating's conservative estimate μ − 3σ; a new peer gets 0.5 until it has been "
              "rated 3 times, and the weight decays while the peer is absent.",
    "score": "How much the peer's update lowered the loss, the mean of the two gains below (higher is better).",
    "gain_unassigned": "Loss decrease on data the peer could not know in advance: how much the update helps "
                       "everyone.",
    "gain_assigned": "Loss decrease on the batches the peer was assigned to train on.",
    "evidence": "gain_assigned − gain_unassigned: above 0 when the update fits the peer's own assigned data, "
                "i.e. the peer really trained on it.",
    "evidence_ema": "Moving average of evidence over windows; a peer far below the typical peer's is not "
                    "included.",
    "included": "Whether this validator's scores of the newest window include the peer, and if not, why. A peer "
                "counts in later windows once more than half of the run's trusted validators include it.",
    "in sync": "Whether the peer's newest payload was built on the same global weights as this validator's "
               "(its base digest, shown on hover); – when unknown (absent, or refused before that check).",
    "last payload": "Size of the peer's newest payload object.",
    "last refusal": "Why the peer's newest payload was refused, if it was.",
}
"""Every leaderboard column and what it means: shown under the table, and as header tooltips."""


@dataclass
class PeerView:
    """One leaderboard row."""

    peer: str
    mu: float | None = None
    sigma: float | None = None
    weight: float | None = None
    components: dict[str, float] = field(default_factory=dict)
    included: bool = False
    """This validator includes the peer in its scores of the newest window."""
    excluded_because: str = ""
    """Why this validator does not include the peer, when it was scored and is not."""
    in_sync: bool | None = None
    """Whether the newest payload's base digest is ours; None when unknown (absent, or
    refused before the decoder got to the base digest)."""
    base_digest: str | None = None
    """Hex prefix of the base digest the newest payload was built on, when decoded."""
    payload_bytes: int | None = None
    last_window: int | None = None
    """Last window in which the peer published."""
    last_seen_at: float | None = None
    """Unix time at which we last saw a payload of the peer."""
    reason: str = ""
    """Why the last payload was refused, or empty."""


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class DashboardState:
    """What the dashboard shows; the validator updates it, the server threads read it.

    ``trusted``: the run's manifest trusts this validator's key (peers read its scores);
    ``closer``: it is also one of the run's closers (it takes part in deciding windows).
    """

    def __init__(self, run: str, validator_id: str, *, trusted: bool = True, closer: bool = False,
                 registry: CollectorRegistry | None = None, accounting: Accounting | None = None,
                 history: int = 1000, max_rows: int = 1000, clock: Callable[[], float] = time.time):
        self.run = run
        self.max_rows = max_rows
        self.validator_id = validator_id
        self.trusted = trusted
        self.closer = closer
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = SwarmMetrics(self.registry, run=run, role="validator", accounting=accounting)
        self._lock = threading.Lock()
        self._window: int | None = None
        self._heldout: float | None = None
        self._loss: deque[tuple[int, float]] = deque(maxlen=history)
        self._bytes: deque[tuple[int, int]] = deque(maxlen=history)
        self._peers: dict[str, PeerView] = {}
        self._rejections: dict[str, int] = {}
        self._updated = 0.0

    def finish_window(self, window: int, *, heldout_loss: float | None, payload_bytes: Mapping[str, int]) -> None:
        """Record a finished window: the global model's held-out loss and the size of each
        payload it counted. Peers that published nothing in it are marked absent: not
        included, sync unknown."""
        total = sum(payload_bytes.values())
        now = self.clock()
        with self._lock:
            self._window = window
            self._heldout = _finite(heldout_loss)
            if self._heldout is not None:
                self._loss.append((window, self._heldout))
            self._bytes.append((window, total))
            for peer, size in payload_bytes.items():
                view = self._peers.setdefault(peer, PeerView(peer))
                view.payload_bytes, view.last_window, view.last_seen_at = size, window, now
            for view in self._peers.values():
                if view.last_window is None or view.last_window < window:
                    view.included, view.in_sync, view.excluded_because = False, None, ""
            # Rows, and the metric series that survive into the next window: counted peers
            # first, then by weight, then the most recently seen; a swarm of fresh keys
            # cannot grow either without bound.
            ranked = sorted(self._peers.values(),
                            key=lambda v: (not v.included, -(v.weight or 0.0), -(v.last_window or -1), v.peer))
            self._peers = {v.peer: v for v in ranked[: self.max_rows]}
            self._updated = now
        self.metrics.window.set(window)
        if heldout_loss is not None:
            self.metrics.heldout_loss.set(heldout_loss)
        self.metrics.window_bytes.set(total)
        self.metrics.peers_included.set(len(payload_bytes))
        self.metrics.payload_bytes.keep(v.peer for v in ranked)
        self.metrics.peer_weight.keep(v.peer for v in ranked)
        for peer, size in payload_bytes.items():
            self.metrics.payload_bytes.set(peer, size)

    def update_peer(self, peer: str, **fields: Any) -> None:
        """Set some fields of a peer's row (names of ``PeerView``); unknown names are a bug."""
        with self._lock:
            view = self._peers.setdefault(peer, PeerView(peer))
            for name, value in fields.items():
                if name == "peer" or name not in PeerView.__dataclass_fields__:
                    raise TypeError(f"PeerView has no settable field {name!r}")
                setattr(view, name, value)
            if "last_window" in fields:
                view.last_seen_at = self.clock()
            weight = view.weight
            self._updated = self.clock()
        if weight is not None:
            self.metrics.peer_weight.set(peer, weight)

    def record_scores(self, table: Mapping[str, PeerScore]) -> None:
        """Copy a window's published scores (weight, inclusion, components, rating) into rows."""
        for peer, s in table.items():
            self.update_peer(
                peer,
                weight=s.weight,
                included=s.included,
                components=dict(s.components),
                mu=s.components.get("mu"),
                sigma=s.components.get("sigma"),
            )

    def record_ratings(self, ratings: Mapping[str, tuple[float, float, float]]) -> None:
        """``(mu, sigma, weight)`` of peers that already have a row (absent ones, whose
        ratings keep changing while they are away); others are ignored, so this cannot add
        rows."""
        with self._lock:
            changed = {p: r for p, r in ratings.items() if p in self._peers}
            for peer, (mu, sigma, weight) in changed.items():
                view = self._peers[peer]
                view.mu, view.sigma, view.weight = mu, sigma, weight
        for peer, (_, _, weight) in changed.items():
            self.metrics.peer_weight.set(peer, weight)

    def record_rejection(self, peer: str, check: str, reason: str) -> None:
        """Count a refused payload under its check label and show the reason on its row."""
        with self._lock:
            self._rejections[check] = self._rejections.get(check, 0) + 1
            view = self._peers.setdefault(peer, PeerView(peer))
            view.reason = f"{check}: {reason}"
            view.included = False
        self.metrics.rejected(check)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of everything. Peers present in the newest window come first,
        then by weight (highest first); each says how long it has been absent, if it is."""
        now = self.clock()
        with self._lock:
            peers = [dataclasses.asdict(v) for v in self._peers.values()]
            window = self._window
            snap = {
                "run": self.run,
                "validator": self.validator_id,
                "trusted": self.trusted,
                "closer": self.closer,
                "window": window,
                "heldout_loss": self._heldout,
                "updated_at": self._updated,
                "now": now,
                "loss_curve": [list(p) for p in self._loss],
                "bytes_per_window": [list(p) for p in self._bytes],
                "rejections": dict(sorted(self._rejections.items())),
            }
        for p in peers:
            p["components"] = {k: v for k, v in p["components"].items() if math.isfinite(v)}
            for key in ("mu", "sigma", "weight"):
                p[key] = _finite(p[key])
            p["present"] = window is not None and p["last_window"] == window
            p["absent_windows"] = None if p["present"] or window is None or p["last_window"] is None \
                else window - p["last_window"]
            p["absent_seconds"] = None if p["present"] or p["last_seen_at"] is None \
                else max(0.0, now - p["last_seen_at"])
        peers.sort(key=lambda p: (not p["present"], -(p["weight"] if p["weight"] is not None else -1.0), p["peer"]))
        snap["peers"] = peers
        present = [p for p in peers if p["present"]]
        snap["present"] = len(present)
        snap["in_sync"] = sum(1 for p in present if p["in_sync"])
        snap["absent"] = len(peers) - len(present)
        return snap


# --- page ----------------------------------------------------------------------------------


def human_seconds(s: float) -> str:
    """75 -> '1 min 15 s'; 7300 -> '2 h 1 min'."""
    s = round(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _cell(label: str, value: Any, fmt: Callable[[Any], str] = str, cls: str = "", title: str = "") -> str:
    text = "–" if value is None else fmt(value)
    attrs = f' data-label="{html.escape(label)}"' + (f' class="{cls}"' if cls else "") + \
        (f' title="{html.escape(title)}"' if title else "")
    return f"<td{attrs}>{html.escape(text)}</td>"


def _presence(p: Mapping[str, Any]) -> str:
    if p["present"]:
        return "yes"
    if p["absent_windows"] is None:
        return "never published"
    n = p["absent_windows"]
    gone = f"{n} window{'s' if n != 1 else ''}" + (f", {human_seconds(p['absent_seconds'])}"
                                                   if p["absent_seconds"] is not None else "")
    return f"absent since window {p['last_window']} ({gone})"


def _row(rank: int, p: Mapping[str, Any]) -> str:
    comps = p["components"]
    rating = None if p["mu"] is None else f"{p['mu']:.1f} ± {p['sigma'] or 0:.1f}"
    sync = None if p["in_sync"] is None else ("yes" if p["in_sync"] else "NO")
    cells = [
        _cell("#", rank),
        _cell("peer", p["peer"], cls="mono"),
        _cell("present", _presence(p), cls="present" if p["present"] else "absent"),
        _cell("rating μ ± σ", rating),
        _cell("weight", p["weight"], lambda w: f"{w:.3f}"),
        *(_cell(c, comps.get(c), _fmt) for c in SHOWN_COMPONENTS),
        _cell("included", "yes" if p["included"] else ("no: " + p["excluded_because"] if p["excluded_because"] else "no"),
              cls="" if p["included"] else "why"),
        _cell("in sync", sync, cls="sync", title=f"base digest {p['base_digest']}" if p["base_digest"] else ""),
        _cell("last payload", p["payload_bytes"], human_bytes),
        _cell("last refusal", p["reason"] or None, cls="reason"),
    ]
    classes = "peer-row" + ("" if p["present"] else " absent") + ("" if p["included"] else " excluded")
    return f'<tr class="{classes}" data-peer="{html.escape(p["peer"])}">{"".join(cells)}</tr>'


def _trust(snap: Mapping[str, Any]) -> str:
    if not snap["trusted"]:
        return ('<p id="trust" class="untrusted">This validator is <b>not trusted</b> by the run: its key is not in '
                "the manifest's <code>validators.keys</code>, so peers ignore its scores. What it shows is still what "
                "it saw.</p>")
    role = "trusted by the run and one of its closers (it takes part in deciding windows)" if snap["closer"] \
        else "trusted by the run: peers read its scores"
    return f'<p id="trust" class="trusted">This validator is {role}.</p>'


def render_live(snap: Mapping[str, Any]) -> str:
    """The part of the page that changes: facts, leaderboard, charts and refusals."""
    e = html.escape
    peers = snap["peers"]
    loss = snap["heldout_loss"]
    updated = "never" if not snap["updated_at"] else f"{human_seconds(snap['now'] - snap['updated_at'])} ago"
    header = "".join(f'<th title="{e(doc)}">{e(name).replace("_", "_<wbr>")}</th>' for name, doc in COLUMNS.items())
    rows = "".join(_row(rank, p) for rank, p in enumerate(peers, 1))
    rejections = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in snap["rejections"].items())
    return f"""{_trust(snap)}
<p class="facts"><span>window <b id="window">{'–' if snap['window'] is None else snap['window']}</b></span>
<span>held-out loss <b id="heldout">{'–' if loss is None else _fmt(loss)}</b></span>
<span>peers present <b id="present">{snap['present']}</b></span>
<span>in sync <b id="sync">{snap['in_sync']} of {snap['present']}</b></span>
<span>absent <b id="absent">{snap['absent']}</b></span>
<span>updated <b id="updated">{updated}</b></span></p>
<h2>Leaderboard</h2>
<div class="wide"><table id="leaderboard"><thead><tr>{header}</tr></thead><tbody>
{rows or f'<tr><td colspan="{len(COLUMNS)}">no peers yet</td></tr>'}
</tbody></table></div>
<div class="charts">
<div><h2>Held-out loss</h2>{svg_line_chart(snap['loss_curve'], svg_id='loss-curve', title='held-out loss per window')}</div>
<div><h2>Bytes per window</h2>{svg_bar_chart(snap['bytes_per_window'], svg_id='bytes-chart',
                                              title='bytes of the payloads each window counted')}</div>
</div>
<h2>Refusals</h2>
<table id="rejections"><thead><tr><th>check</th><th>count</th></tr></thead><tbody>
{rejections or '<tr><td colspan="2">none</td></tr>'}
</tbody></table>"""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; overflow-wrap: anywhere; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.2em; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; cursor: help; white-space: normal; overflow-wrap: normal; } .mono { font-family: monospace; text-align: left; }
td.reason { text-align: left; color: #a33; max-width: 18em; white-space: normal; }
td.absent { color: #a60; white-space: normal; max-width: 12em; } td.why { white-space: normal; max-width: 14em; } tr.excluded td { color: #888; } tr.absent td.absent { color: #a60; }
.wide { max-width: 100%; overflow-x: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; } .charts > div { flex: 1 1 300px; max-width: 480px; }
svg.chart { width: 100%; height: auto; display: block; }
.facts { display: flex; flex-wrap: wrap; gap: 0.3em 1.5em; }
.untrusted { background: #fde8e8; border: 1px solid #c33; padding: 0.5em; }
.trusted { color: #264; }
dl#glossary dt { font-weight: 600; margin-top: 0.4em; } dl#glossary dd { margin-left: 1.2em; }
@media (max-width: 760px) {
  #leaderboard thead { display: none; }
  #leaderboard, #leaderboard tbody, #leaderboard tr, #leaderboard td { display: block; }
  #leaderboard tr { border: 1px solid #bbb; margin-bottom: 0.7em; }
  #leaderboard td { border: none; border-bottom: 1px solid #eee; white-space: normal; text-align: right;
                    max-width: none; }
  #leaderboard td::before { content: attr(data-label); float: left; font-weight: 600; color: #444;
                            margin-right: 1em; }
}
"""

_SCRIPT = """
(function () {
  var every = %d * 1000;
  function refresh() {
    fetch("/live", {cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error(r.status);
      return r.text();
    }).then(function (text) {
      document.getElementById("live").innerHTML = text;
      document.getElementById("stale").hidden = true;
    }).catch(function () {
      document.getElementById("stale").hidden = false;
    });
  }
  setInterval(refresh, every);
})();
"""


def render_html(snap: Mapping[str, Any], *, refresh_seconds: int = 10) -> str:
    """The whole dashboard page for one snapshot (pure function of the snapshot)."""
    e = html.escape
    glossary = "".join(f"<dt>{e(name)}</dt><dd>{e(doc)}</dd>" for name, doc in COLUMNS.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="{int(refresh_seconds)}"></noscript>
<title>locoswarm validator · {e(snap['run'])}</title>
<style>{_STYLE}</style></head><body>
<h1>locoswarm validator</h1>
<p class="facts"><span>run <b>{e(snap['run'])}</b></span><span>validator <b class="mono">{e(snap['validator'])}</b></span></p>
<p id="stale" hidden>The validator does not answer; what is shown may be out of date.</p>
<main id="live">
{render_live(snap)}
</main>
<h2>What the columns mean</h2>
<dl id="glossary">{glossary}</dl>
<p><a href="/api/state">/api/state</a> · <a href="/metrics">/metrics</a></p>
<script>{_SCRIPT % int(refresh_seconds)}</script>
</body></html>
"""


# --- server --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            body = render_html(self.server.state.snapshot(), refresh_seconds=self.server.refresh_seconds).encode()
            self._send(200, "text/html; charset=utf-8", body)
        elif path == "/live":
            self._send(200, "text/html; charset=utf-8", render_live(self.server.state.snapshot()).encode())
        elif path == "/api/state":
            self._send(200, "application/json", json.dumps(self.server.state.snapshot()).encode())
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.state.registry))
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: DashboardState, refresh_seconds: int):
        self.state = state
        self.refresh_seconds = refresh_seconds
        super().__init__(address, _Handler)


class Dashboard:
    """Serve a ``DashboardState`` over HTTP from a background thread."""

    def __init__(self, state: DashboardState, *, host: str = "127.0.0.1", port: int = 0, refresh_seconds: int = 10):
        self._server = _Server((host, port), state, refresh_seconds)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="dashboard", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> Dashboard:
        self._thread.start()
        log.info("dashboard at %s", self.url)
        return self

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
