"""Checks on a window's payloads that need no model evaluation: pure functions, no I/O.

Each check returns a ``Verdict``: ``ok``, a short stable ``check`` label (used as the
``reason`` label of ``locoswarm_rejections_total``) and a ``reason`` written for a person.

- on time:  the payload object's store modified time is at or before the window's close.
- decoder:  signature, run/window binding, layout and base digest are the decoder's job
            (``protocol.wire``); ``verdict_from_rejection`` turns its typed error into a
            verdict so every refusal is reported the same way.
- norms:    computed from the codes (``protocol.aggregate.tensor_norm``), never densified.
            Zero or below ``min_fraction`` x the median is an empty update; NaN/inf or
            above ``max_factor`` x the median is garbage. The median is taken over the peers
            with standing (the decision flags them), so a swarm of fresh keys sending huge
            norms cannot make the honest peers look tiny.
- copies:   two payloads with identical index and code bytes (scales ignored, so a
            rescaled copy is caught), or whose sampled chunk index sets overlap by half or
            more (Jaccard), are copies whatever their signs (a copy with a few signs flipped,
            or negated, is still someone else's work); the later upload (store modified
            time, then the header's ``created_at``) is the copier. A payload that overlaps
            the previous window's aggregate as much replays it. Honest peers share few
            large coordinates: peers trained from the same weights on different data
            overlapped with Jaccard 0.06-0.07 (docs/validator.md), so 0.5 leaves a wide
            margin. The sampled chunks are chosen by the validator's seed, which copiers do
            not know in advance.

``check_window`` runs them all and gives each peer its first failing verdict (or ``PASS``).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protocol.aggregate import tensor_norm
from protocol.codec_types import SCALE_ZERO_CODE, CompressedTensor
from protocol.errors import (
    BadSignature,
    LayoutMismatch,
    MalformedPayload,
    NonFinite,
    OutOfSync,
    PayloadRejected,
    PayloadTooLarge,
    WrongRun,
    WrongWindow,
)
from protocol.wire import Payload


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check for one peer."""

    ok: bool
    check: str
    """Short stable label: ``ok``, ``late``, ``empty``, ``tiny_norm``, ``huge_norm``,
    ``non_finite``, ``copy``, or a decoder label (``bad_signature``, ``out_of_sync``, ...)."""
    reason: str
    """What happened, for a person."""


PASS = Verdict(True, "ok", "all checks passed")


@dataclass(frozen=True)
class Submission:
    """What the checks need to know about one peer's decoded payload."""

    peer: str
    tensors: Mapping[str, CompressedTensor]
    modified: float
    """Store modified time of the payload object, unix seconds (the store's clock)."""
    created_at: float
    """The header's ``created_at`` (the peer's own claim; only a tie-breaker)."""

    @classmethod
    def of(cls, payload: Payload, modified: float) -> Submission:
        """The submission of a decoded payload whose store object is stamped ``modified``."""
        return cls(payload.header.peer_id, payload.tensors, modified, payload.header.created_at)


_DECODER_LABELS: tuple[tuple[type[PayloadRejected], str], ...] = (
    (PayloadTooLarge, "too_large"),
    (MalformedPayload, "malformed"),
    (BadSignature, "bad_signature"),
    (WrongRun, "wrong_run"),
    (WrongWindow, "wrong_window"),
    (LayoutMismatch, "layout_mismatch"),
    (NonFinite, "non_finite"),
    (OutOfSync, "out_of_sync"),
)


def verdict_from_rejection(exc: PayloadRejected) -> Verdict:
    """The verdict for a payload the decoder refused (signature, digest, layout, ...)."""
    for cls, label in _DECODER_LABELS:
        if isinstance(exc, cls):
            return Verdict(False, label, exc.reason)
    return Verdict(False, "rejected", exc.reason)


def check_on_time(modified: float, close_time: float) -> Verdict:
    """On time iff the store received the object at or before the window closed."""
    if modified <= close_time:
        return PASS
    return Verdict(False, "late", f"uploaded {modified - close_time:.1f} s after the window closed")


def payload_norm(tensors: Mapping[str, CompressedTensor]) -> float:
    """L2 norm of the whole decoded update, from the codes (NaN if any scale is NaN)."""
    return math.sqrt(math.fsum(tensor_norm(c) ** 2 for c in tensors.values()))


def _is_empty(tensors: Mapping[str, CompressedTensor]) -> bool:
    return all(bool((c.scale_q == SCALE_ZERO_CODE).all()) or c.scale_ref == 0.0 for c in tensors.values())


def check_norms(
    norms: Mapping[str, float], *, min_fraction: float = 0.05, max_factor: float = 10.0,
    reference: Collection[str] | None = None,
) -> dict[str, Verdict]:
    """Per peer: refuse non-finite, zero, far-below-median or far-above-median update norms.

    The median is over the finite norms of the peers in ``reference`` (every peer when it is
    None); when no peer of ``reference`` is present only the absolute checks run, so that
    fresh keys can never set the yardstick. Without a reference the relative checks need
    three or more peers to bite: with one peer the median is its own norm, and with two a
    single outlier pulls the median halfway towards itself.
    """
    finite = [n for p, n in norms.items() if math.isfinite(n) and (reference is None or p in reference)]
    median = statistics.median(finite) if finite else math.nan  # NaN: every comparison below is False
    out = {}
    for peer, n in norms.items():
        if not math.isfinite(n):
            out[peer] = Verdict(False, "non_finite", f"update norm is {n}")
        elif n == 0.0:
            out[peer] = Verdict(False, "empty", "update is all zeros")
        elif n < min_fraction * median:
            out[peer] = Verdict(False, "tiny_norm", f"update norm {n:.3g} is below {min_fraction:g} x the median {median:.3g}")
        elif n > max_factor * median:
            out[peer] = Verdict(False, "huge_norm", f"update norm {n:.3g} is above {max_factor:g} x the median {median:.3g}")
        else:
            out[peer] = PASS
    return out


@dataclass(frozen=True)
class Fingerprint:
    """A cheap summary of one payload for copy detection."""

    exact: bytes
    """SHA-256 over every tensor's index and code bytes, in name order (scales left out)."""
    positions: np.ndarray
    """int64, sorted: global positions kept in the sampled chunks."""
    negative: np.ndarray
    """bool, aligned with ``positions``: the sign bit of each kept value."""


def fingerprint(tensors: Mapping[str, CompressedTensor], *, seed: int, sample_chunks: int = 8) -> Fingerprint:
    """Fingerprint a payload; the same ``seed`` must be used for every peer of a window."""
    h = hashlib.sha256()
    positions, negative = [], []
    offset = 0
    for name in sorted(tensors):
        c = tensors[name]
        idx = c.idx.detach().to("cpu", torch.int64).contiguous()
        codes = c.codes.detach().to("cpu", torch.uint8).contiguous()
        h.update(name.encode() + b"\0" + idx.numpy().tobytes() + codes.numpy().tobytes())
        n_chunks, chunk_len = c.layout.n_chunks, c.layout.chunk_len
        name_seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1
        gen = torch.Generator().manual_seed(name_seed)
        rows = torch.randperm(n_chunks, generator=gen)[: min(sample_chunks, n_chunks)].sort().values
        pos = (rows[:, None] * chunk_len + idx[rows]).flatten() + offset  # sorted: rows and idx increase
        positions.append(pos.numpy())
        negative.append(((codes[rows] & 2) != 0).flatten().numpy())
        offset += n_chunks * chunk_len
    return Fingerprint(
        h.digest(),
        np.concatenate(positions) if positions else np.zeros(0, np.int64),
        np.concatenate(negative) if negative else np.zeros(0, bool),
    )


def similarity(a: Fingerprint, b: Fingerprint) -> tuple[float, float]:
    """(Jaccard of the sampled position sets, share of shared positions with equal sign)."""
    common, ia, ib = np.intersect1d(a.positions, b.positions, assume_unique=True, return_indices=True)
    union = len(a.positions) + len(b.positions) - len(common)
    jaccard = len(common) / union if union else 1.0
    signs = float(np.mean(a.negative[ia] == b.negative[ib])) if len(common) else 0.0
    return jaccard, signs


def find_copies(
    subs: Sequence[Submission], *, seed: int, min_jaccard: float = 0.5,
    previous: Mapping[str, CompressedTensor] | None = None,
) -> dict[str, Verdict]:
    """Peers whose payload copies an earlier upload or replays ``previous`` (the last
    window's aggregate, compressed as a payload), each with a failing verdict.

    Of a copied pair the later upload is the copier; with exactly equal times both are
    flagged, since nobody can tell which came first. Peers not returned are not copies.
    """
    prints = {s.peer: fingerprint(s.tensors, seed=seed) for s in subs}
    when = {s.peer: (s.modified, s.created_at) for s in subs}
    out: dict[str, Verdict] = {}
    if previous is not None:
        last = fingerprint(previous, seed=seed)
        for peer, fp in prints.items():
            if (how := _copied(fp, last, min_jaccard)) is not None:
                out[peer] = Verdict(False, "copy", f"replays the previous window's aggregate ({how})")
    peers = sorted(prints)
    for i, a in enumerate(peers):
        for b in peers[i + 1 :]:
            if (how := _copied(prints[a], prints[b], min_jaccard)) is None:
                continue
            if when[a] == when[b]:
                out[a] = Verdict(False, "copy", f"same as {b}'s payload ({how}), uploaded at the same time")
                out[b] = Verdict(False, "copy", f"same as {a}'s payload ({how}), uploaded at the same time")
                continue
            original, copier = (a, b) if when[a] < when[b] else (b, a)
            out.setdefault(copier, Verdict(False, "copy", f"copy of {original}'s earlier payload ({how})"))
    return out


def _copied(a: Fingerprint, b: Fingerprint, min_jaccard: float) -> str | None:
    """How ``a`` and ``b`` are the same work, or None when they are not."""
    if a.exact == b.exact:
        return "identical indices and signs"
    jaccard, signs = similarity(a, b)
    if jaccard < min_jaccard:
        return None
    return f"sampled index overlap {jaccard:.2f}, sign agreement {signs:.2f}"


def check_window(
    subs: Sequence[Submission],
    *,
    close_time: float,
    seed: int,
    min_fraction: float = 0.05,
    max_factor: float = 10.0,
    min_jaccard: float = 0.5,
    reference: Collection[str] | None = None,
    previous: Mapping[str, CompressedTensor] | None = None,
) -> dict[str, Verdict]:
    """Every check above for one window's decoded payloads: each peer's first failure, or PASS.

    Order: on time, empty, norm, copy. Copies are looked for only among payloads whose
    norms passed, so two empty payloads are reported as empty rather than as copies.
    """
    out: dict[str, Verdict] = {}
    for s in subs:
        v = check_on_time(s.modified, close_time)
        if not v.ok:
            out[s.peer] = v
        elif _is_empty(s.tensors):
            out[s.peer] = Verdict(False, "empty", "update is all zeros")
    norms = {s.peer: payload_norm(s.tensors) for s in subs if s.peer not in out}
    out.update({p: v for p, v in check_norms(norms, min_fraction=min_fraction, max_factor=max_factor,
                                             reference=reference).items() if not v.ok})
    remaining = [s for s in subs if s.peer not in out]
    out.update(find_copies(remaining, seed=seed, min_jaccard=min_jaccard, previous=previous))
    return {s.peer: out.get(s.peer, PASS) for s in subs}
