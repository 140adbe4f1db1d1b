"""PPO policy / value losses and reward-model losses: ours vs verl, OpenRLHF and TRL eager idioms, and
torch.compile of them.

Minimal traffic of the policy loss over N = B·T tokens (fp32 log-probs, old log-probs, advantages, a bool
mask): the forward reads 13 bytes per token and writes O(B); the backward reads them again and writes the
fp32 gradient (17 bytes per token); forward+backward 30 bytes per token.  The value loss moves the same.
Every impl's GB/s is this minimal traffic over its time, so the column compares speed, not bytes.
"""

from __future__ import annotations

import torch

from rlhf_kernels.ops.ppo_losses import ppo_policy_loss, ppo_value_loss
from rlhf_kernels.ops.reward_losses import pairwise_reward_loss, ranking_reward_loss

from .baselines import losses as peers
from .harness import Bench

FAMILY = "losses"


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


def _modes(bench: Bench, case: str, impl: str, fn, x: torch.Tensor, bytes_per_token: tuple[int, int],
           baseline: str | None) -> None:
    """Times ``fn(x)`` (a 0-dim loss) forward only and forward+backward."""
    x = x.detach().requires_grad_()
    fwd_bytes, bwd_bytes = (b * x.numel() for b in bytes_per_token)

    def forward():
        with torch.no_grad():
            return fn(x)

    def fwd_bwd():
        x.grad = None
        fn(x).backward()

    bench.measure(FAMILY, case, impl, "fwd", forward, bytes_moved=fwd_bytes, baseline=baseline)
    bench.measure(FAMILY, case, impl, "fwd+bwd", fwd_bwd, bytes_moved=fwd_bytes + bwd_bytes,
                  baseline=baseline)
    x.grad = None


def _with_compiled(bench: Bench, impls: dict) -> dict:
    """Adds torch.compile of each eager peer (skipped with --quick on CPU, where compiling dominates)."""
    if bench.device.type == "cpu" and bench.quick:
        return impls
    out = dict(impls)
    for name, fn in impls.items():
        out[f"torch.compile({name})"] = torch.compile(fn)
    return out


def _policy(bench: Bench, rows: int, cols: int) -> None:
    logprobs, old, advantages, mask = _token_inputs(rows, cols, bench.device)
    mask_f = mask.float()  # the peers' response_mask / action_mask is a float tensor
    openrlhf = peers.OpenRLHFPolicyLoss(0.2, 0.2)
    eager = "eager verl compute_policy_loss"

    def verl(lp):
        return peers.verl_compute_policy_loss(old, lp, advantages, mask_f, 0.2, clip_ratio_c=3.0)[0]

    peers_impls = _with_compiled(bench, {
        eager: verl,
        "eager OpenRLHF PolicyLoss": lambda lp: openrlhf(lp, old, advantages, mask_f)[0],
    })
    case = f"policy B={rows} T={cols} fp32"
    for name, fn in peers_impls.items():
        _modes(bench, case, name, fn, logprobs, (13, 17), None if name == eager else eager)
    ours = lambda lp: ppo_policy_loss(lp, old, advantages, mask, dual_clip=3.0)[0]  # noqa: E731
    _modes(bench, case, "rlhf_kernels", ours, logprobs, (13, 17), eager)


def _value(bench: Bench, rows: int, cols: int) -> None:
    values, old, returns, mask = _token_inputs(rows, cols, bench.device)
    mask_f = mask.float()
    openrlhf = peers.OpenRLHFValueLoss(0.2)
    eager = "eager verl compute_value_loss"
    peers_impls = _with_compiled(bench, {
        eager: lambda v: peers.verl_compute_value_loss(v, returns, old, mask_f, 0.2)[0],
        "eager OpenRLHF ValueLoss": lambda v: openrlhf(v, old, returns, mask_f),
    })
    case = f"value B={rows} T={cols} fp32"
    for name, fn in peers_impls.items():
        _modes(bench, case, name, fn, values, (13, 17), None if name == eager else eager)
    ours = lambda v: ppo_value_loss(v, old, returns, mask, clip=0.2)[0]  # noqa: E731
    _modes(bench, case, "rlhf_kernels", ours, values, (13, 17), eager)


def _reward(bench: Bench) -> None:
    n = 1 << 20 if bench.device.type == "cuda" else 1 << 16
    chosen = torch.randn(n, device=bench.device)
    rejected = torch.randn(n, device=bench.device)
    margin = torch.rand(n, device=bench.device)
    case = f"pairwise N={n} fp32"
    eager = "eager TRL reward loss"
    # Gradient with respect to chosen only (rejected fixed): 12 bytes read forward, 12 + 4 backward.
    impls = _with_compiled(bench, {
        eager: lambda c: peers.trl_reward_loss(c, rejected, margin, center_rewards_coefficient=0.01),
    })
    for name, fn in impls.items():
        _modes(bench, case, name, fn, chosen, (12, 16), None if name == eager else eager)
    ours = lambda c: pairwise_reward_loss(c, rejected, margin=margin, center_coef=0.01)[0]  # noqa: E731
    _modes(bench, case, "rlhf_kernels", ours, chosen, (12, 16), eager)

    prompts, k = (8192, 64) if bench.device.type == "cuda" else (256, 16)
    scores = torch.randn(prompts, k, device=bench.device)
    case = f"ranking B={prompts} K={k} fp32"
    eager = "eager InstructGPT all-pairs"
    impls = _with_compiled(bench, {eager: peers.instructgpt_ranking_loss})
    for name, fn in impls.items():
        _modes(bench, case, name, fn, scores, (4, 8), None if name == eager else eager)
    _modes(bench, case, "rlhf_kernels", lambda s: ranking_reward_loss(s)[0], scores, (4, 8), eager)


def run(bench: Bench) -> None:
    for rows, cols in _token_shapes(bench):
        _policy(bench, rows, cols)
        _value(bench, rows, cols)
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    _reward(bench)
