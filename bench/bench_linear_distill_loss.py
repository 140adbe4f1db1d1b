"""Distillation from hidden states: ours (both lm_heads + the full-vocabulary divergence fused, the student's
backward formed in the forward) vs GKD's eager idiom (both models' [N, V] logits materialised, TRL 1.16's own
``generalized_jsd_loss``), torch.compile of it and Liger's fused linear JSD where installed (both CUDA only
here).

Work: the student's three [N, H_S] x [H_S, V] products (6·N·H_S·V flop) and the teacher's one
(2·N·H_T·V); ours runs each exactly once.  Each of our fwd+bwd rows notes its peak memory as a fraction of
eager's.  Before a shape is timed, ours is checked against the float64 oracle on its first tokens.
Semantics: generalised JSD, β = 0.5, τ = 1, labels with −100 on a quarter of the tokens.
"""

from __future__ import annotations

import torch

from rlhf_kernels.ops.linear_distill_loss import linear_distill_loss
from rlhf_kernels.reference import linear_distill_loss as reference

from .baselines import linear_distill_loss as peers
from .harness import Bench, measure_head_loss_modes

FAMILY = "linear_distill_loss"
BETA = 0.5


def _shapes(bench: Bench) -> list[tuple[int, int, int, int, torch.dtype]]:
    """(N tokens, H student, H teacher, V, dtype)."""
    if bench.device.type == "cuda":
        if bench.quick:
            return [(4096, 2048, 4096, 151936, torch.bfloat16)]
        return [(8192, 2048, 4096, 151936, torch.bfloat16)]
    if bench.quick:
        return [(256, 256, 384, 32000, torch.float32)]
    return [(1024, 512, 768, 32000, torch.float32)]  # CPU bf16 products are emulated on most CPUs: fp32 only


def _inputs(bench: Bench, n, h_student, h_teacher, vocab, dtype):
    device = bench.device
    student_hidden = torch.randn(n, h_student, device=device, dtype=dtype)
    student_weight = (torch.randn(vocab, h_student, device=device) / h_student**0.5).to(dtype)
    teacher_hidden = torch.randn(n, h_teacher, device=device, dtype=dtype)
    teacher_weight = (torch.randn(vocab, h_teacher, device=device) / h_teacher**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.rand(n, device=device) < 0.25] = -100
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def _ours(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
    return linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                               divergence="jsd", beta=BETA)


def _check_against_oracle(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, rows=32):
    """Raises unless ours matches the float64 oracle on the first ``rows`` tokens (loss and d_hidden)."""
    h = student_hidden[:rows].detach().requires_grad_()
    got = _ours(h, student_weight, teacher_hidden[:rows], teacher_weight, labels[:rows])
    got.backward()
    h64 = student_hidden[:rows].detach().double().requires_grad_()
    want = reference.linear_distill_loss(h64, student_weight.double(), teacher_hidden[:rows].double(),
                                         teacher_weight.double(), labels[:rows], divergence="jsd", beta=BETA)
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-6)
    scale = h64.grad.abs().max().item()
    err = (h.grad.double() - h64.grad).abs().max().item()
    limit = (2 * 2**-8 if student_hidden.dtype != torch.float32 else 1e-4) * scale
    if err > limit:
        raise AssertionError(f"linear_distill_loss d_hidden: error {err:.3g} at gradient scale {scale:.3g}")


def _modes(bench: Bench, case: str, impl: str, fn, inputs, flops_fwd: int, baseline: str | None,
           fwd: bool = True):
    """Forward and forward+backward of ``fn``; returns the fwd+bwd row."""
    (n, h_size), vocab = inputs[0].shape, inputs[1].shape[0]
    flops_bwd = 2 * 2 * n * h_size * vocab  # the student's d_hidden and d_weight products
    return measure_head_loss_modes(bench, FAMILY, case, impl, fn, inputs, flops_fwd, flops_fwd + flops_bwd,
                                   baseline, fwd)


def run(bench: Bench) -> None:
    for n, h_student, h_teacher, vocab, dtype in _shapes(bench):
        inputs = _inputs(bench, n, h_student, h_teacher, vocab, dtype)
        flops_fwd = 2 * n * (h_student + h_teacher) * vocab
        case = f"jsd N={n} H={h_student}/{h_teacher} V={vocab} {str(dtype).replace('torch.', '')}"
        _check_against_oracle(*inputs)
        eager = "eager logits + TRL generalized_jsd_loss"
        eager_row = _modes(bench, case, eager, peers.eager_trl_jsd, inputs, flops_fwd, None)
        if bench.device.type == "cuda":
            if bench.compile_baselines:
                compiled = torch.compile(peers.eager_trl_jsd)
                _modes(bench, case, "torch.compile(eager)", compiled, inputs, flops_fwd, eager)
            liger = peers.liger_fused_linear_jsd(beta=BETA)
            if liger is None:
                print(f"{'':>10} {case}: liger-kernel not installed", flush=True)
            else:
                _modes(bench, case, "liger fused linear JSD", liger, inputs, flops_fwd, eager, fwd=False)
        else:  # Liger's kernels are Triton: CUDA only; compiling on a CPU takes minutes per shape
            print(f"{'':>10} {case}: Liger and torch.compile baselines need CUDA here", flush=True)
        ours = _modes(bench, case, "rlhf_kernels", _ours, inputs, flops_fwd, eager)
        if ours.peak_mem_mb is not None and eager_row.peak_mem_mb:
            ours.note = f"peak {ours.peak_mem_mb / eager_row.peak_mem_mb:.1%} of eager's"
            print(f"{'':>10} {case}: rlhf_kernels fwd+bwd {ours.note}", flush=True)
        del inputs
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
