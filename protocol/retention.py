"""Garbage collection of old windows, by the policy in the manifest's [run] table.

A late joiner starts from the latest published checkpoint and replays every window since,
so those windows' payloads and decisions must stay, and so must the window just before the
checkpoint (its decision says when the checkpoint's window started: the schedule). Older
windows are deleted once they are also more than ``keep_windows`` behind. Checkpoints are
never deleted here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from protocol import paths
from protocol.stores.base import Store

log = logging.getLogger(__name__)


def retention_floor(current_window: int, latest_checkpoint: int, keep_windows: int) -> int:
    """The oldest window whose objects must be kept."""
    return max(0, min(latest_checkpoint - 1, current_window - keep_windows))


def gc_windows(store: Store, keep_from_window: int, protect: Callable[[str], bool] = lambda key: False) -> list[str]:
    """Delete ``windows/<w>/...`` objects for ``w < keep_from_window`` unless ``protect(key)``.

    Works on any store whose ``list`` descends into window directories (file, s3); only
    keys under ``windows/`` are considered. Returns the deleted keys.
    """
    deleted = []
    for info in store.list("windows/"):
        window = paths.window_of_key(info.key)
        if window is None or window >= keep_from_window or protect(info.key):
            continue
        store.delete(info.key)
        deleted.append(info.key)
    if deleted:
        log.info("gc: deleted %d objects of windows before %d from %s", len(deleted), keep_from_window, store.uri)
    return deleted
