"""Error feedback: nothing is lost, the residual stays bounded, restore undoes a send."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from protocol.codec import ErrorFeedback, compress, decompress
from protocol.codec_types import model_layout
from protocol.errors import CheckpointError, ManifestError
from protocol.manifest import CodecConfig

SHAPES = {"w": (128, 128), "norm": (128,), "odd": (3, 1500)}


def _delta(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


def _ef(**codec) -> ErrorFeedback:
    cfg = CodecConfig(**codec)
    return ErrorFeedback(model_layout(SHAPES, cfg), cfg, "cpu")


def test_each_round_splits_beta_e_plus_delta_into_sent_and_kept_exactly():
    ef = _ef()
    for r in range(5):
        before = {n: e.clone() for n, e in ef.buffers.items()}
        delta = _delta(r)
        sent = ef.compress(delta)
        for name in SHAPES:
            whole = 0.95 * before[name] + delta[name]
            torch.testing.assert_close(decompress(sent[name]) + ef.buffers[name], whole, rtol=0, atol=1e-5)


def test_sent_over_many_rounds_adds_up_to_the_deltas_minus_what_is_still_owed():
    # e_T = beta e_{T-1} + d_T - s_T  =>  sum s = sum d - e_T - (1 - beta) * sum_{t<T} e_t
    ef = _ef()
    total_sent = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    total_delta = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    decayed = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    for r in range(60):
        for n in SHAPES:
            decayed[n] += 0.05 * ef.buffers[n].double()
        delta = _delta(100 + r)
        sent = ef.compress(delta)
        for n in SHAPES:
            total_sent[n] += decompress(sent[n]).double()
            total_delta[n] += delta[n].double()
    for n in SHAPES:
        owed = total_delta[n] - ef.buffers[n].double() - decayed[n]
        torch.testing.assert_close(total_sent[n], owed, rtol=0, atol=1e-3)


def test_residual_stays_bounded_over_200_rounds_instead_of_growing():
    ef = _ef()
    norms = []
    for r in range(200):
        ef.compress(_delta(r))
        norms.append(_norm(ef.buffers))
    one_delta = _norm(_delta(0))
    # Without sending, ||e|| would approach 20x a delta (1 / (1 - beta)); without decay it
    # would grow like sqrt(rounds). It must settle, not keep rising.
    assert max(norms[150:]) < 1.1 * max(norms[50:100])
    assert max(norms) < 20 * one_delta


def test_every_coordinate_is_sent_eventually_when_the_deltas_are_equal_in_size():
    # Top-k sends 64 of 4096 per round, so covering a chunk takes >= 64 rounds; error
    # feedback must rotate through all coordinates rather than resend the same ones.
    # (With beta = 0.95 EF remembers ~20 rounds: a coordinate whose persistent delta is even
    # 5% smaller than its chunk's largest ones saturates at delta / (1 - beta) below them
    # and can starve. That is the method, not this code; see the report.)
    ef = _ef()
    g = torch.Generator().manual_seed(9)
    delta = {n: torch.randn(s, generator=g).sign() for n, s in SHAPES.items()}
    ever_sent = {n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}
    for _ in range(200):
        sent = ef.compress(delta)
        for n in SHAPES:
            ever_sent[n] |= decompress(sent[n]) != 0
    assert all(bool(m.all()) for m in ever_sent.values())


@pytest.mark.parametrize("lookahead", [0.5, 1.0])
def test_lookahead_sends_the_top_k_of_e_plus_lambda_delta_and_keeps_the_books(lookahead: float):
    ef = _ef(ef_lookahead=lookahead)
    for r in range(6):
        before = {n: e.clone() for n, e in ef.buffers.items()}
        delta = _delta(r)
        sent = ef.compress(delta)
        for n in SHAPES:
            want = compress(before[n] * 0.95 + delta[n] + lookahead * delta[n], ef.layouts[n])
            assert torch.equal(sent[n].idx, want.idx) and torch.equal(sent[n].codes, want.codes)
            torch.testing.assert_close(decompress(sent[n]) + ef.buffers[n], 0.95 * before[n] + delta[n], rtol=0, atol=1e-5)
    # A selected coordinate carries an advance: the buffer owes it back (negative balance).
    w = decompress(sent["w"])
    assert float((ef.buffers["w"] * w.sign())[w != 0].mean()) < 0


def test_restore_undoes_a_lookahead_send_exactly():
    ef = _ef(ef_lookahead=1.0)
    ef.compress(_delta(1))
    before = {n: e.clone() for n, e in ef.buffers.items()}
    delta = _delta(2)
    ef.restore(ef.compress(delta))
    for n in SHAPES:
        torch.testing.assert_close(ef.buffers[n], 0.95 * before[n] + delta[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", [-0.1, 4.5, float("nan")])
def test_a_lookahead_outside_zero_to_four_is_refused(value: float):
    with pytest.raises(ManifestError, match="ef_lookahead"):
        CodecConfig(ef_lookahead=value)


def test_restore_puts_back_exactly_what_was_sent():
    ef = _ef()
    ef.compress(_delta(1))
    before = {n: e.clone() for n, e in ef.buffers.items()}
    delta = _delta(2)
    sent = ef.compress(delta)
    ef.restore(sent)
    for n in SHAPES:
        torch.testing.assert_close(ef.buffers[n], 0.95 * before[n] + delta[n], rtol=0, atol=1e-5)


def test_state_survives_a_safetensors_round_trip(tmp_path):
    ef = _ef()
    for r in range(3):
        ef.compress(_delta(r))
    save_file(ef.state_dict(), tmp_path / "ef.safetensors")
    other = _ef()
    other.load_state_dict(load_file(tmp_path / "ef.safetensors"))
    delta = _delta(10)
    a, b = ef.compress(delta), other.compress(delta)
    for n in SHAPES:
        assert torch.equal(a[n].idx, b[n].idx) and torch.equal(a[n].codes, b[n].codes)
        assert torch.equal(ef.buffers[n], other.buffers[n])


def test_state_of_another_model_is_refused():
    ef = _ef()
    state = ef.state_dict()
    state["w"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match="shape"):
        ef.load_state_dict(state)
    with pytest.raises(CheckpointError, match="do not match"):
        ef.load_state_dict({"w": torch.zeros(128, 128)})


def test_pseudo_gradient_with_missing_tensor_is_refused():
    ef = _ef()
    delta = _delta(0)
    del delta["norm"]
    with pytest.raises(ValueError, match="missing"):
        ef.compress(delta)


def test_the_removed_loco_rule_is_refused_by_name_and_the_paper_rule_keeps_the_run_identity():
    with pytest.raises(ManifestError, match="codec.ef_rule"):
        CodecConfig(ef_rule="loco")
    assert CodecConfig(ef_rule="sparseloco") == CodecConfig()
