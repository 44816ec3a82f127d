"""The validator's web dashboard: a leaderboard, a loss curve, bytes per window, sync state.

The validator's loop writes into a ``DashboardState`` (thread-safe: one lock, and every
reader gets a copied snapshot); ``Dashboard`` serves it with the standard library's
``ThreadingHTTPServer`` on 127.0.0.1 by default:

    /             HTML page rendered on the server: tables plus inline SVG charts. No
                  JavaScript, no external assets or CDN; the page reloads itself every
                  ``refresh_seconds``.
    /api/state    the same snapshot as JSON
    /metrics      Prometheus exposition of the state's registry (``node.metrics``)

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from node.metrics import SwarmMetrics
from protocol.scores import PeerScore

log = logging.getLogger(__name__)

SHOWN_COMPONENTS = ("score", "gain_unassigned", "gain_assigned", "evidence", "evidence_ema")
"""Score components shown in the leaderboard, in this order (others are in /api/state)."""


@dataclass
class PeerView:
    """One leaderboard row."""

    peer: str
    mu: float | None = None
    sigma: float | None = None
    weight: float | None = None
    components: dict[str, float] = field(default_factory=dict)
    included: bool = False
    in_sync: bool | None = None
    """False when the peer's last payload was built on other base weights (out of sync)."""
    payload_bytes: int | None = None
    last_window: int | None = None
    """Last window in which the peer published."""
    reason: str = ""
    """Why the last payload was refused, or empty."""


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class DashboardState:
    """What the dashboard shows; the validator updates it, the server threads read it."""

    def __init__(self, run: str, validator_id: str, *, registry: CollectorRegistry | None = None, history: int = 1000,
                 max_rows: int = 1000):
        self.run = run
        self.max_rows = max_rows
        self.validator_id = validator_id
        self.registry = registry or CollectorRegistry()
        self.metrics = SwarmMetrics(self.registry)
        self._lock = threading.Lock()
        self._window: int | None = None
        self._heldout: float | None = None
        self._loss: deque[tuple[int, float]] = deque(maxlen=history)
        self._bytes: deque[tuple[int, int]] = deque(maxlen=history)
        self._peers: dict[str, PeerView] = {}
        self._rejections: dict[str, int] = {}
        self._updated = 0.0

    def finish_window(self, window: int, *, heldout_loss: float | None, payload_bytes: Mapping[str, int]) -> None:
        """Record a finished window: the global model's held-out loss and each payload's size."""
        total = sum(payload_bytes.values())
        with self._lock:
            self._window = window
            self._heldout = _finite(heldout_loss)
            if self._heldout is not None:
                self._loss.append((window, self._heldout))
            self._bytes.append((window, total))
            for peer, size in payload_bytes.items():
                view = self._peers.setdefault(peer, PeerView(peer))
                view.payload_bytes, view.last_window = size, window
            included = sum(1 for v in self._peers.values() if v.included)
            # Rows, and the metric series that survive into the next window: counted peers
            # first, then by weight, then the most recently seen; a swarm of fresh keys
            # cannot grow either without bound.
            ranked = sorted(self._peers.values(),
                            key=lambda v: (not v.included, -(v.weight or 0.0), -(v.last_window or -1), v.peer))
            self._peers = {v.peer: v for v in ranked[: self.max_rows]}
            self._updated = time.time()
        self.metrics.window.set(window)
        if heldout_loss is not None:
            self.metrics.heldout_loss.set(heldout_loss)
        self.metrics.window_bytes.set(total)
        self.metrics.peers_included.set(included)
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
            weight = view.weight
            self._updated = time.time()
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

    def record_rejection(self, peer: str, check: str, reason: str) -> None:
        """Count a refused payload under its check label and show the reason on its row."""
        with self._lock:
            self._rejections[check] = self._rejections.get(check, 0) + 1
            view = self._peers.setdefault(peer, PeerView(peer))
            view.reason = f"{check}: {reason}"
            view.included = False
            if check == "out_of_sync":
                view.in_sync = False
        self.metrics.rejections.labels(reason=check).inc()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of everything, peers sorted by weight (highest first)."""
        with self._lock:
            peers = [dataclasses.asdict(v) for v in self._peers.values()]
            snap = {
                "run": self.run,
                "validator": self.validator_id,
                "window": self._window,
                "heldout_loss": self._heldout,
                "updated_at": self._updated,
                "loss_curve": [list(p) for p in self._loss],
                "bytes_per_window": [list(p) for p in self._bytes],
                "rejections": dict(sorted(self._rejections.items())),
            }
        for p in peers:
            p["components"] = {k: v for k, v in p["components"].items() if math.isfinite(v)}
            for key in ("mu", "sigma", "weight"):
                p[key] = _finite(p[key])
        peers.sort(key=lambda p: (-(p["weight"] if p["weight"] is not None else -1.0), p["peer"]))
        snap["peers"] = peers
        return snap


# --- rendering -----------------------------------------------------------------------------

_W, _H = 560, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 16, 36


def _axis_range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _chart_frame(
    svg_id: str, title: str, xs: Sequence[float], y_range: tuple[float, float], y_fmt: Any
) -> tuple[list[str], Any, Any]:
    """Open an SVG with a plot area, grid and tick labels; returns (parts, x->px, y->px)."""
    x0, x1 = _axis_range(xs)
    y0, y1 = y_range
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return _TOP + (1.0 - (y - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}">',
        f"<title>{html.escape(title)}</title>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
    ]
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="11">{y_fmt(y)}</text>')
    lo_w, hi_w = min(xs), max(xs)
    for w in sorted({lo_w, hi_w, round((lo_w + hi_w) / 2)}):
        parts.append(f'<text x="{px(w):.1f}" y="{_H - _BOTTOM + 16}" text-anchor="middle" font-size="11">{int(w)}</text>')
    parts.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 4}" text-anchor="middle" font-size="11">window</text>')
    return parts, px, py


def _empty_chart(svg_id: str, title: str) -> str:
    return (
        f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
        f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" font-size="13" fill="#777">no data yet</text></svg>'
    )


def svg_line_chart(points: Sequence[tuple[float, float]], *, svg_id: str, title: str) -> str:
    """An inline SVG line chart of (window, value) points, e.g. the held-out loss curve."""
    if not points:
        return _empty_chart(svg_id, title)
    parts, px, py = _chart_frame(svg_id, title, [p[0] for p in points], _axis_range([p[1] for p in points]), _fmt)
    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
    parts.append(f'<polyline class="curve" points="{coords}" fill="none" stroke="#1f6fb2" stroke-width="2"/>')
    x, y = points[-1]
    parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="#1f6fb2"><title>window {int(x)}: {_fmt(y)}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bar_chart(points: Sequence[tuple[float, float]], *, svg_id: str, title: str) -> str:
    """An inline SVG bar chart of (window, bytes) points, y axis from zero."""
    if not points:
        return _empty_chart(svg_id, title)
    top = max(p[1] for p in points)
    parts, px, py = _chart_frame(svg_id, title, [p[0] for p in points], (0.0, 1.05 * top if top > 0 else 1.0), human_bytes)
    n = len(points)
    span = (px(max(p[0] for p in points)) - px(min(p[0] for p in points))) / max(1, n - 1) if n > 1 else 24.0
    bar = max(1.0, min(24.0, 0.7 * span))
    for x, y in points:
        y_px = py(y)
        parts.append(
            f'<rect class="bar" x="{px(x) - bar / 2:.1f}" y="{y_px:.1f}" width="{bar:.1f}" height="{py(0.0) - y_px:.1f}" '
            f'fill="#4a9a5c"><title>window {int(x)}: {human_bytes(y)}</title></rect>'
        )
    parts.append("</svg>")
    return "".join(parts)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _cell(value: Any, fmt: Any = str) -> str:
    return "<td>–</td>" if value is None else f"<td>{html.escape(fmt(value))}</td>"


def render_html(snap: Mapping[str, Any], *, refresh_seconds: int = 10) -> str:
    """The dashboard page for one snapshot (pure function of the snapshot)."""
    e = html.escape
    peers = snap["peers"]
    synced = sum(1 for p in peers if p["in_sync"] is not False)
    rows = []
    for rank, p in enumerate(peers, 1):
        comps = p["components"]
        rating = None if p["mu"] is None else f"{p['mu']:.1f} ± {p['sigma'] or 0:.1f}"
        sync = "–" if p["in_sync"] is None else ("yes" if p["in_sync"] else "NO")
        rows.append(
            f'<tr class="peer-row{" excluded" if not p["included"] else ""}" data-peer="{e(p["peer"])}">'
            f"<td>{rank}</td><td class=\"mono\">{e(p['peer'])}</td>"
            f"{_cell(rating)}{_cell(p['weight'], lambda w: f'{w:.3f}')}"
            + "".join(_cell(comps.get(c), _fmt) for c in SHOWN_COMPONENTS)
            + f"<td>{'yes' if p['included'] else 'no'}</td><td>{sync}</td>"
            f"{_cell(p['payload_bytes'], human_bytes)}{_cell(p['last_window'])}"
            f"<td class=\"reason\">{e(p['reason'])}</td></tr>"
        )
    header = "".join(
        f"<th>{h}</th>"
        for h in ("#", "peer", "rating μ ± σ", "weight", *SHOWN_COMPONENTS, "included", "in sync", "last payload",
                  "last window", "last refusal")
    )
    rejections = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in snap["rejections"].items())
    loss = snap["heldout_loss"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{int(refresh_seconds)}">
<title>locoswarm validator · {e(snap['run'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; }} h2 {{ font-size: 1.1em; margin-top: 1.4em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; }} td.mono {{ font-family: monospace; text-align: left; }}
td.reason {{ text-align: left; color: #a33; max-width: 28em; white-space: normal; }}
tr.excluded td {{ color: #888; }} .charts {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
.facts span {{ margin-right: 1.5em; }}
</style></head><body>
<h1>locoswarm validator</h1>
<p class="facts"><span>run <b>{e(snap['run'])}</b></span><span>validator <b class="mono">{e(snap['validator'])}</b></span>
<span>window <b id="window">{'–' if snap['window'] is None else snap['window']}</b></span>
<span>held-out loss <b id="heldout">{'–' if loss is None else _fmt(loss)}</b></span>
<span>peers in sync <b id="sync">{synced} / {len(peers)}</b></span></p>
<h2>Leaderboard</h2>
<table id="leaderboard"><thead><tr>{header}</tr></thead><tbody>
{''.join(rows) or '<tr><td colspan="15">no peers yet</td></tr>'}
</tbody></table>
<div class="charts">
<div><h2>Held-out loss</h2>{svg_line_chart(snap['loss_curve'], svg_id='loss-curve', title='held-out loss per window')}</div>
<div><h2>Bytes per window</h2>{svg_bar_chart(snap['bytes_per_window'], svg_id='bytes-chart', title='payload bytes per window')}</div>
</div>
<h2>Refusals</h2>
<table id="rejections"><thead><tr><th>check</th><th>count</th></tr></thead><tbody>
{rejections or '<tr><td colspan="2">none</td></tr>'}
</tbody></table>
<p><a href="/api/state">/api/state</a> · <a href="/metrics">/metrics</a></p>
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

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
