"""PPO policy / value losses: ours vs the verl and OpenRLHF eager idioms, and torch.compile of them.

Minimal traffic of the policy loss over N = B·T tokens (fp32 log-probs, old log-probs, advantages, a bool
mask): the forward reads 13 bytes per token and writes O(B); the backward reads them again and writes the
fp32 gradient (17 bytes per token); forward+backward 30 bytes per token.  The value loss moves the same.
Every impl's GB/s is this minimal traffic over its time, so the column compares speed, not bytes.
Each case first checks that ours matches the eager verl idiom (loss and gradient) before timing.
"""

from __future__ import annotations

import torch

from rlhf_kernels.ops.ppo_losses import ppo_policy_loss, ppo_value_loss

from .baselines import losses as peers
from .harness import Bench, measure_loss_modes, with_compiled

FAMILY = "ppo_losses"


def _check_matches(ours, eager, x: torch.Tensor, what: str) -> None:
    """Loss and gradient of ``ours(x)`` against ``eager(x)`` (fp32 inputs: fp32 tolerances)."""
    grads = []
    for fn in (ours, eager):
        leaf = x.detach().clone().requires_grad_()
        loss = fn(leaf)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    (loss, grad), (want, want_grad) = grads
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{what} grad: {m}")


def _token_shapes(bench: Bench) -> list[tuple[int, int]]:
    if bench.device.type == "cuda":
        return [(512, 4096)] if bench.quick else [(512, 4096), (64, 16384), (4096, 1024)]
    return [(64, 512)] if bench.quick else [(256, 2048)]


def _token_inputs(rows: int, cols: int, device: torch.device):
    logprobs = -torch.rand(rows, cols, device=device) * 3
    old = logprobs + torch.randn(rows, cols, device=device) * 0.3
    advantages = torch.randn(rows, cols, device=device)
    lengths = torch.randint(cols // 4, cols + 1, (rows, 1), device=device)
    mask = torch.arange(cols, device=device)[None, :] < lengths  # right-padded responses
    return logprobs, old, advantages, mask


def _policy(bench: Bench, rows: int, cols: int) -> None:
    logprobs, old, advantages, mask = _token_inputs(rows, cols, bench.device)
    mask_f = mask.float()  # the peers' response_mask / action_mask is a float tensor
    openrlhf = peers.OpenRLHFPolicyLoss(0.2, 0.2)
    eager = "eager verl compute_policy_loss"

    def verl(lp):
        return peers.verl_compute_policy_loss(old, lp, advantages, mask_f, 0.2, clip_ratio_c=3.0)[0]

    peers_impls = with_compiled(bench, {
        eager: verl,
        "eager OpenRLHF PolicyLoss": lambda lp: openrlhf(lp, old, advantages, mask_f)[0],
    })
    case = f"policy B={rows} T={cols} fp32"
    for name, fn in peers_impls.items():
        baseline = None if name == eager else eager
        measure_loss_modes(bench, FAMILY, case, name, fn, logprobs, (13, 17), baseline)
    ours = lambda lp: ppo_policy_loss(lp, old, advantages, mask, dual_clip=3.0)[0]  # noqa: E731
    _check_matches(ours, verl, logprobs, case)
    measure_loss_modes(bench, FAMILY, case, "rlhf_kernels", ours, logprobs, (13, 17), eager)


def _value(bench: Bench, rows: int, cols: int) -> None:
    values, old, returns, mask = _token_inputs(rows, cols, bench.device)
    mask_f = mask.float()
    openrlhf = peers.OpenRLHFValueLoss(0.2)
    eager = "eager verl compute_value_loss"

    def verl(v):
        return peers.verl_compute_value_loss(v, returns, old, mask_f, 0.2)[0]

    peers_impls = with_compiled(bench, {
        eager: verl,
        "eager OpenRLHF ValueLoss": lambda v: openrlhf(v, old, returns, mask_f),
    })
    case = f"value B={rows} T={cols} fp32"
    for name, fn in peers_impls.items():
        baseline = None if name == eager else eager
        measure_loss_modes(bench, FAMILY, case, name, fn, values, (13, 17), baseline)
    ours = lambda v: ppo_value_loss(v, old, returns, mask, clip=0.2)[0]  # noqa: E731
    _check_matches(ours, verl, values, case)
    measure_loss_modes(bench, FAMILY, case, "rlhf_kernels", ours, values, (13, 17), eager)


def run(bench: Bench) -> None:
    for rows, cols in _token_shapes(bench):
        _policy(bench, rows, cols)
        _value(bench, rows, cols)
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
