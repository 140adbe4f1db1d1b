"""The policy loss from hidden states: ours (lm_head + log-softmax + vanilla PPO loss fused, backward formed
in the forward) vs the eager idioms that materialise the logits (verl's actor: lm_head, fp32 log_softmax,
``compute_policy_loss``; and the same logits feeding rlhf_kernels' fused ``vanilla_policy_loss``),
torch.compile of verl's idiom, and Liger's fused linear GRPO loss where installed (it needs CUDA).

Work: forward+backward is three [N, H] x [H, V] products (6·N·H·V flop: logits, d_hidden = G·W,
d_weight = Gᵀ·h), which ours runs exactly once each.  The three products themselves are timed in the same
run (G materialised), and each of our fwd+bwd rows notes its time as a multiple of theirs and its peak
memory as a fraction of eager verl's.  Before a shape is timed, ours is checked against the float64
oracle on its first sequence.  Semantics: vanilla, clip 0.2, dual clip 3, token-mean, advantages per
sequence (Liger: "bnpo", no dual clip, so its loss differs where A < 0 hits the dual clip).
"""

from __future__ import annotations

import functools

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.linear_policy_loss import linear_policy_loss
from rlhf_kernels.reference import linear_policy_loss as reference

from .baselines import linear_policy_loss as peers
from .harness import Bench, measure_head_loss_modes

FAMILY = "linear_policy_loss"


def _shapes(bench: Bench) -> list[tuple[int, int, int, int, torch.dtype]]:
    """(B, T, H, V, dtype); N = B·T tokens."""
    if bench.device.type == "cuda":
        if bench.quick:
            return [(4, 1024, 4096, 151936, torch.bfloat16)]
        return [(16, 1024, 4096, 151936, torch.bfloat16)]
    if bench.quick:
        return [(1, 256, 256, 32000, torch.float32)]
    return [(2, 512, 512, 32000, torch.float32)]  # CPU bf16 products are emulated on most CPUs: fp32 only


def _inputs(device: torch.device, batch, seq, hidden_size, vocab, dtype):
    hidden = torch.randn(batch, seq, hidden_size, device=device, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    old = -torch.rand(batch, seq, device=device) * 3 - 8  # near log(1/V): ratios around 1
    advantages = torch.randn(batch, 1, device=device).expand(batch, seq).contiguous()
    mask = torch.rand(batch, seq, device=device) < 0.9
    return hidden, weight, labels, old, advantages, mask


def _ours(hidden, weight, labels, old, advantages, mask, **kwargs):
    return linear_policy_loss(hidden, weight, labels, old, advantages, mask, **kwargs)[0]


def _check_against_oracle(hidden, weight, labels, old, advantages, mask) -> None:
    """Raises unless ours matches the float64 oracle on the first sequence (loss and d_hidden): a wrong
    implementation is never timed.  d_hidden in the input dtype: one rounding at the gradient's scale."""
    args = (labels[:1], old[:1], advantages[:1], mask[:1])
    h = hidden[:1].detach().requires_grad_()
    got = _ours(h, weight, *args)
    got.backward()
    h64 = hidden[:1].detach().double().requires_grad_()
    want = reference.linear_policy_loss(h64, weight.double(), *args)[0]
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)
    scale = h64.grad.abs().max().item()
    err = (h.grad.double() - h64.grad).abs().max().item()
    limit = (2 * 2**-8 if hidden.dtype != torch.float32 else 1e-4) * scale
    if err > limit:
        raise AssertionError(f"linear_policy_loss d_hidden: error {err:.3g} at gradient scale {scale:.3g}")


def _modes(bench: Bench, case: str, impl: str, fn, inputs, flops_fwd: int, baseline: str | None,
           fwd: bool = True):
    """Forward and forward+backward of ``fn``; returns the fwd+bwd row."""
    return measure_head_loss_modes(bench, FAMILY, case, impl, fn, inputs, flops_fwd,
                                   3 * flops_fwd, baseline, fwd)


def _three_products(bench: Bench, case: str, hidden, weight, flops_fwd: int):
    """The three products of forward+backward in the inputs' dtype, G materialised: the time to beat."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    grad_logits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)

    def products():
        torch.mm(hidden, weight.T)
        torch.mm(grad_logits, weight)
        torch.mm(grad_logits.T, hidden)

    row = bench.measure(FAMILY, case, "3 products", "fwd+bwd", products, flops=3 * flops_fwd, memory=False,
                        note="logits, d_hidden, d_weight (cuBLAS / CPU BLAS)")
    return row


def run(bench: Bench) -> None:
    _dispatch.set_index_checks(False)  # the label range check syncs; timed code must not
    try:
        for batch, seq, hidden_size, vocab, dtype in _shapes(bench):
            inputs = _inputs(bench.device, batch, seq, hidden_size, vocab, dtype)
            n = batch * seq
            flops_fwd = 2 * n * hidden_size * vocab
            case = f"N={n} H={hidden_size} V={vocab} {str(dtype).replace('torch.', '')}"
            _check_against_oracle(*inputs)
            products = _three_products(bench, case, inputs[0], inputs[1], flops_fwd)
            eager = "eager logits + verl loss"
            eager_row = _modes(bench, case, eager, peers.eager_verl_policy_loss, inputs, flops_fwd, None)
            _modes(bench, case, "eager logits + rlhf loss", peers.eager_logits_fused_policy_loss, inputs,
                   flops_fwd, eager)
            if bench.device.type == "cuda":
                if bench.compile_baselines:  # off with --compile-baselines none
                    compiled = torch.compile(peers.eager_verl_policy_loss)
                    _modes(bench, case, "torch.compile(eager verl)", compiled, inputs, flops_fwd, eager)
                liger = peers.liger_fused_linear_grpo_loss()
                if liger is None:
                    print(f"{'':>10} {case}: liger-kernel not installed", flush=True)
                else:
                    _modes(bench, case, "liger fused linear GRPO", liger, inputs, flops_fwd, eager, fwd=False)
            else:  # Liger's kernels are Triton: CUDA only; compiling on a CPU takes minutes per shape
                print(f"{'':>10} {case}: Liger and torch.compile baselines need CUDA here", flush=True)
            ours = _modes(bench, case, "rlhf_kernels", _ours, inputs, flops_fwd, eager)
            notes = [f"{ours.median_ms / products.median_ms:.2f}x the 3 products"]
            if ours.peak_mem_mb is not None and eager_row.peak_mem_mb:
                notes.append(f"peak {ours.peak_mem_mb / eager_row.peak_mem_mb:.1%} of eager verl's")
            ours.note = "; ".join(notes)
            print(f"{'':>10} {case}: rlhf_kernels fwd+bwd {ours.note}", flush=True)
            del inputs
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        _dispatch.set_index_checks(True)


# ---------------------------------------------------------------------------------------------------
# d_weight accumulation: "float32" (an fp32 [V, H] accumulator, rounded once) vs "weight_dtype"
# (straight into a bf16 d_weight, one rounding per chunk).
# ---------------------------------------------------------------------------------------------------
def grad_weight_accumulation_tradeoff(
    n: int = 2048, hidden_size: int = 1024, vocab: int = 32000, chunk_rows: tuple = (None, 64, 16),
    device: str = "cpu",
) -> list[dict]:
    """Peak extra memory of forward+backward (``harness.peak_memory_bytes``) and the error of the bf16
    d_weight against the float64 oracle's, for both settings of ``grad_weight_accumulation``, on the
    path of ``device`` (the torch row math on CPU).  The error is relative, in the Frobenius norm and in
    the largest entry (divided by the oracle's largest |entry|); the floor is the oracle's own d_weight
    rounded once to bf16."""
    from .harness import peak_memory_bytes

    torch.manual_seed(0)
    inputs = _inputs(torch.device(device), 4, n // 4, hidden_size, vocab, torch.bfloat16)
    hidden, weight, labels, old, advantages, mask = inputs
    w64 = weight.double().requires_grad_()
    reference.linear_policy_loss(hidden.double(), w64, labels, old, advantages, mask)[0].backward()
    want = w64.grad

    def errors(got):
        diff = got.double() - want
        return (diff.norm() / want.norm()).item(), (diff.abs().max() / want.abs().max()).item()

    rows = [{"setting": "oracle rounded once to bf16", "chunk_rows": None, "peak_mib": None,
             **dict(zip(("rel_fro", "rel_max"), errors(want.to(torch.bfloat16))))}]
    cases = [("eager logits + verl loss", None, peers.eager_verl_policy_loss, {})]
    cases += [(setting, rows, _ours, dict(chunk_rows=rows, grad_weight_accumulation=setting))
              for rows in chunk_rows for setting in ("float32", "weight_dtype")]
    for setting, rows_per_chunk, fn, kwargs in cases:
        w = weight.detach().requires_grad_()
        peak = peak_memory_bytes(functools.partial(_weight_grad, w, inputs, kwargs, fn), device) / 2**20
        rel_fro, rel_max = errors(w.grad)
        rows.append({"setting": setting, "chunk_rows": rows_per_chunk, "peak_mib": peak,
                     "rel_fro": rel_fro, "rel_max": rel_max})
        print(rows[-1], flush=True)
    print(rows[0], flush=True)
    return rows


def _weight_grad(w, inputs, kwargs, fn) -> None:
    """Forward+backward of ``fn`` (ours, or an eager baseline) with ``w`` as the weight (.grad afresh)."""
    hidden, _, *rest = inputs
    w.grad = None
    fn(hidden, w, *rest, **kwargs).backward()


if __name__ == "__main__":  # python -m bench.bench_linear_policy_loss: the trade-off table of the docs
    _dispatch.set_index_checks(False)
    grad_weight_accumulation_tradeoff()
