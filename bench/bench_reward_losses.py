"""Reward-model losses: ours vs the TRL, InstructGPT and ``F.mse_loss`` eager idioms, and torch.compile
of them.

Ours: the Triton kernels of ``rlhf_kernels/ops/reward_losses.py`` on CUDA, the PyTorch path of
``rlhf_kernels/ops/cpu/reward_losses.py`` on CPU.  The eager idioms come from ``bench/baselines/losses.py``
(the tests import the same ones).  Each implementation's loss and gradient are checked against the eager
baseline's before it is timed.

Minimal traffic per element, (forward, backward), the gradient taken with respect to the first input only:

    pairwise  N pairs, fp32 chosen, rejected, margin:  forward reads 12 bytes; backward reads 12 and
              writes 4 (our backward kernel also writes ∂/∂rejected: 4 bytes more than the minimum)
    ranking   B·K fp32 scores:                         forward reads 4 bytes; backward reads 4, writes 4
    pointwise N fp32 predictions and targets:          forward reads 8 bytes; backward reads 8, writes 4
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_kernels.ops.reward_losses import pairwise_reward_loss, pointwise_reward_loss, ranking_reward_loss

from .baselines import losses as peers
from .harness import Bench, measure_loss_modes, with_compiled

FAMILY = "reward_losses"


def _check_against(reference: Callable, fn: Callable, x: torch.Tensor, impl: str) -> None:
    """Raises unless ``fn(x)`` and its gradient match ``reference``'s (fp32 sums over ~1e6 terms)."""
    got_x, want_x = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    got, want = fn(got_x), reference(want_x)
    got.backward()
    want.backward()
    for g, w in ((got, want), (got_x.grad, want_x.grad)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{impl}: {m}")


def _case(bench: Bench, case: str, eager: str, peers_impls: dict, ours: Callable, x: torch.Tensor,
          bytes_per_element: tuple[int, int]) -> None:
    """Checks, then times, the eager peer ``eager`` (the baseline), the other peers and ours."""
    impls = {**with_compiled(bench, peers_impls), "rlhf_kernels": ours}
    for impl, fn in impls.items():
        _check_against(peers_impls[eager], fn, x, impl)
        baseline = None if impl == eager else eager
        measure_loss_modes(bench, FAMILY, case, impl, fn, x, bytes_per_element, baseline)


def run(bench: Bench) -> None:
    device, cuda = bench.device, bench.device.type == "cuda"

    n = 1 << 20 if cuda else 1 << 16
    chosen, rejected = torch.randn(n, device=device), torch.randn(n, device=device)
    margin = torch.rand(n, device=device)
    eager = "eager TRL reward loss"
    _case(bench, f"pairwise N={n} fp32", eager,
          {eager: lambda c: peers.trl_reward_loss(c, rejected, margin, center_rewards_coefficient=0.01)},
          lambda c: pairwise_reward_loss(c, rejected, margin=margin, center_coef=0.01)[0],
          chosen, (12, 16))

    prompts, k = (8192, 64) if cuda else (256, 16)
    scores = torch.randn(prompts, k, device=device)
    eager = "eager InstructGPT all-pairs"
    _case(bench, f"ranking B={prompts} K={k} fp32", eager, {eager: peers.instructgpt_ranking_loss},
          lambda s: ranking_reward_loss(s)[0], scores, (4, 8))

    pred, target = torch.randn(n, device=device), torch.randn(n, device=device)
    eager = "eager F.mse_loss"
    _case(bench, f"pointwise N={n} fp32", eager, {eager: lambda p: torch.nn.functional.mse_loss(p, target)},
          lambda p: pointwise_reward_loss(p, target), pred, (8, 12))
