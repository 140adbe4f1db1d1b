"""Preference losses from hidden states: ours (lm_head + per-sequence log-probs + DPO fused, backward
formed in the forward) vs TRL's eager idiom (``concatenated_forward``: [S, T, V] logits materialised, fp32
log-softmax, masked sums, then the DPO sigmoid line), torch.compile of it and Liger's fused linear DPO where
installed (both CUDA only here).

Work: forward+backward is three [N, H] x [H, V] products (6·N·H·V flop), which ours runs exactly once each;
each of our fwd+bwd rows notes its peak memory as a fraction of eager's (issue 16's target: ≤ 10 % at
N = 8192, H = 4096, V = 151936 on a GPU).  Before a shape is timed, ours is checked against the float64
oracle on its first pair.  Semantics: DPO sigmoid, β = 0.1, given reference sums, half of each sequence
prompt (label −100).
"""

from __future__ import annotations

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.linear_preference_loss import linear_preference_loss
from rlhf_kernels.reference import linear_preference_loss as reference

from .baselines import linear_preference_loss as peers
from .baselines.preference_losses import BETA
from .harness import Bench, measure_head_loss_modes

FAMILY = "linear_preference_loss"


def _shapes(bench: Bench) -> list[tuple[int, int, int, int, torch.dtype]]:
    """(S sequences = 2B, T, H, V, dtype); N = S·T tokens."""
    if bench.device.type == "cuda":
        if bench.quick:
            return [(4, 1024, 4096, 151936, torch.bfloat16)]
        return [(8, 1024, 4096, 151936, torch.bfloat16)]  # N = 8192: the shape
    if bench.quick:
        return [(4, 64, 256, 32000, torch.float32)]
    return [(8, 128, 512, 32000, torch.float32)]  # CPU bf16 products are emulated on most CPUs: fp32 only


def _inputs(bench: Bench, n_seq, seq, hidden_size, vocab, dtype):
    device = bench.device
    hidden = torch.randn(n_seq, seq, hidden_size, device=device, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n_seq, seq), device=device)
    labels[:, : seq // 2] = -100  # the prompt
    ref_logps = -torch.rand(n_seq, device=device) * 10 - seq / 2 * 10
    return hidden, weight, labels, ref_logps


def _ours(hidden, weight, labels, ref_logps):
    return linear_preference_loss(hidden, weight, labels, loss="dpo", ref_logps=ref_logps, beta=BETA)[0]


def _check_against_oracle(hidden, weight, labels, ref_logps) -> None:
    """Raises unless ours matches the float64 oracle on the first pair (loss and d_hidden)."""
    b = hidden.shape[0] // 2
    pair = [0, b]
    args = (labels[pair], ref_logps[pair])
    h = hidden[pair].detach().requires_grad_()
    got = _ours(h, weight, *args)
    got.backward()
    h64 = hidden[pair].detach().double().requires_grad_()
    want, _ = reference.linear_preference_loss(h64, weight.double(), labels[pair], loss="dpo",
                                               ref_logps=ref_logps[pair].double(), beta=BETA)
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)
    scale = h64.grad.abs().max().item()
    err = (h.grad.double() - h64.grad).abs().max().item()
    limit = (2 * 2**-8 if hidden.dtype != torch.float32 else 1e-4) * scale
    if err > limit:
        raise AssertionError(
            f"linear_preference_loss d_hidden: error {err:.3g} at gradient scale {scale:.3g}"
        )


def _modes(bench: Bench, case: str, impl: str, fn, inputs, flops_fwd: int, baseline: str | None,
           fwd: bool = True):
    """Forward and forward+backward of ``fn``; returns the fwd+bwd row."""
    return measure_head_loss_modes(bench, FAMILY, case, impl, fn, inputs, flops_fwd,
                                   3 * flops_fwd, baseline, fwd)


def run(bench: Bench) -> None:
    _dispatch.set_index_checks(False)  # the label range check syncs; timed code must not
    try:
        for n_seq, seq, hidden_size, vocab, dtype in _shapes(bench):
            inputs = _inputs(bench, n_seq, seq, hidden_size, vocab, dtype)
            flops_fwd = 2 * n_seq * seq * hidden_size * vocab
            case = f"dpo S={n_seq} T={seq} H={hidden_size} V={vocab} {str(dtype).replace('torch.', '')}"
            _check_against_oracle(*inputs)
            eager = "eager TRL concatenated_forward + dpo"
            eager_row = _modes(bench, case, eager, peers.eager_dpo_sigmoid, inputs, flops_fwd, None)
            if bench.device.type == "cuda":
                if bench.compile_baselines:
                    compiled = torch.compile(peers.eager_dpo_sigmoid)
                    _modes(bench, case, "torch.compile(eager)", compiled, inputs, flops_fwd, eager)
                liger = peers.liger_fused_linear_dpo()
                if liger is None:
                    print(f"{'':>10} {case}: liger-kernel not installed", flush=True)
                else:
                    _modes(bench, case, "liger fused linear DPO (no ref)", liger, inputs, flops_fwd, eager,
                           fwd=False)
            else:  # Liger's kernels are Triton: CUDA only; compiling on a CPU takes minutes per shape
                print(f"{'':>10} {case}: Liger and torch.compile baselines need CUDA here", flush=True)
            ours = _modes(bench, case, "rlhf_kernels", _ours, inputs, flops_fwd, eager)
            if ours.peak_mem_mb is not None and eager_row.peak_mem_mb:
                ours.note = f"peak {ours.peak_mem_mb / eager_row.peak_mem_mb:.1%} of eager's"
                print(f"{'':>10} {case}: rlhf_kernels fwd+bwd {ours.note}", flush=True)
            del inputs
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        _dispatch.set_index_checks(True)
