"""The shipped Grafana dashboard asks only for series locoswarm processes really export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.accounting import Accounting
from node.metrics import SwarmMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "locoswarm.json"


def exported_names() -> set[str]:
    """Every sample name a process with some activity exports."""
    registry = CollectorRegistry()
    metrics = SwarmMetrics(registry, run="r@1", role="validator", accounting=Accounting(tokens=10, bytes_up=5))
    metrics.window.set(3)
    metrics.heldout_loss.set(5.0)
    metrics.peer_weight.set("ab" * 12, 0.5)
    metrics.payload_bytes.set("ab" * 12, 1000)
    metrics.rejected("copy")
    text = generate_latest(registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_query_names_exported_series_of_the_chosen_run():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    names = exported_names()
    used = {name for e in exprs for name in re.findall(r"\blocoswarm_[a-z_]+", e)}
    assert used and used <= names, used - names
    assert {"locoswarm_sent_bytes_total", "locoswarm_received_bytes_total", "locoswarm_heldout_loss"} <= used
    assert all('run="$run"' in e for e in exprs)
    counters = {n for n in used if n.endswith("_total")}
    assert all(re.search(rf"(rate|increase)\({n}\{{", e) for e in exprs for n in counters if n in e), \
        "counters are read through rate() or increase()"


def test_the_run_variable_and_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "locoswarm_build_info" in variables["run"]["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and p["title"]
