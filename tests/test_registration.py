"""Compiler and graph readiness of every op in the library.

* Every op registered under ``torch.ops.rlhf_kernels`` passes ``torch.library.opcheck`` (schema, fake
  tensor, autograd registration, AOT dispatch with dynamic shapes) on its PyTorch path on CPU; a new op
  without a sample here fails ``test_every_registered_op_has_samples``.
* Every public function traces under ``torch.compile(fullgraph=True, dynamic=True)``, forward and
  backward, and equals eager, on the PyTorch path on CPU (two shapes: no graph break, no re-trace
  needed for a new size).
* On CUDA (skipped without one; run on the GPU machine): the same on the Triton paths, and a whole PPO
  training step captured in a CUDA graph and replayed on new data (no host synchronisation anywhere).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable

import pytest
import torch
from conftest import HAS_CUDA
from test_linear_distill_loss import registration_samples as _linear_distill_samples
from test_ratings import registration_samples as _ratings_samples

import rlhf_kernels.ops
from rlhf_kernels import (
    _dispatch,
    _ext,
    agg_loss,
    broadcast_to_tokens,
    compute_gae,
    entropy_from_logits,
    group_advantages,
    kl_loss,
    kl_penalty,
    linear_logprobs,
    logprobs_from_logits,
    masked_whiten,
    pairwise_reward_loss,
    pointwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_hinge_loss,
    ranking_reward_loss,
    token_level_rewards,
)
from rlhf_kernels.ops.policy_losses import POLICY_LOSSES
from rlhf_kernels.ops.sampling_logprobs import sampling_logprobs

# Every family's module registers its ops on import (rlhf_kernels itself imports them lazily).
for _module in pkgutil.walk_packages(rlhf_kernels.ops.__path__, prefix="rlhf_kernels.ops."):
    importlib.import_module(_module.name)

NAMESPACE = "rlhf_kernels"
OPS = torch.ops.rlhf_kernels


def registered_ops() -> list[str]:
    prefix = f"{NAMESPACE}::"
    return sorted(
        name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)
    )


# ---------------------------------------------------------------------------------------------------
# Sample arguments for every registered op: small, odd shapes; every differentiable input of an op with
# autograd requires grad, so that opcheck checks the autograd registration and the backward.
# ---------------------------------------------------------------------------------------------------
def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def _logprobs_samples(device: str) -> dict[str, list[tuple]]:
    logits = _grad(torch.randn(5, 11, device=device) * 2)
    strided = _grad(torch.randn(2, 4, 11, device=device))
    labels = torch.randint(0, 11, (5,), device=device)
    labels[1] = -100
    labels8 = torch.randint(0, 11, (8,), device=device)
    x = logits.detach()
    lp, ent, lse = OPS.logprobs_fwd_torch(x, labels, 1 / 0.7, -100, True)
    _, no_ent, lse2 = OPS.logprobs_fwd_torch(x, labels, 1.0, -100, False)
    g = torch.randn(5, device=device)
    bwd = [
        (g, torch.randn(5, device=device), x, labels, lse, ent, 1 / 0.7, -100),
        (g, g.new_empty(0), x, labels, lse2, no_ent, 1.0, -100),
    ]
    return {
        "logprobs_fwd": [
            (logits, labels, 1 / 0.7, -100, True, False),
            (logits, labels, 1.0, -100, False, True),
            (strided[:, :-1], labels8[:6], 1.0, -100, True, False),
        ],
        "logprobs_fwd_torch": [
            (logits, labels, 1.0, -100, True),
            (strided[:, 1:], labels8[:6], 2.0, 3, False),
        ],
        "logprobs_bwd": bwd,
        "logprobs_bwd_torch": bwd,
        "logprobs_bwd_inplace": [(a, b, c.clone(), *rest) for a, b, c, *rest in bwd],
        "logprobs_bwd_inplace_torch": [(a, b, c.clone(), *rest) for a, b, c, *rest in bwd],
    }


def _token_stats_samples(device: str) -> dict[str, list[tuple]]:
    logits = _grad(torch.randn(5, 11, device=device) * 2)
    strided = _grad(torch.randn(2, 4, 11, device=device))
    labels = torch.randint(0, 11, (5,), device=device)
    labels[1] = -100
    labels8 = torch.randint(0, 11, (8,), device=device)
    x = logits.detach()
    _, ent, sq, _, _, _, idx, lse = OPS.token_stats_fwd_torch(
        x, labels, 1.5, 3.0, 1 / 0.7, -100, True, True, True, True, 4
    )
    *_, lse2 = OPS.token_stats_fwd_torch(x, labels, 1.0, 0.0, 1.0, -100, False, False, False, False, 0)
    g, e = torch.randn(5, device=device), x.new_empty(0)
    bwd = [
        (g, torch.randn(5, device=device), torch.randn(5, device=device), torch.randn(5, device=device),
         torch.randn(5, 4, device=device), x, labels, lse, ent, sq, idx, 1.5, 3.0, 1 / 0.7, -100),
        (g, e, e, e, e, x, labels, lse2, e, e, e, 1.0, 0.0, 1.0, -100),
        # a vocabulary shard: columns [3, 14) of 20
        (g, e, e, e, e, x, labels, lse2, e, e, e, 1.0, 0.0, 1.0, -100, 3, 20),
    ]
    fwd = [
        (logits, labels, 1.5, 3.0, 1 / 0.7, -100, True, True, True, True, 4),
        (logits, labels, 1.0, 0.0, 1.0, -100, False, False, False, False, 0),
        (strided[:, :-1], labels8[:6], 1.0, 0.0, 2.0, -100, True, False, True, False, 3),
    ]
    return {
        "token_stats_fwd": fwd,
        "token_stats_fwd_torch": [(a.detach(), *rest) for a, *rest in fwd],
        "token_stats_bwd": bwd,
        "token_stats_bwd_torch": bwd,
    }


def _kl_samples(device: str) -> dict[str, list[tuple]]:
    lp = _grad(-torch.rand(13, device=device) * 3)
    ref = _grad(lp.detach() + torch.randn(13, device=device))
    estimators = ("k1", "abs", "k2", "k3")
    g = torch.randn(13, device=device)
    return {
        "kl_penalty": [(lp, ref, e) for e in estimators],
        "kl_penalty_fwd_torch": [(lp.detach(), ref.detach(), e) for e in estimators],
        "kl_penalty_bwd": [
            (g, lp.detach(), ref.detach(), e, need) for e in estimators for need in (True, False)
        ],
        "kl_penalty_bwd_torch": [
            (g, lp.detach(), ref.detach(), "k3", True),
            (g, lp.detach(), ref.detach(), "k1", False),
        ],
    }


def _policy_losses_samples(device: str) -> dict[str, list[tuple]]:
    lp = _grad(-torch.rand(3, 9, device=device) * 3)
    old = lp.detach() + torch.randn(3, 9, device=device) * 0.4
    adv = torch.randn(3, 9, device=device)
    mask = torch.rand(3, 9, device=device) < 0.7
    mask[1] = False
    w = torch.rand(3, 9, device=device) * 2
    sel = (torch.rand(3, 9, device=device) < 0.3).float()
    seq = torch.randn(3, 1, device=device).expand(3, 9)
    fwd = [
        (lp, old, adv, mask, None, None, "vanilla", [0.2, 0.28, 3.0]),
        (lp, old, adv, mask.float(), None, w, "sapo", [1.0, 1.05]),
        (lp, old, adv, mask, sel, w, "clip_cov", [0.2, 0.2]),
        (lp, old, adv, mask, seq, None, "gspo", [0.2, 0.2]),
        (lp, old, adv, mask, None, None, "dro", [0.3]),
    ]
    partials, _ = OPS.policy_loss_token_fwd_torch(
        lp.detach(), old, adv, mask, None, None, "cispo", [0.2, 0.2]
    )
    g = torch.randn_like(partials)
    bwd = [
        (g, lp.detach(), old, adv, mask, None, w, "cispo", [0.2, 0.28]),
        (g, lp.detach(), old, adv, mask, sel, None, "kl_cov", [0.5]),
        (g, lp.detach(), old, adv, mask, None, None, "geo_mean", [0.1, 0.1]),
    ]
    return {
        "policy_loss_token_fwd": fwd,
        "policy_loss_token_fwd_torch": [(a[0].detach(), *a[1:]) for a in fwd],
        "policy_loss_token_bwd": bwd,
        "policy_loss_token_bwd_torch": bwd,
        "policy_loss_token_fwd_cpp": [(a[0].detach(), *a[1:]) for a in fwd],
        "policy_loss_token_bwd_cpp": bwd,
        "policy_loss_token_fwd_saving_cpp": fwd,
        "policy_loss_token_saved_bwd_cpp": [
            (g, torch.randn(3, 9, device=device), mask, torch.float32),
            (g.double(), torch.randn(3, 9, device=device, dtype=torch.float64), mask.float(), torch.bfloat16),
        ],
    }


def _advantage_samples(device: str) -> dict[str, list[tuple]]:
    rewards, values = torch.randn(3, 9, device=device), torch.randn(3, 9, device=device)
    mask = torch.rand(3, 9, device=device) < 0.7
    mask[1] = False
    gae = [(rewards, values, mask, 0.99, 0.95, True), (rewards, values, mask.float(), 1.0, 1.0, False)]
    lp, ref = -torch.rand(3, 9, device=device), -torch.rand(3, 9, device=device)
    scores = torch.randn(3, device=device)
    rewards_args = [
        (scores, lp, ref, mask, 0.05, "k1", 5.0, True),
        (scores, lp, ref, mask.float(), 0.1, "k3", 0.0, False),
    ]
    x = torch.randn(4, 7, device=device) * 3
    wmask = torch.rand(4, 7, device=device) < 0.6
    whiten = [(x, wmask, True, True, 1e-8, False), (x, wmask.float(), False, False, 0.0, True)]
    return {
        "compute_gae": gae,
        "gae_torch": gae,
        "gae_cpp": gae,
        "gae_cuda": gae,
        "token_level_rewards": rewards_args,
        "token_rewards_torch": rewards_args,
        "masked_whiten": whiten,
        "masked_whiten_torch": whiten,
    }


def _ppo_samples(device: str) -> dict[str, list[tuple]]:
    lp = _grad(-torch.rand(3, 9, device=device) * 3)
    old = lp.detach() + torch.randn(3, 9, device=device) * 0.4
    adv = torch.randn(3, 9, device=device)
    mask = torch.rand(3, 9, device=device) < 0.7
    mask[1] = False
    policy = [(lp, old, adv, mask, 0.2, 0.28, None), (lp, old, adv, mask.float(), 0.1, 0.1, 3.0)]
    partials, _ = OPS.ppo_policy_loss_fwd_torch(lp.detach(), old, adv, mask, 0.2, 0.28, None)
    gp = torch.randn_like(partials)
    policy_bwd = [
        (gp, lp.detach(), old, adv, mask, 0.2, 0.28, None),
        (gp, lp.detach(), old, adv, mask, 0.2, 0.2, 3.0),
    ]
    values = _grad(torch.randn(3, 9, device=device))
    old_values, returns = torch.randn(3, 9, device=device), torch.randn(3, 9, device=device)
    value = [(values, old_values, returns, mask, 0.5), (values, old_values, returns, mask.float(), None)]
    vpartials, _ = OPS.ppo_value_loss_fwd_torch(values.detach(), old_values, returns, mask, 0.5)
    gv = torch.randn_like(vpartials)
    value_bwd = [
        (gv, values.detach(), old_values, returns, mask, 0.5),
        (gv, values.detach(), old_values, returns, mask, None),
    ]
    return {
        "ppo_policy_loss_fwd": policy,
        "ppo_policy_loss_fwd_torch": policy,
        "ppo_policy_loss_bwd": policy_bwd,
        "ppo_policy_loss_bwd_torch": policy_bwd,
        "ppo_value_loss_fwd": value,
        "ppo_value_loss_fwd_torch": value,
        "ppo_value_loss_bwd": value_bwd,
        "ppo_value_loss_bwd_torch": value_bwd,
        "ppo_policy_loss_fwd_cpp": policy,
        "ppo_policy_loss_bwd_cpp": policy_bwd,
        "ppo_value_loss_fwd_cpp": value,
        "ppo_value_loss_bwd_cpp": value_bwd,
    }


def _reward_samples(device: str) -> dict[str, list[tuple]]:
    chosen, rejected = _grad(torch.randn(7, device=device)), _grad(torch.randn(7, device=device))
    margin = torch.rand(7, device=device)
    pair = [(chosen, rejected, None, 0.0), (chosen, rejected, margin, 0.0), (chosen, rejected, None, 0.3)]
    partials, _ = OPS.pairwise_reward_loss_fwd_torch(chosen.detach(), rejected.detach(), margin, 0.0)
    gp = torch.randn_like(partials)
    pair_bwd = [
        (gp, chosen.detach(), rejected.detach(), margin, 0.0),
        (gp, chosen.detach(), rejected.detach(), None, 0.2),
    ]
    pred, target = _grad(torch.randn(7, device=device)), torch.randn(7, device=device)
    point_partials = OPS.pointwise_reward_loss_fwd_torch(pred.detach(), target)
    scores = _grad(torch.randn(3, 5, device=device))
    rmask = torch.rand(3, 5, device=device) < 0.8
    ranking = [(scores, None, False), (scores, rmask, False), (scores, rmask, True)]
    rpartials, _ = OPS.ranking_loss_fwd_torch(scores.detach(), rmask, False)
    gr = torch.randn_like(rpartials)
    ranking_bwd = [(gr, scores.detach(), rmask, False), (gr, scores.detach(), None, True)]
    return {
        "pairwise_reward_loss_fwd": pair,
        "pairwise_reward_loss_fwd_torch": pair,
        "pairwise_reward_loss_bwd": pair_bwd,
        "pairwise_reward_loss_bwd_torch": pair_bwd,
        "pointwise_reward_loss_fwd": [(pred, target)],
        "pointwise_reward_loss_fwd_torch": [(pred, target)],
        "pointwise_reward_loss_bwd": [(torch.randn_like(point_partials), pred.detach(), target)],
        "pointwise_reward_loss_bwd_torch": [(torch.randn_like(point_partials), pred.detach(), target)],
        "ranking_loss_fwd": ranking,
        "ranking_loss_fwd_torch": ranking,
        "ranking_loss_bwd": ranking_bwd,
        "ranking_loss_bwd_torch": ranking_bwd,
    }


def _linear_logprobs_samples(device: str) -> dict[str, list[tuple]]:
    hidden = _grad(torch.randn(6, 8, device=device) * 0.5)
    weight = _grad(torch.randn(13, 8, device=device) * 0.5)
    bias = _grad(torch.randn(13, device=device))
    labels = torch.randint(0, 13, (6,), device=device)
    labels[2] = -100
    # logit_scale, softcap, with_sum_sq, with_top1, with_mean, batch_invariant (issue 15)
    extras = (1.3, 2.0, True, True, True, True)
    fwd = [
        (hidden, weight, None, labels, 1.0, -100, True),
        (hidden, weight, bias, labels, 1 / 0.7, -100, False),
        (hidden, weight, bias, labels, 1 / 0.7, -100, True, *extras),
        (hidden, weight, bias, labels, 1 / 0.7, -100, False, *extras, 4),  # top_k = 4
    ]
    h, w, b = hidden.detach(), weight.detach(), bias.detach()
    stats = [(h, w, None, labels, 1.0, 0, True), (h, w, b, labels, 2.0, 5, False, -100, True)]  # internal
    stats_torch = [
        stats[0],
        (h, w, b, labels, 2.0, 5, True, 1.3, 2.0, True, True, -100, True),
        (h, w, b, labels, 2.0, 0, False, 1.3, 2.0, False, False, -100, False, 4),
    ]
    _, ent, sum_sq, _, _, _, topk_indices, lse = OPS.linear_logprobs_fwd(
        h, w, b, labels, 1.0, -100, True, *extras, 4
    )
    g, ge = torch.randn(6, device=device), torch.randn(6, device=device)
    gq, gm = torch.randn(6, device=device), torch.randn(6, device=device)
    gk = torch.randn(6, 4, device=device)
    bwd = [
        (g, ge, h, w, b, labels, lse, ent, 1.0, -100, 0, 13, True, True, True),
        (g, g.new_empty(0), h, w, None, labels, lse, ent, 1.0, -100, 0, 13, True, False, False),
        (g, ge, h, w, b, labels, lse, ent, 1.0, -100, 0, 13, True, True, True, gq, gm, sum_sq, 1.3, 2.0,
         True),
        (g, ge, h, w, b, labels, lse, ent, 1.0, -100, 0, 13, True, True, True, gq, gm, sum_sq, 1.3, 2.0,
         True, gk, topk_indices),
    ]
    bwd_torch = [args[:11] + args[12:] for args in bwd]
    return {
        "linear_logprobs_fwd": fwd,
        "linear_logprobs_stats": stats,
        "linear_logprobs_stats_torch": stats_torch,
        "linear_logprobs_bwd": bwd,
        "linear_logprobs_bwd_torch": bwd_torch,
    }


def _sampling_logprobs_samples(device: str) -> dict[str, list[tuple]]:
    logits = _grad(torch.randn(5, 11, device=device) * 2)
    strided = _grad(torch.randn(2, 4, 11, device=device))
    labels = torch.randint(0, 11, (5,), device=device)
    labels[1] = -100
    labels8 = torch.randint(0, 11, (8,), device=device)
    x = logits.detach()
    # (inv_temperature, top_k, top_p, log_min_p, ignore_index, with_entropy)
    settings = (1 / 0.7, 4, 0.9, math.log(0.05), -100, True)
    _, ent, _, lse, thr = OPS.sampling_logprobs_fwd_torch(x, labels, *settings)
    _, no_ent, _, lse2, thr2 = OPS.sampling_logprobs_fwd_torch(x, labels, 1.0, 0, 0.8, -math.inf, -100, False)
    g = torch.randn(5, device=device)
    bwd = [
        (g, torch.randn(5, device=device), x, labels, lse, ent, thr, 1 / 0.7, -100),
        (g, g.new_empty(0), x, labels, lse2, no_ent, thr2, 1.0, -100),
    ]
    return {
        "sampling_logprobs_fwd": [
            (logits, labels, *settings),
            (logits, labels, 1.0, 0, 1.0, -math.inf, -100, False),
            (strided[:, :-1], labels8[:6], 1.0, 3, 0.5, -math.inf, -100, True),
        ],
        "sampling_logprobs_fwd_torch": [
            (logits, labels, *settings),
            (strided[:, 1:], labels8[:6], 2.0, 0, 0.7, -math.inf, 3, False),
        ],
        "sampling_logprobs_bwd": bwd,
        "sampling_logprobs_bwd_torch": bwd,
    }


def _policy_selection_samples(device: str) -> dict[str, list[tuple]]:
    """The C++ passes of ops/cpu/_policy_selection.py (CPU tensors only; see _skip_reason)."""
    lp = -torch.rand(3, 9, device=device) * 3
    old = lp + torch.randn(3, 9, device=device) * 0.4
    adv = torch.randn(3, 9, device=device)
    mask = torch.rand(3, 9, device=device) < 0.7
    mask[1] = False
    w = torch.rand(3, 9, device=device) * 2
    return {
        "clip_cov_selection_cpp": [
            (lp, old, adv, mask, 0.2, 0.28, 0.3, 0.02, 3.0),
            (lp.double(), old.double(), adv.double(), mask.float(), 0.7, 0.3, 1.0, -1.0, 1.0),
        ],
        "kl_cov_selection_cpp": [(lp, adv, mask, 0.3), (lp.double(), adv.double(), mask.int(), 1.0)],
        "gspo_log_ratio_cpp": [(lp, old, mask), (lp.t().contiguous().t(), old, mask.float())],
        "geo_mean_row_sums_cpp": [(adv, mask, w, 1e-10), (adv.double(), mask, None, 1e-10)],
    }


def _advantage_estimator_samples(device: str) -> dict[str, list[tuple]]:
    """The advantage estimators' C++ CPU ops (csrc/advantages.cpp; on CPU tensors only)."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 7, generator=g)
    mask = (torch.arange(7) < torch.tensor([7, 3, 0, 5, 1])[:, None]).float()
    lp, pi2 = -torch.rand(5, 7, generator=g) * 3, torch.rand(5, 7, generator=g) * 0.5
    rho = torch.rand(5, 7, generator=g)
    values, ids = torch.randn(5, generator=g), torch.tensor([0, 1, 0, 2, 1])
    return {
        "advantages_on_tokens_cpp": [(values, mask), (values.double(), mask.bool())],
        "advantages_whitened_on_tokens_cpp": [(values, mask, 1e-8), (values.double(), mask.bool(), 0.0)],
        "remax_cpp": [(rewards, values, mask), (rewards.double(), values.double(), mask.bool())],
        "reinforce_plus_plus_cpp": [
            (rewards, mask, 0.9, 1e-8, False), (rewards.half(), mask.bool(), 1.0, 1e-8, True)
        ],
        "optimal_token_baseline_cpp": [
            (rewards, mask, ids, lp, pi2, rho, True, 1e-8, False, False),
            (rewards.double(), mask.bool(), ids, lp, pi2, None, False, 0.0, True, True),
        ],
    }


SAMPLE_BUILDERS: tuple[Callable[[str], dict[str, list[tuple]]], ...] = (
    _logprobs_samples,
    _token_stats_samples,
    _kl_samples,
    _advantage_samples,
    _advantage_estimator_samples,
    _ppo_samples,
    _policy_losses_samples,
    _policy_selection_samples,
    _reward_samples,
    _linear_logprobs_samples,
    _ratings_samples,
    _linear_distill_samples,
    _sampling_logprobs_samples,
)


def samples(device: str) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for builder in SAMPLE_BUILDERS:
        out.update(builder(device))
    return out


# The ops with a registered autograd formula (the public functions' entry points); the others (backward
# ops, *_torch bodies, partial statistics) are called inside them and get inputs that need no gradient.
AUTOGRAD_OPS = frozenset(
    {
        "kl_penalty",
        "linear_logprobs_fwd",
        "logprobs_fwd",
        "pairwise_reward_loss_fwd",
        "pointwise_reward_loss_fwd",
        "policy_loss_token_fwd",
        "policy_loss_token_fwd_saving_cpp",
        "ppo_policy_loss_fwd",
        "ppo_value_loss_fwd",
        "token_stats_fwd",
        "ranking_loss_fwd",
        "sampling_logprobs_fwd",
    }
)


def _op_args(name: str, device: str) -> list[tuple]:
    """Samples for ``name``; inputs of ops without autograd are detached."""
    torch.manual_seed(0)
    arg_lists = samples(device)[name]
    if name in AUTOGRAD_OPS:
        return arg_lists
    return [tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) for args in arg_lists]


def _sampled_op_names() -> list[str]:
    torch.manual_seed(0)
    return sorted(samples("cpu"))


def test_every_registered_op_has_samples():
    missing = sorted(set(registered_ops()) - set(_sampled_op_names()))
    assert not missing, f"registered ops without opcheck samples in tests/test_registration.py: {missing}"
    stale = sorted(set(_sampled_op_names()) - set(registered_ops()))
    assert not stale, f"samples for ops that are not registered: {stale}"


# ---------------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------------
def _skip_reason(name: str, device: str) -> str | None:
    if name == "gae_cuda" and device != "cuda":
        return "gae_cuda runs the CUDA extension on CUDA tensors"
    if name == "gae_cuda":
        return _ext.unavailable_reason("gae", "cuda")
    if name.endswith("_cpp"):  # one C++ module for every family (test_gae checks that it builds)
        if device != "cpu":
            return f"{name} runs the C++ extension on CPU tensors"
        return _ext.unavailable_reason("gae", "cpp")
    return None


@pytest.mark.parametrize("name", _sampled_op_names())
def test_opcheck_torch_path_cpu(name):
    reason = _skip_reason(name, "cpu")
    if reason is not None:
        pytest.skip(reason)
    with _dispatch.use_backend("torch"):
        for args in _op_args(name, "cpu"):
            torch.library.opcheck(getattr(OPS, name).default, args)


# Ops whose body runs Triton kernels when the backend is "triton" (the *_torch, *_cpp, *_cuda ops do not).
def _routing_ops() -> list[str]:
    return [n for n in _sampled_op_names() if not n.endswith(("_torch", "_cpp", "_cuda"))]


@pytest.mark.skipif(
    not HAS_CUDA, reason="Triton kernels run natively on CUDA only (interpreted ones do not trace)"
)
@pytest.mark.parametrize("name", _routing_ops())
def test_opcheck_triton_path_cuda(name):
    with _dispatch.use_backend("triton"):
        for args in _op_args(name, "cuda"):
            torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_opcheck_cuda_extension():
    reason = _skip_reason("gae_cuda", "cuda")
    if reason is not None:
        pytest.skip(reason)
    for args in _op_args("gae_cuda", "cuda"):
        torch.library.opcheck(OPS.gae_cuda.default, args)


# ---------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True, dynamic=True) of every public function, forward and backward
# ---------------------------------------------------------------------------------------------------
def _policy_args(b, t, device):
    lp = -torch.rand(b, t, device=device) * 3
    return lp, lp + torch.randn(b, t, device=device) * 0.4, torch.randn(b, t, device=device)


def _mask(b, t, device):
    mask = torch.rand(b, t, device=device) < 0.7
    mask[1] = False
    return mask


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    out = []
    for item in result:
        out.extend(_flat(item))
    return out


# name -> (function, inputs(b, t, device) -> (args, indices of differentiable args)).  Hyperparameters are
# written as constants, the way a training step passes them; defaults are left to the functions.
COMPILE_CASES: dict[str, tuple[Callable, Callable]] = {
    "sampling_logprobs": (
        lambda x, y: sampling_logprobs(x, y, temperature=0.7, top_k=5, top_p=0.9, return_entropy=True),
        lambda b, t, d: ((torch.randn(b, t, 19, device=d), torch.randint(0, 19, (b, t), device=d)), (0,)),
    ),
    "logprobs_from_logits": (
        lambda x, y: logprobs_from_logits(x, y),
        lambda b, t, d: ((torch.randn(b, t, 19, device=d), torch.randint(0, 19, (b, t), device=d)), (0,)),
    ),
    "logprobs_from_logits(entropy, temperature)": (
        lambda x, y: logprobs_from_logits(x, y, temperature=0.7, return_entropy=True),
        lambda b, t, d: ((torch.randn(b, t, 19, device=d), torch.randint(0, 19, (b, t), device=d)), (0,)),
    ),
    "entropy_from_logits": (
        lambda x: entropy_from_logits(x),
        lambda b, t, d: ((torch.randn(b, t, 23, device=d),), (0,)),
    ),
    "linear_logprobs": (
        lambda h, w, bias, y: linear_logprobs(h, w, y, bias=bias, return_entropy=True),
        lambda b, t, d: (
            (
                torch.randn(b, t, 8, device=d),
                torch.randn(21, 8, device=d),
                torch.randn(21, device=d),
                torch.randint(0, 21, (b, t), device=d),
            ),
            (0, 1, 2),
        ),
    ),
    "kl_penalty": (
        lambda lp, ref: kl_penalty(lp, ref, "k3"),
        lambda b, t, d: (_policy_args(b, t, d)[:2], (0, 1)),
    ),
    "compute_gae": (
        lambda r, v, m: compute_gae(r, v, m, 0.99, 0.95),
        lambda b, t, d: ((torch.randn(b, t, device=d), torch.randn(b, t, device=d), _mask(b, t, d)), ()),
    ),
    "compute_gae(zero)": (
        lambda r, v, m: compute_gae(r, v, m, 1.0, 0.9, mask_mode="zero"),
        lambda b, t, d: ((torch.randn(b, t, device=d), torch.randn(b, t, device=d), _mask(b, t, d)), ()),
    ),
    "masked_whiten": (
        lambda x, m: masked_whiten(x, m),
        lambda b, t, d: ((torch.randn(b, t, device=d), _mask(b, t, d)), ()),
    ),
    "token_level_rewards": (
        lambda s, lp, ref, m: token_level_rewards(s, lp, ref, m, kl_coef=0.05),
        lambda b, t, d: ((torch.randn(b, device=d), *_policy_args(b, t, d)[:2], _mask(b, t, d)), ()),
    ),
    "group_advantages": (
        lambda s: group_advantages(s, 2),
        lambda b, t, d: ((torch.randn(2 * b, device=d),), (0,)),
    ),
    "broadcast_to_tokens": (
        lambda a, m: broadcast_to_tokens(a, m),
        lambda b, t, d: ((torch.randn(b, device=d), _mask(b, t, d)), (0,)),
    ),
    **{
        f"agg_loss({mode})": (
            (lambda agg_mode: lambda x, m: agg_loss(x, m, agg_mode))(mode),
            lambda b, t, d: ((torch.randn(b, t, device=d), _mask(b, t, d)), (0,)),
        )
        for mode in ("token-mean", "seq-mean-token-mean")  # the others share their code path
    },
    "ppo_policy_loss": (
        lambda lp, old, adv, m: ppo_policy_loss(lp, old, adv, m),
        lambda b, t, d: ((*_policy_args(b, t, d), _mask(b, t, d)), (0,)),
    ),
    "ppo_policy_loss(dual clip, seq-mean-token-mean)": (
        lambda lp, old, adv, m: ppo_policy_loss(
            lp, old, adv, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg="seq-mean-token-mean"
        ),
        lambda b, t, d: ((*_policy_args(b, t, d), _mask(b, t, d)), (0,)),
    ),
    **{
        f"{name}_policy_loss(is_weights)": (
            lambda lp, old, adv, m, w, name=name: POLICY_LOSSES[name](lp, old, adv, m, is_weights=w)[0],
            lambda b, t, d: ((*_policy_args(b, t, d), _mask(b, t, d), torch.rand(b, t, device=d) * 2), (0,)),
        )
        for name in ("gspo", "sapo", "dppo_kl", "geo_mean", "kl_cov")
    },
    "ppo_value_loss": (
        lambda v, old, ret, m: ppo_value_loss(v, old, ret, m),
        lambda b, t, d: (
            (
                torch.randn(b, t, device=d),
                torch.randn(b, t, device=d),
                torch.randn(b, t, device=d),
                _mask(b, t, d),
            ),
            (0,),
        ),
    ),
    "kl_loss": (
        lambda lp, ref, m: kl_loss(lp, ref, m),
        lambda b, t, d: ((*_policy_args(b, t, d)[:2], _mask(b, t, d)), (0,)),
    ),
    "pairwise_reward_loss": (
        lambda c, r, margin: pairwise_reward_loss(c, r, margin=margin, center_coef=0.01),
        lambda b, t, d: (
            (torch.randn(b * t, device=d), torch.randn(b * t, device=d), torch.rand(b * t, device=d)),
            (0, 1),
        ),
    ),
    "ranking_reward_loss": (
        lambda s, m: ranking_reward_loss(s, mask=m),
        lambda b, t, d: ((torch.randn(b, t, device=d), torch.rand(b, t, device=d) < 0.8), (0,)),
    ),
    "ranking_hinge_loss": (
        lambda s: ranking_hinge_loss(s),
        lambda b, t, d: ((torch.randn(b, t, device=d),), (0,)),
    ),
    "pointwise_reward_loss": (
        lambda p, y: pointwise_reward_loss(p, y),
        lambda b, t, d: ((torch.randn(b, t, device=d), torch.randn(b, t, device=d)), (0,)),
    ),
}

SHAPES = ((3, 5), (6, 13))  # no size 1: torch.compile specialises sizes 0 and 1


def _check_compiled_equals_eager(name: str, device: str) -> None:
    fn, make = COMPILE_CASES[name]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for b, t in SHAPES:
        args, diff = make(b, t, device)
        eager_args = [a.clone().requires_grad_(i in diff) for i, a in enumerate(args)]
        traced_args = [a.clone().requires_grad_(i in diff) for i, a in enumerate(args)]
        eager = _flat(fn(*eager_args))
        traced = _flat(compiled(*traced_args))
        assert len(eager) == len(traced)
        for got, want in zip(traced, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
        if diff:
            weights = [torch.randn_like(o, dtype=torch.float32) for o in eager]
            eager_loss = sum((w * o.float()).sum() for w, o in zip(weights, eager) if o.requires_grad)
            traced_loss = sum((w * o.float()).sum() for w, o in zip(weights, traced) if o.requires_grad)
            want = torch.autograd.grad(eager_loss, [eager_args[i] for i in diff])
            got = torch.autograd.grad(traced_loss, [traced_args[i] for i in diff])
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compile_fullgraph_dynamic_torch_path_cpu(name):
    torch._dynamo.reset()
    with _dispatch.use_backend("torch"):
        _check_compiled_equals_eager(name, "cpu")


# The public functions of the families with a C++ CPU kernel (csrc/), traced with that kernel.
CPP_COMPILE_CASES = sorted(
    n for n in COMPILE_CASES if "policy_loss" in n or n.startswith(("ppo_", "compute_gae"))
)


@pytest.mark.parametrize("name", CPP_COMPILE_CASES)
def test_compile_fullgraph_dynamic_cpp_path_cpu(name):
    torch._dynamo.reset()
    with _dispatch.use_backend("cpp"):
        _check_compiled_equals_eager(name, "cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile of Triton kernels needs CUDA")
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compile_fullgraph_dynamic_cuda(name):
    torch._dynamo.reset()
    _check_compiled_equals_eager(name, "cuda")  # "auto": the Triton (or CUDA extension) paths


# ---------------------------------------------------------------------------------------------------
# CUDA graph capture of a whole PPO step: no host synchronisation in any forward or backward
# ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
def test_cuda_graph_capture_of_a_training_step():
    torch.manual_seed(0)
    b, t, h, v = 4, 33, 64, 257
    head = torch.nn.Linear(h, v, bias=False, device="cuda")
    critic = torch.nn.Linear(h, 1, device="cuda")
    static = {
        "hidden": torch.randn(b, t, h, device="cuda"),
        "labels": torch.randint(0, v, (b, t), device="cuda"),
        "old_logprobs": -torch.rand(b, t, device="cuda") * 5,
        "ref_logprobs": -torch.rand(b, t, device="cuda") * 5,
        "old_values": torch.randn(b, t, device="cuda"),
        "scores": torch.randn(b, device="cuda"),
        "mask": torch.rand(b, t, device="cuda") < 0.8,
    }

    def step():
        rewards, _ = token_level_rewards(
            static["scores"], static["old_logprobs"], static["ref_logprobs"], static["mask"], kl_coef=0.05
        )
        advantages, returns = compute_gae(rewards, static["old_values"], static["mask"], 1.0, 0.95)
        advantages = masked_whiten(advantages, static["mask"])
        logprobs, entropy = logprobs_from_logits(
            head(static["hidden"]), static["labels"], temperature=1.0, return_entropy=True
        )
        values = critic(static["hidden"]).squeeze(-1)
        policy, metrics = ppo_policy_loss(
            logprobs, static["old_logprobs"], advantages, static["mask"], clip_low=0.2, dual_clip=3.0
        )
        value, _ = ppo_value_loss(values, static["old_values"], returns, static["mask"], clip=0.5)
        kl = kl_loss(logprobs, static["ref_logprobs"], static["mask"], estimator="k3")
        loss = policy + 0.5 * value + 0.01 * kl - 0.001 * agg_loss(entropy, static["mask"])
        loss.backward()
        return loss.detach(), metrics["clipfrac"]

    params = list(head.parameters()) + list(critic.parameters())
    previous = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(False)  # the label range check reads the device: off while capturing
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for p in params:
                    p.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        captured_grads = [p.grad for p in params]  # the graph writes the gradients into these

        for _ in range(2):  # new data in the static buffers, then replay against an eager step
            for name, tensor in static.items():
                if tensor.dtype == torch.bool:
                    tensor.copy_(torch.rand(tensor.shape, device="cuda") < 0.8)
                elif name == "labels":
                    tensor.copy_(torch.randint(0, v, tensor.shape, device="cuda"))
                else:
                    tensor.copy_(torch.randn(tensor.shape, device="cuda") - (name.endswith("logprobs") * 3.0))
            graph.replay()
            replay = [c.clone() for c in captured] + [g.clone() for g in captured_grads]
            for p in params:
                p.grad = None
            eager = list(step()) + [p.grad for p in params]
            for got, want in zip(replay, eager):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    finally:
        _dispatch.set_index_checks(previous)
