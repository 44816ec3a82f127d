"""Which sequences a peer trains on, and which are held out: pure functions anyone recomputes.

Validators and auditors must be able to recompute exactly what a peer was assigned in a
window, so assignment lives here, with no I/O, as a function of public inputs only:
(run seed, window, peer id, H, batch size, number of train sequences).

All randomness comes from SHA-256-seeded PCG64 *raw* output (its bit stream is stable across
platforms and numpy versions, unlike ``Generator`` methods), mapped to ranges with ``%``
(bias below n / 2**64, negligible). Each use has its own domain tag, so no two draws share
a stream.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np


def bit_generator(*parts: object) -> np.random.PCG64:
    """PCG64 seeded from SHA-256 of the '|'-joined parts (a domain tag comes first)."""
    material = b"|".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
    return np.random.PCG64(int.from_bytes(hashlib.sha256(material).digest(), "little"))


def sample_distinct(bits: np.random.PCG64, n: int, k: int) -> list[int]:
    """k distinct integers in [0, n) in random order: Floyd's sampler, then Fisher-Yates.

    O(k) whatever n is, so a validator can recompute many peers' assignments cheaply.
    """
    raw = bits.random_raw(2 * k).tolist()
    chosen: set[int] = set()
    out: list[int] = []
    for i, j in enumerate(range(n - k, n)):
        t = raw[i] % (j + 1)
        pick = j if t in chosen else t
        chosen.add(pick)
        out.append(pick)
    for i in range(k - 1, 0, -1):
        s = raw[k + i] % (i + 1)
        out[i], out[s] = out[s], out[i]
    return out


def _draw(bits: np.random.PCG64, n: int, count: int) -> np.ndarray:
    """``count`` ids in [0, n): distinct while count <= n, else in rounds of n distinct ids."""
    out: list[int] = []
    while len(out) < count:
        out.extend(sample_distinct(bits, n, min(n, count - len(out))))
    return np.asarray(out, dtype=np.int64)


def assigned_batches(seed: int, window: int, peer_id: str, steps: int, batch_size: int, n_train: int) -> np.ndarray:
    """Train-sequence ids a peer trains on in a window: int64 [steps, batch_size] in [0, n_train).

    A pure function of its arguments, so validators recompute it exactly. Ids are distinct
    within a window unless the window needs more than n_train sequences.
    """
    if n_train < 1 or steps < 0 or batch_size < 1:
        raise ValueError(f"need n_train >= 1, steps >= 0, batch_size >= 1 (got {n_train}, {steps}, {batch_size})")
    bits = bit_generator("locoswarm/assign/v1", seed, window, peer_id)
    return _draw(bits, n_train, steps * batch_size).reshape(steps, batch_size)


class _Split(Protocol):
    n_train: int
    n_heldout: int


def heldout_ids(n_eval: int, data: _Split) -> np.ndarray:
    """The fixed held-out evaluation set: the first ``n_eval`` held-out sequences (fewer if
    the split is smaller). Held-out rows were stored in random order, so this is a random sample."""
    return data.n_train + np.arange(min(n_eval, data.n_heldout), dtype=np.int64)


def unassigned_batches(seed_material: bytes, steps: int, batch_size: int, data: _Split) -> np.ndarray:
    """Held-out sequence ids int64 [steps, batch_size], chosen by material peers could not know
    in advance (e.g. a later window's close record); for validators."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1 (got {steps}, {batch_size})")
    bits = bit_generator(b"locoswarm/unassigned/v1", seed_material)
    ids = _draw(bits, data.n_heldout, steps * batch_size) + data.n_train
    return ids.reshape(steps, batch_size)


def heldout_rows(seed: int, n_sequences: int, n_heldout: int) -> np.ndarray:
    """int64 [n_heldout]: the sequence rows of a corpus that ``init`` holds out, in the
    random order they are stored in (after every train row)."""
    return np.asarray(sample_distinct(bit_generator("locoswarm/heldout/v1", seed), n_sequences, n_heldout), dtype=np.int64)
