"""Deterministic aggregation of the window's compressed pseudo-gradients.

Every honest replica must compute the bit-identical aggregate from the same set of
payloads, whatever order they arrived in, whatever device or thread count it runs on.
So, per tensor:

1. Norms. Each peer's contribution norm comes from its compressed values (no densifying):
   per chunk, ``scale^2 * sum_j LEVELS[bit_j]^2`` in float64, summed with ``math.fsum``
   (exactly rounded, hence independent of order, threads and device).
2. Clipping ("median"): each contribution is scaled by ``min(1, median_norm / norm)``, the
   median taken over the peers *with standing* in this window (listed by the run or rated
   by a majority of validators; all peers when none has standing). One peer with a huge
   update moves the model no more than a typical one, and a swarm of fresh keys cannot move
   the median: it is not theirs.
3. Accumulation in float32, peers sorted by peer id, one scatter-add per peer into a single
   dense accumulator. Within one peer's tensor the positions are unique, so each scatter is
   elementwise and deterministic on CPU and CUDA alike.
4. Rule: "mean_selected" divides each coordinate by the number of peers that sent it (0 if
   none, the reference SparseLoCo rule); "mean" divides by the number of peers.

Memory: one dense float32 accumulator and one int32 count buffer per tensor, plus the
peers' *compressed* tensors (median clipping needs every norm before anything is added;
int32 positions and uint8 codes, 5 bytes per kept value). A peer's contribution is never
densified, and ``iter_aggregate`` hands out one finished tensor at a time.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Collection, Iterable, Iterator, Mapping

import torch

from protocol.codec import flat_positions, sparse_values
from protocol.codec_types import LEVELS, CompressedTensor, TensorLayout
from protocol.errors import LayoutMismatch
from protocol.manifest import OUTER_CLIPS, OUTER_RULES, check_choice

log = logging.getLogger(__name__)



def tensor_norm(c: CompressedTensor) -> float:
    """L2 norm of the decoded tensor, computed from the codes only; exactly reproducible.

    Per chunk: ``scale^2 * (n_low * LEVELS[0]^2 + n_high * LEVELS[1]^2)`` in float64
    (elementwise, so identical on every device), then an exactly rounded ``math.fsum``.
    """
    lo, hi = LEVELS
    n_high = (c.codes & 1).to(torch.float64).sum(dim=1)  # [n]: exact small integers
    n_low = float(c.layout.k) - n_high
    scales = c.scales().to(torch.float64)
    per_chunk = scales * scales * (n_low * (lo * lo) + n_high * (hi * hi))
    return math.sqrt(math.fsum(per_chunk.cpu().tolist()))


def clip_factors(norms: Mapping[str, float], reference: Collection[str] | None = None) -> dict[str, float]:
    """Per peer, the factor ``min(1, median / norm)`` that clips its norm to the median.

    ``norms`` maps peer id to that peer's norm for one tensor; the median is taken over the
    peers in ``reference`` that are present (all peers when none is, or when None). The
    median of an even count is the mean of the two middle norms (exact, order-free).
    """
    if not norms:
        return {}
    ref = [n for p, n in norms.items() if reference is None or p in reference] or list(norms.values())
    median = statistics.median(ref)
    return {peer: (1.0 if n <= median else median / n) for peer, n in norms.items()}


def _check_layouts(peer: str, tensors: Mapping[str, CompressedTensor], layouts: Mapping[str, TensorLayout]) -> None:
    if set(tensors) != set(layouts):
        missing = sorted(set(layouts) - set(tensors))
        extra = sorted(set(tensors) - set(layouts))
        raise LayoutMismatch(f"tensors differ from the run's model: missing {missing}, extra {extra}", peer=peer)
    for name, layout in layouts.items():
        if tensors[name].layout != layout:
            raise LayoutMismatch(f"tensor {name!r} has layout {tensors[name].layout}, run says {layout}", peer=peer)


def aggregate(
    contributions: Iterable[tuple[str, Mapping[str, CompressedTensor]]],
    layouts: Mapping[str, TensorLayout],
    *,
    rule: str = "mean_selected",
    clip: str = "median",
    reference: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The window's aggregate pseudo-gradient: float32 tensors of the model's shapes (all of
    ``iter_aggregate`` at once)."""
    return dict(iter_aggregate(contributions, layouts, rule=rule, clip=clip, reference=reference))


def iter_aggregate(
    contributions: Iterable[tuple[str, Mapping[str, CompressedTensor]]],
    layouts: Mapping[str, TensorLayout],
    *,
    rule: str = "mean_selected",
    clip: str = "median",
    reference: Collection[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The window's aggregate pseudo-gradient, one ``(name, float32 tensor)`` at a time, in
    ``layouts`` order: a caller that applies each tensor before asking for the next holds
    one dense tensor, not a dense model, beside the peers' compressed payloads.

    ``contributions`` yields ``(peer_id, tensors)`` once each, in any order (a generator is
    fine; it is consumed once). The result is bit-identical for any order of the same
    contributions and any ``torch.set_num_threads``. With no contributions every tensor is
    zero. ``reference``: the peers whose norms median clipping is referenced to (see the
    module docstring). Raises ``LayoutMismatch`` for a contribution whose tensors differ from
    ``layouts``, ``ValueError`` for a repeated peer id and ``ManifestError`` for an unknown
    rule or clip (the manifest's own check).
    """
    check_choice("outer.rule", rule, OUTER_RULES)
    check_choice("outer.clip", clip, OUTER_CLIPS)

    peers: dict[str, Mapping[str, CompressedTensor]] = {}
    for peer, tensors in contributions:
        if peer in peers:
            raise ValueError(f"peer {peer} contributes twice to one aggregate")
        _check_layouts(peer, tensors, layouts)
        peers[peer] = tensors
    order = sorted(peers)
    device = next(iter(peers[order[0]].values())).idx.device if order else torch.device("cpu")
    log.debug("aggregating %d peers over %d tensors (rule=%s, clip=%s)", len(order), len(layouts), rule, clip)

    for name, layout in layouts.items():
        # Both buffers in the tensor's own flat order: no tile permutation at the end.
        acc = torch.zeros(layout.numel, dtype=torch.float32, device=device)
        count = torch.zeros(layout.numel, dtype=torch.int32, device=device) if rule == "mean_selected" else None
        if clip == "median":
            factors = clip_factors({p: tensor_norm(peers[p][name]) for p in order}, reference)
        else:
            factors = dict.fromkeys(order, 1.0)
        ones = torch.ones(layout.n_chunks * layout.k, dtype=torch.int32, device=device)
        for peer in order:
            c = peers[peer][name]
            where = flat_positions(c.idx, layout).reshape(-1)  # unique: one add per position
            vals = sparse_values(c).reshape(-1)
            if factors[peer] != 1.0:
                vals = vals * torch.tensor(factors[peer], dtype=torch.float32, device=device)
            acc.scatter_add_(0, where, vals)
            if count is not None:
                count.scatter_add_(0, where, ones)
        if count is not None:
            acc = torch.where(count > 0, acc / count.clamp_min(1).to(torch.float32), 0.0)
        elif order:
            # Tensor / tensor: some backends turn "/ scalar" into "* (1/scalar)", which rounds differently.
            acc = acc / torch.full_like(acc, float(len(order)))
        yield name, acc.reshape(layout.shape)
