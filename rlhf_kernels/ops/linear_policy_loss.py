"""The policy loss straight from hidden states: lm_head + log-softmax + a token-level policy loss (+ entropy
bonus, + KL penalty to a reference policy), fused, with the backward formed during the forward.

With z = (h Wᵀ + b) / τ the scaled logits of token t, lp_t = log softmax(z)_{y_t}, H_t its entropy,
m_t the mask, w_t the rollout weights and L_t the per-token loss of the variant (``docs/policy_losses.md``):

    loss = agg(L·w, m) − entropy_coef · agg(H, m) + kl_coef · agg(k(lp, ref), m)

with ``agg`` the aggregation of ``ops/aggregation.py`` (one mode and normaliser for the three terms, as
verl's actor does) and k a KL estimator of ``ops/kl.py``.  Every mode is linear in the per-token terms
with coefficients that depend on the mask only (c_t = 1/D, or 1/(n_b·D) for "seq-mean-token-mean"), so

    ∂loss/∂lp_t = c_t·m_t·(w_t·∂L/∂lp + kl_coef·k'(lp_t)),      ∂loss/∂H_t = −entropy_coef·c_t·m_t

are known as soon as a chunk's logits are: ``_fused_linear.chunked_linear_loss`` runs, per chunk of
tokens, the logits product, the registered ops ``logprobs_fwd`` → ``policy_loss_token_fwd`` /
``policy_loss_token_bwd`` (+ ``kl_penalty`` / ``kl_penalty_bwd``) → ``logprobs_bwd_inplace`` (the logits
gradient written over the logits), then the d_hidden and d_weight products: three matmul-sized passes,
never an [N, V] buffer.  The autograd backward only scales the saved gradients by the upstream one.

Variants: the token-level ones, whose loss gradient is local to the token: vanilla, gpg, dro, cispo,
sapo, dppo_tv, dppo_kl.  Not supported: clip_cov and kl_cov (they select tokens over the whole batch from
every lp first, which needs all logits before any gradient: a second pass), gspo and geo_mean
(sequence-level ratios: the gradient of a token needs the whole sequence's lp).

Positions with m = 0 or whose label is ``ignore_index`` are masked: they contribute exactly 0 and send
exactly zero into the logits gradient.  NaN in gives NaN out.  Device routing: the matmuls are torch
(cuBLAS / CPU BLAS), the row math goes through the registered ops (Triton on CUDA, their PyTorch paths
elsewhere), so this family has no separate CPU file and registers no op of its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._validation import (
    check_float_tensor,
    check_greater,
    check_index_tensor,
    check_int,
    check_label_range,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)
from ._fused_linear import (
    HEAD_DTYPES,
    check_grad_weight_accumulation,
    check_head,
    chunked_linear_loss,
    fused_linear_apply,
    plan_chunk_rows,
    row_chunks,
)
from .aggregation import (
    SEQ_MEAN_TOKEN_MEAN,
    TOKEN_MEAN,
    Normalizer,
    agg_row_sums,
    check_loss_agg,
    check_normalizer,
    check_token_inputs,
    default_denominator,
)
from .kl import check_estimator, gradient_estimator, kl_penalty_bwd, kl_penalty_op
from .logprobs import logprobs_bwd_inplace, logprobs_fwd
from .policy_losses import _metric_means, policy_loss_token_bwd, policy_loss_token_fwd

FAMILY = "linear_policy_loss"

# variant -> its keyword parameters with their defaults (those of the rlhf_kernels policy-loss functions;
# None: required), and the metrics it reports (computed, then reported as 0).
_CLIP_METRICS = ("clipfrac", "clipfrac_lower", "approx_kl")
_VARIANTS: dict[str, tuple[dict, tuple[str, ...], tuple[str, ...]]] = {
    "vanilla": ({"clip_low": 0.2, "clip_high": None, "dual_clip": 3.0}, _CLIP_METRICS, ()),
    "gpg": ({}, (), ()),
    "dro": ({"beta": None}, ("approx_kl",), ()),
    "cispo": ({"clip_low": 0.2, "clip_high": None}, ("clipfrac", "approx_kl"), ("clipfrac_lower",)),
    "sapo": ({"tau_pos": 1.0, "tau_neg": 1.05}, ("approx_kl",), ("clipfrac", "clipfrac_lower")),
    "dppo_tv": ({"clip_low": 0.2, "clip_high": None, "truncation": 20.0}, _CLIP_METRICS, ()),
    "dppo_kl": ({"clip_low": 0.2, "clip_high": None, "truncation": 20.0}, _CLIP_METRICS, ()),
}
#: Policy losses (verl's registry names) that :func:`linear_policy_loss` fuses.
LINEAR_POLICY_LOSSES = tuple(_VARIANTS)
_UNSUPPORTED = {
    "clip_cov": "selects tokens over the whole batch from every log-prob first",
    "kl_cov": "selects tokens over the whole batch from every log-prob first",
    "gspo": "its ratio is per sequence: a token's gradient needs the whole sequence",
    "geo_mean": "its ratio is per sequence: a token's gradient needs the whole sequence",
}


def _variant_params(loss: object, loss_params: Mapping | None) -> list[float]:
    """The scalars the token-level op takes for ``loss`` (validated as the policy-loss functions do)."""
    if not isinstance(loss, str) or loss not in _VARIANTS:
        reason = ""
        if loss in _UNSUPPORTED:
            reason = f" ({loss} {_UNSUPPORTED[loss]}; use the unfused policy loss)"
        raise ValueError(f"loss must be one of {LINEAR_POLICY_LOSSES}; got {loss!r}{reason}")
    defaults = _VARIANTS[loss][0]
    given = dict(loss_params or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"loss_params for {loss!r} accepts {sorted(defaults)}; got unknown {unknown}")
    p = {**defaults, **given}
    if "beta" in p and p["beta"] is None:
        raise ValueError("loss_params['beta'] is required for the 'dro' loss (a number > 0)")
    for name in ("clip_low", "beta", "tau_pos", "tau_neg", "truncation"):
        if name in p:
            p[name] = check_greater(name, p[name], 0.0)
    if p.get("clip_high", 0.0) is None:
        p["clip_high"] = p["clip_low"]
    elif "clip_high" in p:
        p["clip_high"] = check_greater("clip_high", p["clip_high"], 0.0)
    if "dual_clip" in p:  # None: no dual clip, which the kernel reads as c = inf
        dual = p["dual_clip"]
        p["dual_clip"] = float("inf") if dual is None else check_greater("dual_clip", dual, 1.0)
    return [float(v) for v in p.values()]


def _row_coefficients(row_mask_sums: Tensor, mode: str, seq_len: int, normalizer: Normalizer) -> Tensor:
    """c_b = ∂agg/∂(Σ_t L·m of row b): the aggregation is linear in the row sums (ops/aggregation.py)."""
    denominator = default_denominator(row_mask_sums, mode, seq_len) if normalizer is None else normalizer
    if isinstance(denominator, Tensor):
        denominator = denominator.to(device=row_mask_sums.device, dtype=row_mask_sums.dtype)
    per_row = torch.ones_like(row_mask_sums)
    if mode == SEQ_MEAN_TOKEN_MEAN:
        per_row = per_row / torch.where(row_mask_sums > 0, row_mask_sums, per_row)
    return per_row / denominator


def _policy_loss(hidden, weight, bias, labels, old, adv, weights, mask, ref, settings, *, grads):
    """The compute of :func:`_fused_linear.fused_linear_apply`: (loss, (terms, stats, logprobs,
    token_entropy), d_hidden, d_weight, d_bias)."""
    (variant, params, ignore_index, inv_temperature, entropy_coef, kl_coef, estimator,
     mode, batch, seq_len, normalizer, chunk_rows, accumulation) = settings
    n_tokens = labels.numel()
    acc = compute_dtype(hidden)
    grad_hidden, grad_weight, grad_bias = grads
    need_grad = grad_hidden or grad_weight or grad_bias
    with_entropy = entropy_coef != 0.0
    has_kl = ref is not None

    # Masked positions: label ignore_index (lp = 0, zero logits gradient) and weight 0.
    valid = (mask != 0) & (labels != ignore_index)
    labels = torch.where(valid, labels, ignore_index)
    m = torch.where(valid, mask.to(acc), 0.0)
    row_mask_sums = m.view(batch, seq_len).sum(dim=-1)
    coef = _row_coefficients(row_mask_sums, mode, seq_len, normalizer).repeat_interleave(seq_len) * m
    if has_kl:
        ref = torch.where(valid, ref, 0.0)

    def chunk_fn(logits: Tensor, rows: slice):
        y = labels[rows]
        lp, entropy, lse = logprobs_fwd(logits, y, 1.0, ignore_index, with_entropy, False)
        token = [x[rows].view(-1, 1) for x in (old, adv, m)]
        w = None if weights is None else weights[rows].view(-1, 1)
        partials, stats = policy_loss_token_fwd(lp.view(-1, 1), *token, None, w, variant, params)
        kl = kl_penalty_op(lp, ref[rows], estimator) if has_kl else None
        if need_grad:
            c = coef[rows]
            grad_lp = policy_loss_token_bwd(
                c.view(-1, 1), lp.view(-1, 1), *token, None, w, variant, params
            ).view(-1)
            if has_kl and kl_coef != 0.0:
                grad_kl, _ = kl_penalty_bwd(
                    c * kl_coef, lp, ref[rows], gradient_estimator(estimator), False
                )
                grad_lp = grad_lp + grad_kl
            grad_entropy = c * -entropy_coef if with_entropy else lse.new_empty(0)
            logprobs_bwd_inplace(grad_lp, grad_entropy, logits, y, lse, entropy, 1.0, ignore_index)
        return partials.view(-1), stats, lp, entropy, kl

    chunk_rows = chunk_rows or plan_chunk_rows(n_tokens, weight.shape[0], device=hidden.device, dtype=acc)
    outputs, d_hidden, d_weight, d_bias = chunked_linear_loss(
        hidden, weight, bias, row_chunks(n_tokens, chunk_rows), chunk_fn,
        inv_temperature=inv_temperature, need_grad=need_grad, grad_weight=grad_weight,
        grad_hidden=grad_hidden, grad_weight_accumulation=accumulation, active_rows=valid,
    )
    columns = list(zip(*outputs)) if outputs else [[]] * 5
    empty = m.new_zeros(0)

    def gather(i):
        return torch.cat(columns[i]) if columns[i] else empty

    stats = torch.cat(columns[1], dim=1) if columns[1] else m.new_zeros(6, 0, 1)

    def aggregate(per_token):  # per_token already 0 wherever m = 0
        row_sums = per_token.view(batch, seq_len).sum(dim=-1)
        return agg_row_sums(row_sums, row_mask_sums, mode, seq_len, normalizer)

    pg_loss = aggregate(gather(0))
    entropy_loss = aggregate(gather(3) * m) if with_entropy else m.new_zeros(())
    kl_loss = aggregate(torch.where(m != 0, gather(4) * m, 0.0)) if has_kl else m.new_zeros(())
    loss = pg_loss - entropy_coef * entropy_loss + kl_coef * kl_loss
    token_entropy = gather(3) if with_entropy else empty
    terms = torch.stack([pg_loss, entropy_loss, kl_loss])
    return loss, (terms, stats, gather(2), token_entropy), d_hidden, d_weight, d_bias


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss: str = "vanilla",
    loss_params: Mapping[str, float | None] | None = None,
    bias: Tensor | None = None,
    is_weights: Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "low_var_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
    chunk_rows: int | None = None,
    return_logprobs: bool = False,
    grad_weight_accumulation: str = "float32",
) -> tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], Tensor]:
    """The policy loss of a token-level variant computed from the last hidden states, never materialising
    the [B·T, V] logits (math in the module docstring).

    Args:
        hidden: [B, T, H] float32, bfloat16, float16 (or float64), any strides: the states the lm_head
            reads (position t predicts ``labels[:, t]``).
        weight: [V, H], hidden's dtype (the lm_head weight as stored).  bias: optional [V], hidden's
            dtype; ``-inf`` entries mask vocabulary entries.
        labels: [B, T] int64/int32 in [0, V) or ``ignore_index`` (range-checked: a device sync on CUDA
            unless ``RLHF_KERNELS_CHECK_INDICES=0``).
        old_logprobs, advantages: [B, T] floating, one dtype (any of hidden's).
        mask: [B, T] bool / integer / floating 0-1 weights of the tokens that count.
        loss: one of :data:`LINEAR_POLICY_LOSSES` (verl's names); ``loss_params`` its keyword parameters,
            defaults as the ``rlhf_kernels`` policy-loss functions: vanilla (clip_low 0.2, clip_high =
            clip_low, dual_clip 3.0 or None), dro (beta, required), cispo (clip_low, clip_high), sapo
            (tau_pos 1.0, tau_neg 1.05), dppo_tv / dppo_kl (clip_low, clip_high, truncation 20.0).
        is_weights: optional [B, T] rollout importance weights w (no gradient) on the policy term.
        entropy_coef: the entropy bonus coefficient (0: the entropy is not computed).
        ref_logprobs: optional [B, T] reference log-probabilities (no gradient); with them the metric
            ``kl_loss`` = agg(k(lp, ref), m) is reported and ``kl_coef`` · it added to the loss.
        kl_estimator: a name of ``rlhf_kernels.ops.kl.KL_ESTIMATORS`` (verl's default ``low_var_kl``;
            ``k3+`` etc. straight-through).
        temperature: > 0, the logits are divided by it.  ignore_index: label of positions to skip.
        loss_agg, normalizer: the aggregation of every term (docs/aggregation.md).
        chunk_rows: tokens per chunk (default: ``_fused_linear.plan_chunk_rows``).
        return_logprobs: also return the per-token log-probabilities [B, T] (fp32; 0 at masked
            positions; no gradient).
        grad_weight_accumulation: "float32" (default: d_weight summed over the chunks in fp32, rounded
            once) or "weight_dtype" (added into a d_weight in the weight's dtype, one rounding per chunk,
            without the 4·V·H-byte fp32 accumulator): ``_fused_linear.chunked_linear_loss``.

    Returns:
        ``(loss, metrics)`` (or ``(loss, metrics, logprobs)``): loss 0-dim fp32 (fp64 for fp64 hidden),
        differentiable with respect to ``hidden``, ``weight`` and ``bias`` (gradients in their dtypes).
        ``metrics``: 0-dim fp32 ``pg_loss``; the variant's ``clipfrac`` / ``clipfrac_lower`` /
        ``approx_kl`` (as the policy-loss functions report them); ``entropy`` = agg(H, m) when
        entropy_coef ≠ 0; ``kl_loss`` with ``ref_logprobs``.

    Example: hidden [4, 512, 4096] bf16, weight [151936, 4096] bf16 → chunks of 384 tokens on CUDA; the
    peak extra memory is one chunk's fp32 logits (256 MiB) + the fp32 d_weight accumulator (none with
    ``grad_weight_accumulation="weight_dtype"``), not the [2048, 151936] logits (1.2 GB bf16, 2.5 GB
    fp32) and their gradient.
    """
    check_head(hidden, weight, bias, ndim=3, layout="[B, T, H]")
    check_index_tensor("labels", labels)
    check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    check_same_device(hidden=hidden, labels=labels)
    check_grad_weight_accumulation(grad_weight_accumulation)
    params = _variant_params(loss, loss_params)
    check_token_inputs(mask, old_logprobs=old_logprobs, advantages=advantages)
    check_shape("old_logprobs", old_logprobs, labels.shape, "labels.shape")
    check_same_device(hidden=hidden, old_logprobs=old_logprobs)
    acc = compute_dtype(hidden)
    token = {"is_weights": is_weights, "ref_logprobs": ref_logprobs}
    for name, tensor in token.items():
        if tensor is not None:
            check_float_tensor(name, tensor, HEAD_DTYPES)
            check_shape(name, tensor, labels.shape, "labels.shape")
            check_same_device(hidden=hidden, **{name: tensor})
    entropy_coef = check_real("entropy_coef", entropy_coef)
    kl_coef = check_real("kl_coef", kl_coef)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef = {kl_coef} needs ref_logprobs; got None")
    estimator = check_estimator(kl_estimator)
    inv_temperature = 1.0 / check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or check_int("chunk_rows", chunk_rows) < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None; got {chunk_rows!r}")
    check_label_range(labels, weight.shape[0], ignore_index, "weight.shape[0]")

    batch, seq_len, hidden_size = hidden.shape
    flat = [t.reshape(-1).detach().to(acc) if t is not None else None
            for t in (old_logprobs, advantages, is_weights, ref_logprobs)]
    settings = (loss, params, ignore_index, inv_temperature, entropy_coef, kl_coef, estimator,
                loss_agg, batch, seq_len, normalizer, chunk_rows, grad_weight_accumulation)
    total, terms, stats, logprobs, _ = fused_linear_apply(
        _policy_loss, hidden.reshape(-1, hidden_size), weight, bias, labels.reshape(-1), flat[0], flat[1],
        flat[2], mask.reshape(-1), flat[3], settings,
    )
    _, names, zeros = _VARIANTS[loss]
    metrics = {"pg_loss": terms[0].float(), **_metric_means(stats, names, zeros)}
    if entropy_coef != 0.0:
        metrics["entropy"] = terms[1].float()
    if ref_logprobs is not None:
        metrics["kl_loss"] = terms[2].float()
    if return_logprobs:
        return total, metrics, logprobs.view(batch, seq_len)
    return total, metrics
