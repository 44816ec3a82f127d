"""Validator checks (timing, norms, copies, decoder verdicts) and the evaluation of one update."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from node.model import build_model, lm_loss, param_shapes
from protocol.codec import compress, decompress
from protocol.codec_types import SCALE_ZERO_CODE, CompressedTensor, model_layout
from protocol.errors import BadSignature, LayoutMismatch, OutOfSync, PayloadRejected
from protocol.identity import Identity
from protocol.manifest import CodecConfig, ModelConfig
from protocol.wire import Expectation, decode_payload, encode_payload
from validator.checks import (
    PASS,
    Submission,
    check_norms,
    check_on_time,
    check_window,
    find_copies,
    payload_norm,
    verdict_from_rejection,
)
from validator.evaluate import evaluate_payload, evaluate_update, mean_loss

LAYOUTS = model_layout({"emb": (128, 64), "w": (128, 128), "b": (300,)}, CodecConfig())
CLOSE = 1000.0


def payload(seed: int, scale: float = 1.0) -> dict[str, CompressedTensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: compress(torch.randn(l.shape, generator=gen) * scale, l) for n, l in LAYOUTS.items()}


def sub(peer: str, tensors: dict[str, CompressedTensor], modified: float = 990.0, created_at: float = 980.0) -> Submission:
    return Submission(peer, tensors, modified, created_at)


def honest_window(n: int = 4) -> list[Submission]:
    return [sub(f"peer{i}", payload(i), modified=900.0 + i) for i in range(n)]


def test_honest_payloads_pass_every_check():
    verdicts = check_window(honest_window(), close_time=CLOSE, seed=7)
    assert all(v == PASS for v in verdicts.values())


def test_upload_after_close_is_late():
    assert check_on_time(1000.0, CLOSE).ok
    v = check_on_time(1003.5, CLOSE)
    assert not v.ok and v.check == "late" and "3.5 s after" in v.reason


def test_exact_copy_is_attributed_to_the_later_upload():
    subs = honest_window()
    subs.append(sub("copier", payload(1), modified=950.0))  # peer1 uploaded at 901
    verdicts = check_window(subs, close_time=CLOSE, seed=7)
    assert verdicts["peer1"] == PASS
    assert verdicts["copier"].check == "copy" and "peer1" in verdicts["copier"].reason


def test_rescaled_copy_is_detected():
    original = payload(2)
    rescaled = {n: dataclasses.replace(c, scale_ref=c.scale_ref * 1.5) for n, c in original.items()}
    copies = find_copies([sub("a", original, 10.0), sub("b", rescaled, 20.0)], seed=1)
    assert set(copies) == {"b"}


def test_copy_with_a_few_chunks_changed_is_detected_by_sampled_overlap():
    original = payload(3)
    tampered = dict(original)
    tampered["b"] = payload(99)["b"]  # one small tensor differs: hashes differ, overlap stays high
    copies = find_copies([sub("late", tampered, 30.0, 1.0), sub("early", original, 20.0, 2.0)], seed=5)
    assert set(copies) == {"late"}
    assert "overlap" in copies["late"].reason


def test_copy_uploaded_at_the_same_time_flags_both():
    p = payload(4)
    copies = find_copies([sub("a", p, 10.0, 5.0), sub("b", p, 10.0, 5.0)], seed=1)
    assert set(copies) == {"a", "b"}


def test_created_at_breaks_a_tie_in_store_time():
    p = payload(4)
    copies = find_copies([sub("a", p, 10.0, 6.0), sub("b", p, 10.0, 5.0)], seed=1)
    assert set(copies) == {"a"}


def test_independent_payloads_are_not_copies():
    assert find_copies(honest_window(6), seed=3) == {}


def _flip_signs(tensors: dict[str, CompressedTensor], share: float, seed: int) -> dict[str, CompressedTensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: dataclasses.replace(c, codes=c.codes ^ ((torch.rand(c.codes.shape, generator=gen) < share).to(torch.uint8) << 1))
            for n, c in tensors.items()}


@pytest.mark.parametrize("share", [0.07, 0.5, 1.0])
def test_copy_with_flipped_signs_is_still_a_copy(share: float):
    """Flipping signs (a few, half, or all: a negated copy) leaves the positions someone else found."""
    original = payload(10)
    copies = find_copies([sub("early", original, 10.0), sub("late", _flip_signs(original, share, 1), 20.0)], seed=2)
    assert set(copies) == {"late"}
    assert "sign agreement" in copies["late"].reason


def test_replaying_the_previous_aggregate_is_a_copy():
    previous = payload(11)
    subs = honest_window() + [sub("replay", _flip_signs(previous, 0.05, 2), 950.0)]
    verdicts = check_window(subs, close_time=CLOSE, seed=7, previous=previous)
    assert verdicts["replay"].check == "copy" and "previous window" in verdicts["replay"].reason
    assert all(verdicts[f"peer{i}"] == PASS for i in range(4))


def test_norm_yardstick_is_only_set_by_peers_with_standing():
    """Fresh keys sending huge norms cannot make a standing peer look tiny; with no standing
    peer present, only the absolute checks run."""
    norms = {"standing": 1.0, **{f"sybil{i}": 50.0 for i in range(20)}}
    verdicts = check_norms(norms, reference={"standing"})
    assert verdicts["standing"].ok and all(verdicts[f"sybil{i}"].check == "huge_norm" for i in range(20))
    absent = check_norms({"newcomer": 1.0, **{f"sybil{i}": 50.0 for i in range(20)}, "zero": 0.0},
                         reference={"standing"})
    assert absent["newcomer"].ok and absent["sybil0"].ok and absent["zero"].check == "empty"


def test_all_zero_payload_is_empty():
    zeros = {n: dataclasses.replace(c, scale_q=torch.full_like(c.scale_q, SCALE_ZERO_CODE)) for n, c in payload(5).items()}
    verdicts = check_window(honest_window() + [sub("lazy", zeros)], close_time=CLOSE, seed=7)
    assert verdicts["lazy"].check == "empty"
    assert verdicts["peer0"] == PASS


def test_near_zero_payload_is_refused_relative_to_the_median():
    verdicts = check_window(honest_window() + [sub("tiny", payload(6, scale=1e-3))], close_time=CLOSE, seed=7)
    assert verdicts["tiny"].check == "tiny_norm"


def test_huge_payload_is_refused_and_does_not_move_the_median():
    verdicts = check_window(honest_window() + [sub("huge", payload(7, scale=1e3))], close_time=CLOSE, seed=7)
    assert verdicts["huge"].check == "huge_norm"
    assert all(verdicts[f"peer{i}"] == PASS for i in range(4))


def test_nan_norm_is_refused():
    bad = {n: dataclasses.replace(c, scale_ref=float("nan")) for n, c in payload(8).items()}
    assert math.isnan(payload_norm(bad))
    verdicts = check_norms({"a": 1.0, "b": 1.1, "c": payload_norm(bad), "d": float("inf")})
    assert verdicts["a"].ok and verdicts["b"].ok
    assert verdicts["c"].check == "non_finite" and verdicts["d"].check == "non_finite"


def test_payload_norm_matches_the_dense_norm():
    p = payload(9)
    dense = torch.cat([decompress(c).flatten() for c in p.values()]).double().norm().item()
    assert abs(payload_norm(p) - dense) < 1e-4 * dense


def test_decoder_rejections_become_labelled_verdicts():
    v = verdict_from_rejection(BadSignature("signature does not verify", peer="x", window=3))
    assert (v.ok, v.check, v.reason) == (False, "bad_signature", "signature does not verify")
    assert verdict_from_rejection(OutOfSync("base digest differs")).check == "out_of_sync"


def test_decoded_payloads_from_the_wire_go_through_the_checks():
    run, window, digest = "demo@0000000000000000", 4, bytes(32)
    expect = Expectation(run=run, window=window, layouts=LAYOUTS, codec=CodecConfig(), max_bytes=1 << 24, base_digest=digest)
    subs = []
    for i, tensors in enumerate([payload(20), payload(21), payload(20)]):
        ident = Identity.from_seed(f"wire-peer-{i}".encode())
        data = encode_payload(run=run, window=window, base_digest=digest, tokens=100, tensors=tensors,
                              codec=CodecConfig(), identity=ident, created_at=900.0 + i)
        subs.append(Submission.of(decode_payload(data, expect), modified=950.0 + i))
    verdicts = check_window(subs, close_time=CLOSE, seed=3)
    assert [verdicts[s.peer].check for s in subs] == ["ok", "ok", "copy"]
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0xFF
    with pytest.raises(PayloadRejected) as refused:
        decode_payload(bytes(tampered), expect)
    assert verdict_from_rejection(refused.value).check == "bad_signature"


def test_late_payload_is_reported_late_not_as_copy():
    p = payload(10)
    verdicts = check_window(
        [sub("a", p, 900.0), sub("b", payload(11), 901.0), sub("c", p, 1005.0)], close_time=CLOSE, seed=1
    )
    assert verdicts["c"].check == "late" and verdicts["a"] == PASS


# --- evaluation of one update (validator.evaluate) -------------------------------------

VOCAB, SEQ = 256, 32


def patterned(seed: int, n: int, stride: int) -> torch.Tensor:
    """int64 [n, 4, SEQ+1]: arithmetic token sequences a model can learn quickly."""
    start = torch.randint(0, VOCAB, (n, 4, 1), generator=torch.Generator().manual_seed(seed))
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


@pytest.fixture(scope="module")
def lm() -> torch.nn.Module:
    torch.set_num_threads(1)
    return build_model(ModelConfig(preset="tiny"), VOCAB, SEQ, seed=0)


def gradient(model: torch.nn.Module, batches: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    for batch in batches:
        lm_loss(model, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def compressed(model: torch.nn.Module, dense: dict[str, torch.Tensor]) -> dict[str, CompressedTensor]:
    layouts = model_layout(param_shapes(model), CodecConfig())
    return {name: compress(dense[name], layout) for name, layout in layouts.items()}


def test_evaluation_restores_weights_bit_exactly(lm: torch.nn.Module):
    before = {n: t.clone() for n, t in lm.state_dict().items()}
    update = {n: torch.randn_like(p) * 0.37 for n, p in lm.named_parameters()}
    evaluate_update(lm, update, lr=1.3, scale=0.25, assigned=patterned(0, 1, 3), unassigned=patterned(1, 1, 3))
    after = lm.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert lm.training  # the mode is restored too


def test_true_negative_gradient_improves_loss_and_noise_does_not(lm: torch.nn.Module):
    assigned, unassigned = patterned(2, 2, 3), patterned(3, 2, 3)
    grads = gradient(lm, assigned)
    noise = {n: torch.randn_like(g) * g.norm() / g.numel() ** 0.5 for n, g in grads.items()}
    good = evaluate_payload(lm, compressed(lm, grads), lr=1.0, scale=1.0, assigned=assigned, unassigned=unassigned)
    bad = evaluate_payload(lm, compressed(lm, noise), lr=1.0, scale=1.0, assigned=assigned, unassigned=unassigned)
    assert good.gain_assigned > 0 and good.gain_unassigned > 0
    assert good.score > 10 * max(bad.score, 1e-4)


def test_update_trained_on_assigned_data_shows_evidence(lm: torch.nn.Module):
    assigned, unassigned, elsewhere = patterned(4, 2, 3), patterned(5, 2, 7), patterned(6, 2, 7)
    own = evaluate_update(lm, gradient(lm, assigned), lr=1.0, scale=1.0, assigned=assigned, unassigned=unassigned)
    other = evaluate_update(lm, gradient(lm, elsewhere), lr=1.0, scale=1.0, assigned=assigned, unassigned=unassigned)
    assert own.evidence > 0 > other.evidence


def test_cached_unassigned_loss_gives_the_same_evaluation(lm: torch.nn.Module):
    assigned, unassigned = patterned(7, 1, 3), patterned(8, 1, 3)
    update = gradient(lm, assigned)
    full = evaluate_update(lm, update, lr=1.0, scale=0.5, assigned=assigned, unassigned=unassigned)
    cached = evaluate_update(
        lm, update, lr=1.0, scale=0.5, assigned=assigned, unassigned=unassigned,
        unassigned_before=mean_loss(lm, unassigned),
    )
    assert cached == full


def test_update_for_unknown_tensor_is_a_layout_mismatch(lm: torch.nn.Module):
    with pytest.raises(LayoutMismatch, match="does not have"):
        evaluate_update(lm, {"nope": torch.zeros(3)}, lr=1.0, scale=1.0, assigned=patterned(0, 1, 3), unassigned=patterned(0, 1, 3))
    name, p = next(iter(lm.named_parameters()))
    with pytest.raises(LayoutMismatch, match="shape"):
        evaluate_update(lm, {name: torch.zeros(p.numel() + 1)}, lr=1.0, scale=1.0, assigned=patterned(0, 1, 3), unassigned=patterned(0, 1, 3))
