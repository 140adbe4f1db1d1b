"""KL penalty and KL loss: ours vs the verl and OpenRLHF eager idioms, and torch.compile of them.

Minimal traffic over N = B·T tokens with fp32 log-probabilities and a bool mask:
``kl_penalty`` reads lp and ref and writes the estimate (12 bytes per token); ``kl_loss`` reads lp, ref
and the mask (9 bytes per token) and its backward reads them again and writes ∂/∂lp (13 bytes per token).
Each case first checks that ours matches the eager verl idiom before timing.
"""

from __future__ import annotations

import torch

from rlhf_kernels.ops.kl import kl_loss, kl_penalty

from .baselines import kl as kl_peers
from .baselines import losses as loss_peers
from .bench_ppo_losses import _check_matches
from .harness import Bench, measure_loss_modes, with_compiled

FAMILY = "kl"


def _shape(bench: Bench) -> tuple[int, int]:
    if bench.device.type == "cuda":
        return (512, 4096)
    return (64, 512) if bench.quick else (256, 2048)


def _penalty(bench: Bench, lp: torch.Tensor, ref: torch.Tensor) -> None:
    case = f"kl_penalty k3 N={lp.numel()} fp32"
    eager = "eager verl kl_penalty"
    impls = with_compiled(bench, {
        eager: lambda: kl_peers.verl_kl_penalty(lp, ref, "low_var_kl"),
        "eager OpenRLHF compute_approx_kl": lambda: kl_peers.openrlhf_compute_approx_kl(lp, ref, "k3"),
    })
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), impls[eager](), rtol=1e-5, atol=1e-6)
    for name, fn in {**impls, "rlhf_kernels": lambda: kl_penalty(lp, ref, "k3")}.items():
        with torch.no_grad():
            bench.measure(FAMILY, case, name, "fwd", fn, bytes_moved=12 * lp.numel(),
                          baseline=None if name == eager else eager)


def _loss(bench: Bench, lp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    case = f"kl_loss k3 token-mean B={lp.shape[0]} T={lp.shape[1]} fp32"
    mask_f = mask.float()
    eager = "eager verl agg_loss(kl_penalty)"

    def verl(x):
        return loss_peers.verl_agg_loss(kl_peers.verl_kl_penalty(x, ref, "low_var_kl"), mask_f, "token-mean")

    def ours(x):
        return kl_loss(x, ref, mask, estimator="k3")

    _check_matches(ours, verl, lp, case)
    for name, fn in with_compiled(bench, {eager: verl}).items():
        measure_loss_modes(bench, FAMILY, case, name, fn, lp, (9, 13), None if name == eager else eager)
    measure_loss_modes(bench, FAMILY, case, "rlhf_kernels", ours, lp, (9, 13), eager)


def run(bench: Bench) -> None:
    rows, cols = _shape(bench)
    lp = -torch.rand(rows, cols, device=bench.device) * 3
    ref = lp + torch.randn(rows, cols, device=bench.device) * 0.3
    lengths = torch.randint(cols // 4, cols + 1, (rows, 1), device=bench.device)
    mask = torch.arange(cols, device=bench.device)[None, :] < lengths  # right-padded responses
    _penalty(bench, lp, ref)
    _loss(bench, lp, ref, mask)
