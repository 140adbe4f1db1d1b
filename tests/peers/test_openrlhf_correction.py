"""The core ``is_correction`` (rlhf_kernels.ops.rollout_correction) against OpenRLHF 0.11.2's own
``PolicyLoss``: the per-token coefficient read off the real loss (at lp = old, the token loss is −A, so
∂loss/∂A_t = −coefficient_t·m_t / Σ m), and its ``vllm_kl`` / ``is_filter_ratio`` outputs."""

from __future__ import annotations

import pytest
import torch

from peers.cases import TOL, close, logprob_pair, mask
from rlhf_kernels.ops.rollout_correction import is_correction

B, T = 6, 11

CORRECTIONS = [
    ("token", "mask", "ratio", (0.5, 5.0)),
    ("token", "mask", "ratio", (0.9, 1.1)),
    ("token", "clip", "ratio", (0.8, 1.25)),
    ("seq", "mask", "ratio", (0.7, 1.4)),
    ("token", "mask", "binary_kl", (0.0, 0.02)),
    ("seq", "mask", "binary_kl", (0.0, 0.01)),
    ("token", "mask", "tv", (0.0, 0.05)),
    ("seq", "mask", "tv", (-1.0, 0.03)),
]


def _peer_coefficient(peer_cls, old, rollout, m, level, mode, gating, threshold):
    loss_fn = peer_cls(is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
                       is_correction_threshold=threshold, token_level_loss=True)
    advantages = (-torch.rand(B, T) - 0.5).requires_grad_()
    loss, _, _, vllm_kl, filter_ratio = loss_fn(old.clone(), old, advantages, m, rollout)
    loss.backward()
    return -advantages.grad * m.sum(), vllm_kl, filter_ratio


@pytest.mark.parametrize(("level", "mode", "gating", "threshold"), CORRECTIONS)
@pytest.mark.parametrize("kind", ["random", "empty_rows", "holes"])
def test_is_correction_equals_openrlhf_policy_loss(openrlhf_peer, level, mode, gating, threshold, kind):
    old, _ = logprob_pair(B, T, torch.float32)
    rollout = old + torch.randn(B, T) * 0.3
    m = mask(B, T, kind, dtype=torch.float32)
    peer_coef, peer_kl, peer_ratio = _peer_coefficient(openrlhf_peer.PolicyLoss, old, rollout, m, level, mode,
                                                       gating, threshold)
    coefficient, metrics = is_correction(old, rollout, m, level="sequence" if level == "seq" else "token",
                                         mode=mode, gating=gating, threshold=threshold)
    valid = m != 0
    close(coefficient[valid], peer_coef[valid], TOL[torch.float32], "coefficient")
    assert bool((coefficient[~valid] == 0).all())
    close(metrics["vllm_kl"], peer_kl, TOL[torch.float32], "vllm_kl")
    close(metrics["is_filter_ratio"], peer_ratio, TOL[torch.float32], "is_filter_ratio")
    rejected = (coefficient[valid] == 0).any() or mode == "clip"
    assert rejected or kind != "random" or threshold[1] > 1.3  # the tight bands do reject something


def test_is_correction_masked_positions_and_errors():
    old = -torch.rand(3, 5)
    rollout = old + 0.1
    m = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    poisoned = old.masked_fill(~m, float("nan"))
    coefficient, metrics = is_correction(poisoned, rollout, m, level="sequence")
    clean, clean_metrics = is_correction(old, rollout, m, level="sequence")
    assert torch.equal(coefficient, clean) and coefficient.isfinite().all()
    assert metrics["is_filter_ratio"] == pytest.approx(1 / 3)  # the empty row counts as rejected (OpenRLHF)
    with pytest.raises(ValueError, match="mode='clip' needs level='token' and gating='ratio'"):
        is_correction(old, rollout, m, mode="clip", gating="tv", threshold=(0.0, 0.1))
    with pytest.raises(ValueError, match="gating='tv' takes an upper bound only"):
        is_correction(old, rollout, m, gating="tv", threshold=(0.1, 0.2))
    with pytest.raises(ValueError, match="gating must be one of"):
        is_correction(old, rollout, m, gating="kl")
