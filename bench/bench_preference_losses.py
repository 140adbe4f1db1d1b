"""Preference losses: ours (plain PyTorch, ``rlhf_kernels/ops/preference_losses.py``) vs TRL 1.16's eager
idioms and torch.compile of both.

The eager idioms (``bench/baselines/preference_losses.py``) are TRL's per-loss-type lines
(``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss``), lifted out of the trainers so they run without
a model; the tests compare ours with the real trainer code (tests/test_preference_losses_peers.py).  Each
implementation's loss and gradient are checked against the eager idiom's before it is timed.

Minimal traffic per pair, the gradient taken with respect to the chosen log-probs only: DPO reads 4 fp32
values (16 bytes) and writes 1 (4 bytes); KTO reads 2 values, the label and a KL pair per response
(~17 bytes) and writes 1.  At these sizes (B ≤ 64k) every case is launch- or dispatch-bound: the point
of the benchmark is the per-call overhead, and what torch.compile's fusion saves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_kernels.ops.preference_losses import dpo_loss, kto_loss

from .baselines.preference_losses import BETA, trl_dpo_sigmoid, trl_kto, trl_mpo
from .harness import Bench, measure_loss_modes, with_compiled

FAMILY = "preference_losses"


def _check_against(reference: Callable, fn: Callable, x: torch.Tensor, impl: str) -> None:
    got_x, want_x = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    got, want = fn(got_x), reference(want_x)
    got.backward()
    want.backward()
    for g, w in ((got, want), (got_x.grad, want_x.grad)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{impl}: {m}")


def _case(bench: Bench, case: str, eager: str, eager_fn: Callable, ours: Callable, x: torch.Tensor,
          bytes_per_pair: tuple[int, int]) -> None:
    impls = {**with_compiled(bench, {eager: eager_fn, "rlhf_kernels": ours})}
    for impl, fn in impls.items():
        _check_against(eager_fn, fn, x, impl)
        measure_loss_modes(bench, FAMILY, case, impl, fn, x, bytes_per_pair, None if impl == eager else eager)


def run(bench: Bench) -> None:
    device = bench.device
    n = 65536 if device.type == "cuda" else 4096
    logps = [-5.0 - 50.0 * torch.rand(n, device=device) for _ in range(4)]
    chosen, rejected, ref_chosen = logps[0], logps[1], logps[0] + torch.randn(n, device=device)
    ref_rejected = logps[1] + torch.randn(n, device=device)
    lengths = torch.randint(1, 512, (n,), device=device)

    _case(bench, f"dpo sigmoid B={n} fp32", "eager TRL dpo sigmoid",
          lambda c: trl_dpo_sigmoid(c, rejected, ref_chosen, ref_rejected),
          lambda c: dpo_loss(c, rejected, ref_chosen, ref_rejected, beta=BETA)[0],
          chosen, (16, 4))
    _case(bench, f"dpo mpo B={n} fp32", "eager TRL mpo",
          lambda c: trl_mpo(c, rejected, ref_chosen, ref_rejected, lengths),
          lambda c: dpo_loss(
              c, rejected, ref_chosen, ref_rejected, beta=BETA, loss_type=["sigmoid", "bco_pair", "sft"],
              loss_weights=[0.8, 0.2, 1.0], chosen_lengths=lengths,
          )[0],
          chosen, (24, 4))

    desirable = torch.rand(n, device=device) < 0.5
    kl_policy, kl_ref = logps[2], logps[2] - 0.5 + torch.randn(n, device=device)
    _case(bench, f"kto B={n} fp32", "eager TRL kto",
          lambda p: trl_kto(p, ref_chosen, desirable, kl_policy, kl_ref),
          lambda p: kto_loss(p, ref_chosen, desirable, kl_policy, kl_ref, beta=BETA)[0],
          chosen, (17, 4))
