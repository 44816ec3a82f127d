"""The validator dashboard: state, JSON and Prometheus endpoints, and the page in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from node.metrics import MAX_PEER_SERIES, start_metrics_server
from protocol.scores import PeerScore
from validator.dashboard import (
    Dashboard,
    DashboardState,
    human_bytes,
    svg_bar_chart,
    svg_line_chart,
)

PEERS = [f"{i:02d}" + "ab" * 11 for i in range(5)]


def populated() -> DashboardState:
    state = DashboardState("demo@0123456789abcdef", "f" * 24)
    for w in range(20):
        state.finish_window(w, heldout_loss=7.0 * 0.93**w + 1.0, payload_bytes={p: 40_000 + 1000 * i for i, p in enumerate(PEERS)})
    state.record_scores(
        {
            p: PeerScore(
                weight=0.9 - 0.2 * i,
                included=i < 3,
                components={"score": 0.05 / (i + 1), "gain_unassigned": 0.03, "evidence": 0.01, "mu": 30.0 - i, "sigma": 6.0},
            )
            for i, p in enumerate(PEERS)
        }
    )
    state.update_peer(PEERS[0], in_sync=True)
    state.record_rejection(PEERS[4], "copy", "copy of <b>someone</b>'s earlier payload")
    state.record_rejection(PEERS[3], "out_of_sync", "base digest differs")
    return state


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def dashboard():
    with Dashboard(populated()) as d:
        yield d


def test_dashboard_binds_loopback_on_a_free_port(dashboard: Dashboard):
    assert dashboard.url.startswith("http://127.0.0.1:") and not dashboard.url.endswith(":0/")


def test_api_state_lists_peers_by_weight_with_curve_and_bytes(dashboard: Dashboard):
    status, ctype, body = get(dashboard.url + "api/state")
    snap = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert [p["peer"] for p in snap["peers"]] == PEERS
    assert snap["window"] == 19 and len(snap["loss_curve"]) == 20
    assert snap["bytes_per_window"][-1] == [19, sum(40_000 + 1000 * i for i in range(5))]
    assert snap["rejections"] == {"copy": 1, "out_of_sync": 1}
    by_peer = {p["peer"]: p for p in snap["peers"]}
    assert by_peer[PEERS[3]]["in_sync"] is False and by_peer[PEERS[0]]["in_sync"] is True
    assert by_peer[PEERS[0]]["mu"] == 30.0 and by_peer[PEERS[0]]["included"]


def test_metrics_endpoint_exports_window_weights_and_rejections(dashboard: Dashboard):
    status, ctype, body = get(dashboard.url + "metrics")
    text = body.decode()
    assert status == 200 and ctype.startswith("text/plain")
    assert "locoswarm_window 19.0" in text
    assert f'locoswarm_peer_weight{{peer="{PEERS[0]}"}} 0.9' in text
    assert f'locoswarm_payload_bytes{{peer="{PEERS[1]}"}} 41000.0' in text
    assert 'locoswarm_rejections_total{reason="copy"} 1.0' in text
    assert "locoswarm_heldout_loss" in text


def test_a_swarm_of_fresh_keys_cannot_grow_the_series_or_the_rows():
    """5000 fresh ids, some malformed: series stay under the cap and go to the counted peers."""
    state = DashboardState("run", "f" * 24, max_rows=100)
    swarm = [f"{i:024x}" for i in range(5000)] + ['<b>x</b>\n# HELP forged', "AB" * 12]
    for window in range(2):  # the swarm scored first fills the cap; the window's end makes room
        state.record_scores({p: PeerScore(weight=0.1, included=False) for p in swarm})
        state.record_scores({p: PeerScore(weight=0.9, included=True) for p in PEERS})
        state.finish_window(window, heldout_loss=5.0, payload_bytes=dict.fromkeys(swarm + PEERS, 100))
    text = generate_latest(state.registry).decode()
    series = [line for line in text.splitlines() if line.startswith("locoswarm_peer_weight{")]
    assert len(series) <= MAX_PEER_SERIES and "forged" not in text and "AB" * 12 not in text
    assert all(f'peer="{p}"' in text for p in PEERS)  # the counted peers kept theirs
    assert len(state.snapshot()["peers"]) == 100
    dropped = [line for line in text.splitlines() if line.startswith("locoswarm_peer_series_dropped ")]
    assert float(dropped[0].split()[1]) > 0


def test_page_escapes_text_from_the_network(dashboard: Dashboard):
    _, ctype, body = get(dashboard.url)
    page = body.decode()
    assert ctype.startswith("text/html")
    assert "copy of &lt;b&gt;someone&lt;/b&gt;" in page and "<b>someone</b>" not in page


def test_unknown_path_is_404(dashboard: Dashboard):
    assert get(dashboard.url + "nope")[0] == 404


def test_unknown_peer_field_is_refused():
    with pytest.raises(TypeError, match="no settable field"):
        DashboardState("r", "v").update_peer(PEERS[0], colour="red")


def test_non_finite_loss_is_left_out_of_the_curve_and_json():
    state = DashboardState("r", "v")
    state.finish_window(0, heldout_loss=float("nan"), payload_bytes={})
    state.finish_window(1, heldout_loss=3.0, payload_bytes={})
    snap = state.snapshot()
    assert snap["loss_curve"] == [[1, 3.0]]
    json.loads(json.dumps(snap, allow_nan=False))


def test_charts_render_points_and_an_empty_state():
    assert "no data yet" in svg_line_chart([], svg_id="x", title="t")
    line = svg_line_chart([(0, 5.0), (1, 4.0), (2, 3.5)], svg_id="x", title="t")
    assert line.count(",") >= 3 and 'class="curve"' in line
    assert svg_bar_chart([(0, 100.0), (1, 200.0)], svg_id="b", title="t").count('class="bar"') == 2
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"


def test_metrics_server_serves_a_dedicated_registry():
    registry = CollectorRegistry()
    Counter("locoswarm_test_events", "events", registry=registry).inc(3)
    server = start_metrics_server(0, registry)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        _, _, body = get(server.url)
        assert "locoswarm_test_events_total 3.0" in body.decode()
    finally:
        server.close()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def test_leaderboard_and_loss_curve_render_in_a_real_browser(dashboard: Dashboard, tmp_path):
    if _chromium() is None:
        print("skipping: chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    dom = _browser(tmp_path, "--dump-dom", dashboard.url).stdout
    for peer in PEERS:
        assert f'data-peer="{peer}"' in dom
    assert dom.count('class="peer-row') == len(PEERS)
    assert '<svg id="loss-curve"' in dom and '<polyline class="curve"' in dom
    assert dom.count('class="bar"') == 20
    shot = tmp_path / "dashboard.png"
    _browser(tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars", dashboard.url)
    assert shot.exists() and shot.stat().st_size > 10_000
