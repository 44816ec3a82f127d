"""``locoswarm status``: the run's state as anyone can read it from the store, in about a second.

It reads only small objects: decision records of recent windows, payload headers for sync
(each a few hundred bytes of a signed object: read whole, since a header is only trusted
with its signature), and score records. No model is built unless ``--eval`` asks for the
held-out loss of the run's newest state (replayed exactly as a late joiner would).
"""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from node.accounting import Accounting
from node.follow import DecisionReader
from protocol import paths
from protocol.consensus import Decision
from protocol.manifest import Manifest
from protocol.scores import combine, read_scores
from protocol.stores.base import Store

RECENT_WINDOWS = 8
"""Windows whose decisions ``status`` reads: every peer seen in them is listed."""


def newest_window(store: Store) -> int | None:
    """The newest window with a decision record (by listing, so cheap on every store)."""
    windows = {w for o in store.list("windows/") if "/decisions/" in o.key and (w := paths.window_of_key(o.key)) is not None}
    return max(windows) if windows else None


def run_state(manifest: Manifest, store: Store, *, recent: int = RECENT_WINDOWS) -> dict:
    """What ``status`` shows, as plain data."""
    reader = DecisionReader(store, manifest, Accounting())
    state: dict = {"run": manifest.run_key, "store": store.uri, "window": None, "peers": {}, "decided": []}
    newest = newest_window(store)
    if newest is None:
        return state
    decisions: list[Decision] = []
    for window in range(newest, max(-1, newest - recent), -1):
        decision = reader.read(window)
        if decision is not None:
            decisions.append(decision)
    if not decisions:
        return state
    last = decisions[0]
    state["window"] = last.window
    state["closed_at"] = last.closed_at
    state["decided"] = [{"window": d.window, "payloads": len(d.included), "bytes": sum(i.size for i in d.included)}
                        for d in decisions]
    for d in reversed(decisions):  # oldest first, so each peer ends with its newest window
        for inc in d.included:
            state["peers"][inc.peer_id] = {"last_window": d.window, "payload_bytes": inc.size,
                                           "standing": inc.standing, "included_last": d.window == last.window}
    if manifest.validators.keys:
        for scored in range(last.window, max(-1, last.window - recent), -1):
            combined = combine(read_scores(store, manifest.run_key, scored, manifest.validators.keys),
                               manifest.validators.keys)
            if combined is not None:
                state["scores_window"] = scored
                for peer, weight in combined.allowed.items():
                    state["peers"].setdefault(peer, {"last_window": None})["weight"] = weight
                break
    return state


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_status(manifest: Manifest, store: Store, *, as_json: bool, heldout: tuple[int, float] | None = None) -> int:
    state = run_state(manifest, store)
    if heldout is not None:
        state["heldout_window"], state["heldout_loss"] = heldout
    if as_json:
        print(json.dumps(state))
        return 0
    console = Console()
    console.print(f"run [bold]{state['run']}[/] in {state['store']}")
    if state["window"] is None:
        console.print("no window decided yet")
        return 0
    ago = time.time() - state["closed_at"]
    console.print(f"newest decided window: {state['window']} (closed {ago:.0f} s ago)"
                  + (f"; held-out loss {state['heldout_loss']:.4f} at window {state['heldout_window']}"
                     if "heldout_loss" in state else ""))
    table = Table(title=f"peers seen in the last {RECENT_WINDOWS} windows")
    for col in ("peer", "last window", "in the newest", "payload", "standing", "weight"):
        table.add_column(col)
    for peer, info in sorted(state["peers"].items()):
        table.add_row(peer, str(info.get("last_window", "")), "yes" if info.get("included_last") else "no",
                      _human(info["payload_bytes"]) if "payload_bytes" in info else "",
                      "yes" if info.get("standing") else "no", f"{info['weight']:.3f}" if "weight" in info else "")
    console.print(table)
    return 0
