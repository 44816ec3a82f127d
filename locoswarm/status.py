"""``locoswarm status``: the run's state as anyone can read it from the store, in about a second.

It reads only small objects, and imports no torch: the decision records of the newest
windows (verified like a replica verifies them), listings of who published in them, and the
trusted validators' score records. No model is built unless ``--eval`` asks for the held-out
loss of the run's newest state: the newest verified checkpoint plus every decided window
after it, replayed exactly as a late joiner replays them (``locoswarm.export.newest_model``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from node.runinfo import DecisionRecords, published
from protocol.consensus import Decision
from protocol.manifest import Manifest
from protocol.scores import combine, read_scores
from protocol.stores.base import Store
from validator.charts import human_bytes

RECENT_WINDOWS = 8
"""Default number of newest decided windows ``status`` reads: every peer seen in them is listed."""


def run_state(manifest: Manifest, store: Store, *, recent: int = RECENT_WINDOWS) -> dict[str, Any]:
    """What ``status`` shows, as plain data (JSON-ready)."""
    run = manifest.run
    state: dict[str, Any] = {
        "run": manifest.run_key, "store": store.uri, "recent_windows": recent,
        "manifest": {"preset": manifest.model.preset, "inner_steps": manifest.inner.steps,
                     "window_seconds": run.window_seconds, "closers": len(manifest.closers),
                     "quorum": manifest.quorum, "validators": len(manifest.validators.keys),
                     "listed_peers": len(run.peers)},
        "window": None, "windows": [], "peers": {},
    }
    records = DecisionRecords(store, manifest)
    newest = records.newest()
    if newest is None:
        state["open_window"] = 0
        state["open_published"] = sorted(published(store, 0))
        return state
    decisions: dict[int, Decision] = {newest.window: newest}
    for window in range(newest.window - 1, max(-1, newest.window - recent), -1):
        if (decision := records.read(window)) is not None:
            decisions[window] = decision
    first = min(decisions)
    seen = {w: published(store, w) for w in range(first, newest.window + 2)}
    state.update(window=newest.window, closed_at=newest.closed_at, open_window=newest.window + 1,
                 open_published=sorted(seen[newest.window + 1]),
                 open_deadline=newest.closed_at + run.window_seconds)
    for w in sorted(decisions, reverse=True):
        d = decisions[w]
        state["windows"].append({"window": w, "counted": len(d.included), "published": len(seen[w]),
                                 "bytes": sum(i.size for i in d.included), "closed_at": d.closed_at})
    peers: dict[str, dict[str, Any]] = state["peers"]
    for w in range(first, newest.window + 1):  # oldest first: each peer ends with its newest facts
        counted = {i.peer_id: i for i in decisions[w].included} if w in decisions else {}
        for peer in seen[w] | counted.keys():
            info = peers.setdefault(peer, {"last_window": w, "counted_windows": 0, "standing": False})
            info["last_window"] = w
            if peer in counted:
                info.update(last_counted=w, payload_bytes=counted[peer].size, standing=counted[peer].standing)
                info["counted_windows"] += 1
    for peer in seen[newest.window + 1]:
        peers.setdefault(peer, {"last_window": None, "counted_windows": 0, "standing": False})
    newest_counted = set(newest.peers)
    for peer, info in peers.items():
        info["included_last"] = peer in newest_counted
        info["publishing_open"] = peer in seen[newest.window + 1]
        # In sync: counted in the newest window, so built on the base digest every replica
        # is at (its closers checked it); a payload published but not counted, or none, says nothing.
        info["in_sync"] = True if peer in newest_counted else None
    if manifest.validators.keys:
        _add_scores(state, manifest, store, newest.window, recent)
    return state


def _add_scores(state: dict[str, Any], manifest: Manifest, store: Store, newest: int, recent: int) -> None:
    """The trusted validators' majority view of the newest window they scored."""
    keys = manifest.validators.keys
    for window in range(newest, max(-1, newest - recent), -1):
        combined = combine(read_scores(store, manifest.run_key, window, keys), keys)
        if combined is None:
            continue
        state["scores_window"] = window
        for peer, info in state["peers"].items():
            info["admitted"] = peer in combined.allowed
            info["weight"] = combined.allowed.get(peer)
            info["validators_standing"] = peer in combined.standing
        return


# --- printing ------------------------------------------------------------------------------


def human_ago(seconds: float) -> str:
    """12 -> '12 s'; 300 -> '5 min'; 7300 -> '2.0 h'."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _sync(info: dict[str, Any], newest: int) -> str:
    if info["in_sync"]:
        return "yes"
    if info["last_window"] == newest:
        return "published, not counted"
    if info["last_window"] is None:
        return "new: publishing now"
    gone = newest - info["last_window"]
    return f"absent {gone} window{'s' if gone != 1 else ''}"


def print_status(state: dict[str, Any], *, as_json: bool, console: Console | None = None) -> None:
    """Print ``run_state``'s result (and the ``model`` entry ``--eval`` adds) for a person, or as JSON."""
    if as_json:
        print(json.dumps(state))
        return
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    m = state["manifest"]
    console.print(f"run [bold]{state['run']}[/] in {state['store']}")
    console.print(f"model {m['preset']}, {m['inner_steps']} inner steps per window, windows of at most "
                  f"{m['window_seconds']:g} s; closers {m['closers']} (quorum {m['quorum']}), validators "
                  f"{m['validators']}, listed peers {m['listed_peers']}")
    now = time.time()
    if state["window"] is None:
        console.print(f"no window decided yet; {_peers(len(state['open_published']))} published in window 0")
        return
    console.print(f"newest decided window [bold]{state['window']}[/], closed {human_ago(now - state['closed_at'])} ago; "
                  f"window {state['open_window']} is open: {_peers(len(state['open_published']))} published so far, "
                  f"it closes {_deadline(state['open_deadline'] - now)}")
    model = state.get("model")
    if model is not None:
        after = "the genesis model" if model["after_window"] is None else f"after window {model['after_window']}"
        console.print(f"held-out loss [bold]{model['heldout_loss']:.4f}[/] {after} ({model['origin']})")
    else:
        console.print("held-out loss: add --eval (replays the run to its newest state; builds the model)")
    windows = Table(title="newest decided windows")
    for col in ("window", "counted", "published", "bytes counted", "closed"):
        windows.add_column(col, justify="right")
    for w in state["windows"]:
        windows.add_row(str(w["window"]), str(w["counted"]), str(w["published"]), human_bytes(w["bytes"]),
                        f"{human_ago(now - w['closed_at'])} ago")
    console.print(windows)
    scored = "scores_window" in state
    peers = Table(title=f"peers seen in the last {state['recent_windows']} windows"
                  + (f" (validators' scores of window {state['scores_window']})" if scored else ""))
    cols = ["peer", "last window", "counted", "last payload", "standing", "in sync", "in open window"]
    for col in cols + (["weight", "admitted"] if scored else []):
        peers.add_column(col, justify="left" if col == "peer" else "right")
    n = len(state["windows"])
    for peer, info in sorted(state["peers"].items(), key=lambda kv: (-(kv[1]["last_window"] or -1), kv[0])):
        row = [peer, "–" if info["last_window"] is None else str(info["last_window"]),
               f"{info['counted_windows']} of {n}",
               human_bytes(info["payload_bytes"]) if "payload_bytes" in info else "–",
               "yes" if info["standing"] else "no", _sync(info, state["window"]),
               "yes" if info["publishing_open"] else "no"]
        if scored:
            row += ["–" if info.get("weight") is None else f"{info['weight']:.3f}",
                    "yes" if info.get("admitted") else "no"]
        peers.add_row(*row)
    console.print(peers)


def _peers(n: int) -> str:
    return f"{n} peer" if n == 1 else f"{n} peers"


def _deadline(seconds: float) -> str:
    return f"in {human_ago(seconds)} at the latest" if seconds > 0 else \
        f"as soon as the closers decide (its deadline passed {human_ago(-seconds)} ago)"
