"""``locoswarm status``: the run's state as any participant can read it from the store."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from node.checkpoint import latest_checkpoint, load_checkpoint_into
from node.dataset import TokenData
from node.follow import CloseReader
from node.model import build_model, heldout_loss
from protocol import paths
from protocol.close import CloseRecord
from protocol.errors import LocoError, ObjectNotFound
from protocol.manifest import Manifest
from protocol.scores import combine, read_score_record
from protocol.stores.base import Store
from protocol.wire import read_header


def latest_close(store: Store, run_key: str) -> CloseRecord | None:
    """The close record of the newest closed window (its first valid close slot)."""
    windows = sorted({w for o in store.list("windows/") if "/close" in o.key
                      for w in [paths.window_of_key(o.key)] if w is not None})
    closes = CloseReader(store, run_key)
    for window in reversed(windows):
        try:
            record = closes.first_valid(window)
        except LocoError:
            continue
        if record is not None:
            return record
    return None


def checkpoint_loss(manifest: Manifest, store: Store) -> tuple[int, float] | None:
    """Held-out loss of the newest published checkpoint (window, loss)."""
    window = latest_checkpoint(store, manifest.run.checkpoint_every)
    if window is None:
        return None
    data = TokenData.load(manifest, store)
    model = build_model(manifest.model, data.vocab_size, manifest.data.seq_len, manifest.run.seed)
    load_checkpoint_into(model, store, window)
    return window, heldout_loss(model, data, manifest.data.eval_sequences, manifest.data.batch_size)


def run_state(manifest: Manifest, store: Store) -> dict:
    close = latest_close(store, manifest.run_key)
    state: dict = {"run": manifest.run_key, "store": store.uri, "window": None, "peers": {}}
    loss = checkpoint_loss(manifest, store)
    if loss:
        state["checkpoint_window"], state["heldout_loss"] = loss
    if close is None:
        return state
    state["window"] = close.window
    state["closer"] = close.closer
    for inc in close.included:
        info = {"payload_bytes": inc.size, "included": True}
        try:
            header, _ = read_header(store.get(paths.payload_key(close.window, inc.peer_id), max_bytes=1 << 31),
                                    max_bytes=1 << 31)
            info["in_sync"] = header.base_digest == close.base_digest
            info["tokens"] = header.tokens
        except (ObjectNotFound, LocoError) as exc:
            info["in_sync"] = None
            info["error"] = str(exc)
        state["peers"][inc.peer_id] = info
    records = []
    for window in (close.window, close.window - 1):
        for obj in store.list(paths.scores_prefix(window)) if window >= 0 else []:
            try:
                records.append(read_score_record(store.get(obj.key, max_bytes=1 << 20), manifest.run_key,
                                                 manifest.validators.keys))
            except LocoError:
                continue
        if records:
            state["scores_window"] = window
            break
    for rec in records:
        for peer, score in rec.peers.items():
            state["peers"].setdefault(peer, {"included": False})[f"weight_{rec.validator[:8]}"] = score.weight
    if records:
        combined = combine(records, max(1, len(manifest.validators.keys))) or {}
        for peer, weight in combined.items():
            state["peers"].setdefault(peer, {"included": False})["weight"] = weight
    return state


def print_status(manifest: Manifest, store: Store, *, as_json: bool) -> int:
    state = run_state(manifest, store)
    if as_json:
        print(json.dumps(state))
        return 0
    console = Console()
    console.print(f"run [bold]{state['run']}[/] in {state['store']}")
    console.print(f"last closed window: {state['window']}   "
                  f"held-out loss {state.get('heldout_loss', float('nan')):.4f} "
                  f"(checkpoint of window {state.get('checkpoint_window')})")
    table = Table()
    for col in ("peer", "included", "in sync", "payload", "tokens", "weight"):
        table.add_column(col)
    for peer, info in sorted(state["peers"].items()):
        table.add_row(peer, str(info.get("included")), str(info.get("in_sync", "")), str(info.get("payload_bytes", "")),
                      str(info.get("tokens", "")), f"{info['weight']:.3f}" if "weight" in info else "")
    console.print(table)
    return 0
