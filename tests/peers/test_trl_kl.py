"""TRL 1.16's bias-corrected KL (``use_bias_correction_kl``) and off-policy sequence mask
(``off_policy_mask_threshold``) against TRL's real code: ``GRPOTrainer._compute_loss`` run on a stand-in
trainer whose model returns given log-probabilities, and the static ``GRPOTrainer.get_off_policy_mask``."""

from __future__ import annotations

import collections
import importlib
import types
import warnings

import pytest
import torch

from peers.cases import MASK_KINDS, TOL, close, mask
from rlhf_kernels.ops.kl import kl_loss
from rlhf_kernels.ops.rollout_correction import off_policy_mask

B, T = 5, 13


@pytest.fixture(scope="module")
def grpo_trainer():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("trl.trainer.grpo_trainer").GRPOTrainer
    except ImportError as error:  # a missing peer is a failure, never a skip
        raise RuntimeError(f"cannot import TRL's GRPOTrainer ({error}); run `make peers`") from error


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _stand_in(trainer_cls, logprobs: torch.Tensor, *, beta: float, level: str, bias_correction: bool,
              off_policy_threshold: float | None = None):
    """The attributes ``_compute_loss`` reads (loss_type "bnpo": Σ L·m / Σ m), with the model's per-token
    log-probabilities replaced by ``logprobs``."""
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        get_off_policy_mask=trainer_cls.get_off_policy_mask,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=off_policy_threshold,
        importance_sampling_level=level,
        beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None),
        loss_type="bnpo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
        accelerator=_Accelerator(),
    )


def _inputs(logprobs, ref, old, completion_mask, advantages, sampling=None):
    out = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    if sampling is not None:
        out["sampling_per_token_logps"] = sampling
    return out


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("kind", ["random", "empty_rows", "left"])
def test_bias_corrected_kl_equals_trl_compute_loss(grpo_trainer, backend, level, bias_correction, kind):
    """Zero advantages leave only β·KL in TRL's loss (value and gradient): β·Σ k3·w·m / Σ m."""
    beta = 0.04
    lp = -torch.rand(B, T) * 2
    ref, old = lp + torch.randn(B, T) * 0.3, lp + torch.randn(B, T) * 0.3
    m = mask(B, T, kind, dtype=torch.long)
    x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    trainer = _stand_in(grpo_trainer, y, beta=beta, level=level, bias_correction=bias_correction)
    peer = grpo_trainer._compute_loss(trainer, None, _inputs(y, ref, old, m, torch.zeros(B)))
    peer.backward()
    extra = {}
    if bias_correction:
        extra = {"kl_correction": "bias_correction", "importance_sampling_level": level}
    ours = beta * kl_loss(x, ref, m, estimator="k3", loss_agg="token-mean",
                          old_logprobs=old if bias_correction else None, **extra)
    ours.backward()
    close(ours, peer, TOL[torch.float32], "loss")
    close(x.grad, y.grad, TOL[torch.float32], "gradient")


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("advantage_shape", ["B", "B1", "BT"])
def test_off_policy_mask_equals_trl(grpo_trainer, kind, advantage_shape):
    lp = -torch.rand(B, T) * 2
    drift = torch.tensor([0.0, 0.5, 0.1, 0.8, 0.3])[:, None]  # row 3 drifted far past the threshold
    sampling = lp + drift + torch.randn(B, T) * 0.1
    sampling[0, 3] = float("nan")  # a token the sampler could not score
    m = mask(B, T, kind, dtype=torch.float32)
    advantages = {"B": torch.randn(B), "B1": torch.randn(B, 1), "BT": torch.randn(B, T)}[advantage_shape]
    advantages[3] = -1.0
    threshold = 0.2
    peer_adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    peer = grpo_trainer.get_off_policy_mask(peer_adv, lp, sampling, m, threshold)
    ours = off_policy_mask(advantages, lp, sampling, m, threshold)
    assert ours.dtype == peer.dtype and ours.shape == peer.shape
    assert torch.equal(ours, peer)
    assert bool((ours[3] == 0).all()) != (kind == "all_masked")  # dropped unless it has no tokens


def test_off_policy_mask_in_trl_compute_loss(grpo_trainer):
    """TRL multiplies the per-token policy loss by the mask: same loss with ours applied by hand."""
    lp = -torch.rand(B, T) * 2
    old = lp + torch.randn(B, T) * 0.5
    m = mask(B, T, "random", dtype=torch.long)
    advantages = torch.tensor([-1.0, 0.5, -2.0, -0.3, 1.0])
    trainer = _stand_in(grpo_trainer, lp, beta=0.0, level="token", bias_correction=False,
                        off_policy_threshold=0.05)
    peer = grpo_trainer._compute_loss(trainer, None, _inputs(lp, None, old, m, advantages))
    keep = off_policy_mask(advantages, lp, old, m, 0.05)
    ratio = torch.exp(lp - old)
    per_token = -torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None]) * keep
    expected = (per_token * m).sum() / m.sum().clamp(min=1)
    close(peer, expected, TOL[torch.float32], "loss with the off-policy mask")
    assert 0 < int((keep == 0).sum()) < B
