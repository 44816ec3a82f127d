"""The validator dashboard: state, JSON and Prometheus endpoints, and the page in a real browser."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import struct
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.accounting import Accounting
from node.metrics import MAX_PEER_SERIES, SwarmMetrics, start_metrics_server
from protocol.scores import PeerScore
from validator.charts import human_bytes, nice_ticks, svg_bar_chart, svg_line_chart
from validator.dashboard import COLUMNS, Dashboard, DashboardState, render_html

PEERS = [f"{i:02d}" + "ab" * 11 for i in range(5)]
GONE = PEERS[4]
"""Publishes in windows 0-12 of 20, then leaves."""
WINDOW_SECONDS = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def play_window(state: DashboardState, w: int, publishing: list[str], *, out_of_sync: tuple[str, ...] = ()) -> None:
    """What the validator does for one window: verdicts, scores, then the window's end."""
    for i, p in enumerate(publishing):
        ok = p not in out_of_sync
        if not ok:
            state.record_rejection(p, "out_of_sync", "base digest differs")
        state.update_peer(p, in_sync=ok, base_digest="ab12cd34ef56" if ok else None, payload_bytes=40_000 + 1000 * i,
                          last_window=w, excluded_because="" if ok else "its payload failed a check")
    state.record_scores({
        p: PeerScore(weight=0.9 - 0.2 * PEERS.index(p), included=p not in out_of_sync,
                     components={"score": 0.05 / (PEERS.index(p) + 1), "gain_unassigned": 0.03, "evidence": 0.01,
                                 "mu": 30.0 - PEERS.index(p), "sigma": 6.0})
        for p in publishing
    })
    state.finish_window(w, heldout_loss=7.0 * 0.93**w + 1.0,
                        payload_bytes={p: 40_000 + 1000 * i for i, p in enumerate(publishing) if p not in out_of_sync})


def populated(clock: Clock | None = None, *, trusted: bool = True) -> DashboardState:
    clock = clock or Clock()
    state = DashboardState("demo@0123456789abcdef", "f" * 24, trusted=trusted, clock=clock)
    for w in range(20):
        if w == 12:
            state.record_rejection(GONE, "copy", "copy of <b>someone</b>'s earlier payload")
        play_window(state, w, PEERS if w <= 12 else PEERS[:4], out_of_sync=(PEERS[3],) if w == 19 else ())
        clock.now += WINDOW_SECONDS
    return state


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


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


def test_api_state_lists_present_peers_by_weight_with_curve_and_bytes(dashboard: Dashboard):
    status, ctype, body = get(dashboard.url + "api/state")
    snap = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert [p["peer"] for p in snap["peers"]] == PEERS
    assert snap["window"] == 19 and len(snap["loss_curve"]) == 20
    assert snap["bytes_per_window"][-1] == [19, sum(40_000 + 1000 * i for i in range(3))]
    assert snap["rejections"] == {"copy": 1, "out_of_sync": 1}
    by_peer = {p["peer"]: p for p in snap["peers"]}
    assert by_peer[PEERS[3]]["in_sync"] is False and by_peer[PEERS[0]]["in_sync"] is True
    assert by_peer[PEERS[0]]["base_digest"] == "ab12cd34ef56"
    assert by_peer[PEERS[0]]["mu"] == 30.0 and by_peer[PEERS[0]]["included"]


def test_a_peer_gone_for_seven_windows_is_shown_absent_not_included_nor_in_sync():
    state = populated()
    snap = state.snapshot()
    gone = next(p for p in snap["peers"] if p["peer"] == GONE)
    assert (gone["present"], gone["included"], gone["in_sync"]) == (False, False, None)
    assert gone["absent_windows"] == 7 and gone["absent_seconds"] == pytest.approx(8 * WINDOW_SECONDS)  # seen at 12, now 20
    assert (snap["present"], snap["in_sync"], snap["absent"]) == (4, 3, 1)
    page = render_html(snap)
    row = re.search(rf'<tr class="peer-row absent[^"]*" data-peer="{GONE}">(.*?)</tr>', page).group(1)
    assert "absent since window 12 (7 windows, 4 min 0 s)" in row and ">yes<" not in row
    assert re.search(r'id="sync">3 of 4<', page) and re.search(r'id="absent">1<', page)
    out_of_sync = re.search(rf'data-peer="{PEERS[3]}">(.*?)</tr>', page).group(1)
    assert "no: its payload failed a check" in out_of_sync and ">NO<" in out_of_sync


def test_an_absent_peers_rating_and_weight_keep_following_the_ratings():
    state = populated()
    state.record_ratings({GONE: (20.0, 7.5, 0.12), "ff" * 12: (25.0, 8.0, 0.5)})
    by_peer = {p["peer"]: p for p in state.snapshot()["peers"]}
    assert (by_peer[GONE]["mu"], by_peer[GONE]["weight"]) == (20.0, 0.12)
    assert "ff" * 12 not in by_peer  # ratings never add rows


def test_the_page_says_whether_the_run_trusts_this_validator():
    trusted = render_html(populated().snapshot())
    untrusted = render_html(populated(trusted=False).snapshot())
    assert 'id="trust" class="trusted"' in trusted and "not trusted" not in trusted
    assert 'id="trust" class="untrusted"' in untrusted and "not trusted" in untrusted


def test_every_column_is_explained_on_the_page():
    page = render_html(populated().snapshot())
    headers = re.findall(r'<th title="[^"]+">(.+?)</th>', page)
    assert [h.replace("<wbr>", "") for h in headers] == list(COLUMNS)
    glossary = re.findall(r"<dt>([^<]+)</dt><dd>([^<]+)</dd>", page)
    assert [name for name, _ in glossary] == list(COLUMNS) and all(len(doc) > 20 for _, doc in glossary)
    assert "evidence_ema" in dict(glossary)


def test_metrics_follow_prometheus_conventions_with_run_and_version_labels(dashboard: Dashboard):
    status, ctype, body = get(dashboard.url + "metrics")
    text = body.decode()
    got = samples(text)
    run = ("run", "demo@0123456789abcdef")
    assert status == 200 and ctype.startswith("text/plain")
    assert got[("locoswarm_window", frozenset({run}))] == 19
    assert got[("locoswarm_peers_included", frozenset({run}))] == 3  # what window 19 counted
    assert got[("locoswarm_peer_weight", frozenset({run, ("peer", PEERS[0])}))] == 0.9
    assert got[("locoswarm_payload_bytes", frozenset({run, ("peer", PEERS[1])}))] == 41000
    assert got[("locoswarm_rejections_total", frozenset({run, ("reason", "copy")}))] == 1
    info = [labels for name, labels in got if name == "locoswarm_build_info"]
    assert len(info) == 1 and dict(info[0])["role"] == "validator" and dict(info[0])["version"]
    assert "# TYPE locoswarm_rejections_total counter" in text
    assert all(dict(labels).get("run") == run[1] for name, labels in got if name.startswith("locoswarm_"))


def test_byte_totals_are_counters_read_from_the_accounting():
    acct = Accounting()
    registry = CollectorRegistry()
    SwarmMetrics(registry, run="r@1", role="validator", accounting=acct)
    acct.bytes_down += 123_456
    acct.bytes_up += 789
    with acct.phase("download"):
        pass
    text = generate_latest(registry).decode()
    got = samples(text)
    run = frozenset({("run", "r@1")})
    assert "# TYPE locoswarm_received_bytes_total counter" in text
    assert got[("locoswarm_received_bytes_total", run)] == 123_456
    assert got[("locoswarm_sent_bytes_total", run)] == 789
    assert ("locoswarm_phase_seconds_total", run | {("phase", "download")}) in got
    acct.bytes_down += 1
    assert samples(generate_latest(registry).decode())[("locoswarm_received_bytes_total", run)] == 123_457


def test_a_swarm_of_fresh_keys_cannot_grow_the_series_or_the_rows():
    """5000 fresh ids, some malformed: series stay under the cap and go to the counted peers."""
    state = DashboardState("run", "f" * 24, max_rows=100)
    swarm = [f"{i:024x}" for i in range(5000)] + ['<b>x</b>\n# HELP forged', "AB" * 12]
    for window in range(2):  # the swarm scored first fills the cap; the window's end makes room
        state.record_scores({p: PeerScore(weight=0.1, included=False) for p in swarm})
        state.record_scores({p: PeerScore(weight=0.9, included=True) for p in PEERS})
        for p in swarm + PEERS:
            state.update_peer(p, last_window=window)
        state.finish_window(window, heldout_loss=5.0, payload_bytes=dict.fromkeys(swarm + PEERS, 100))
    text = generate_latest(state.registry).decode()
    series = [line for line in text.splitlines() if line.startswith("locoswarm_peer_weight{")]
    assert len(series) <= MAX_PEER_SERIES and "forged" not in text and "AB" * 12 not in text
    assert all(f'peer="{p}"' in text for p in PEERS)  # the counted peers kept theirs
    assert len(state.snapshot()["peers"]) == 100
    dropped = [line for line in text.splitlines() if line.startswith("locoswarm_peer_series_dropped{")]
    assert float(dropped[0].split()[1]) > 0


def test_page_escapes_text_from_the_network(dashboard: Dashboard):
    _, ctype, body = get(dashboard.url)
    page = body.decode()
    assert ctype.startswith("text/html")
    assert "copy of &lt;b&gt;someone&lt;/b&gt;" in page and "<b>someone</b>" not in page
    hostile = DashboardState("r", "v")
    hostile.update_peer('<script>alert(1)</script>', reason='"><img src=x onerror=alert(1)>', last_window=0)
    hostile.finish_window(0, heldout_loss=1.0, payload_bytes={})
    page = render_html(hostile.snapshot())
    assert "<script>alert" not in page and "<img src=x" not in page


def test_live_part_and_unknown_paths(dashboard: Dashboard):
    status, ctype, body = get(dashboard.url + "live")
    assert status == 200 and ctype.startswith("text/html")
    live = body.decode()
    assert 'id="leaderboard"' in live and "<html" not in live and 'id="window">19<' in live
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


@pytest.mark.parametrize(("lo", "hi", "integer"), [(0, 3, True), (0, 10, True), (5, 997, True), (6.689, 7.6597, False),
                                                    (3, 3, True), (0.0012, 0.0049, False), (1e6, 3.5e6, False)])
def test_ticks_are_round_evenly_spaced_and_cover_the_data(lo, hi, integer):
    ticks = nice_ticks(lo, hi, most=6, integer=integer)
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and 2 <= len(ticks) <= 8 and ticks[0] <= lo and ticks[-1] >= hi
    step = steps.pop()
    mantissa = step / 10 ** int(f"{step:e}".split("e")[1])
    assert round(mantissa, 6) in (1.0, 2.0, 5.0)
    if integer:
        assert all(t == int(t) for t in ticks)


def test_charts_label_every_tick_with_round_values():
    line = svg_line_chart([(w, 7.6597 - 0.1 * w) for w in range(11)], svg_id="x", title="t")
    xlabels = [int(t) for t in re.findall(r'class="xtick"[^>]*>(\d+)<', line)]
    assert xlabels == [0, 2, 4, 6, 8, 10]
    ylabels = re.findall(r'class="ytick"[^>]*>([^<]+)<', line)
    assert ylabels == ["6.6", "6.8", "7.0", "7.2", "7.4", "7.6", "7.8"]
    bars = svg_bar_chart([(w, 200_000.0 + 1000 * w) for w in range(3)], svg_id="b", title="t")
    assert bars.count('class="bar"') == 3 and re.findall(r'class="xtick"[^>]*>(\d+)<', bars) == ["0", "1", "2"]
    assert re.findall(r'class="ytick"[^>]*>([^<]+)<', bars)[:3] == ["0 KiB", "50 KiB", "100 KiB"]
    assert "no data yet" in svg_line_chart([], svg_id="x", title="t")
    one = svg_line_chart([(3, 5.8)], svg_id="x", title="t")
    assert re.findall(r'class="xtick"[^>]*>(\d+)<', one) == ["2", "3", "4"]  # the one window in the middle
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


# --- in a real browser ---------------------------------------------------------------------


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def browser():
    if _chromium() is None:
        print("skipping: chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.mark.parametrize("width", [1280, 420])
def test_the_page_tells_the_truth_at_desktop_and_phone_width(browser, width, tmp_path):
    clock = Clock()
    state = populated(clock, trusted=False)
    with Dashboard(state, refresh_seconds=1) as dash:
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(dash.url)
        shot = page.screenshot(path=str(tmp_path / f"dashboard-{width}.png"), full_page=True)
        assert _png_size(shot)[0] == width, "the page scrolls sideways"
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        table, box = page.evaluate("[document.querySelector('#leaderboard').scrollWidth, "
                                   "document.querySelector('.wide').clientWidth]")
        assert table <= box, "the leaderboard is cut off"
        assert page.locator("#trust").is_visible() and "not trusted" in page.locator("#trust").inner_text()
        gone = page.locator(f'tr[data-peer="{GONE}"]')
        assert gone.is_visible() and "absent since window 12 (7 windows" in gone.inner_text()
        assert page.locator("#sync").inner_text() == "3 of 4"
        for svg in ("#loss-curve", "#bytes-chart"):  # every tick labelled, none overlapping, inside the chart
            chart, boxes = page.evaluate(
                """s => [document.querySelector(s).getBoundingClientRect().toJSON(),
                         [...document.querySelectorAll(s + ' text.xtick')].map(t => t.getBoundingClientRect().toJSON())]""",
                svg)
            assert len(boxes) >= 5 and all(b["width"] > 0 for b in boxes)
            assert all(a["right"] < b["left"] for a, b in itertools.pairwise(boxes))
            assert chart["left"] >= 0 and chart["right"] <= width
        if width < 760:  # rows become cards whose cells carry their column's name
            labels = gone.evaluate("r => [...r.cells].map(c => getComputedStyle(c, '::before').content)")
            assert labels == [json.dumps(c, ensure_ascii=False) for c in COLUMNS]
        assert page.locator("#glossary dt").count() == len(COLUMNS)

        # Live: a new window appears without reloading the page.
        page.evaluate("window.__not_reloaded = true")
        clock.now += WINDOW_SECONDS
        play_window(state, 20, PEERS[:4])
        page.wait_for_function("document.getElementById('window').textContent === '20'", timeout=10_000)
        assert page.evaluate("window.__not_reloaded") is True
        assert "(8 windows" in page.locator(f'tr[data-peer="{GONE}"]').inner_text()
        page.close()
