"""The PyTorch path of the PPO policy and value losses (any device), registered as
``ppo_policy_loss_fwd_torch`` / ``_bwd_torch`` and ``ppo_value_loss_fwd_torch`` / ``_bwd_torch``, and the
registered ops ``*_cpp`` of their C++ kernel (csrc/policy_losses.cpp, shared with the policy-loss core).

The math is documented in ``rlhf_kernels/ops/ppo_losses.py``; this is the same math in row chunks
sized for the L2 cache (32K tokens: 128 KiB fp32 temporaries), with one partial sum per row
(the Triton kernels write one per (row, chunk of columns)).  Every term is elementwise, so the inputs are
used as they are, and whatever masked positions produce (NaN and inf padding included) is zeroed by a
bitwise and with all-ones / all-zeros words on each float term just before its row dot product with the
mask, and on the gradient g·m·∂L/∂x just before it is written: masked positions contribute exactly 0 and
get exactly 0 even when the upstream gradient is not finite (a normalizer of 0 for a fully masked batch),
while NaN at a valid position stays NaN.  No ``where`` selects anything in the chunk loop (on CPU a
``where`` costs as much as ~40 multiplications): :func:`unless`, :func:`choose` and :func:`nan_like` are
the exact arithmetic forms.  The backward recomputes only the derivative, not the loss or statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ... import _ext
from ..._registration import torch_op
from ..._validation import compute_dtype

LOG_RATIO_CLAMP = 20.0  # verl's clamp of lp − old before the exponential (the kernels read it too)

# Rows of the policy loss's statistics tensor (each a per-row partial sum, except the max).
P_MASK, P_CLIP, P_CLIP_LOWER, P_NEG_LOG_RATIO, P_RATIO, P_RATIO_MAX = range(6)
POLICY_STATS = 6
# Rows of the value loss's statistics tensor.
V_MASK, V_CLIP = range(2)
VALUE_STATS = 2

_CHUNK_ELEMENTS = 1 << 15  # tokens per row chunk: 128 KiB fp32 temporaries, kept in L2 (see _row_slices)


def _row_slices(rows: int, cols: int) -> Iterator[slice]:
    """Row chunks of about _CHUNK_ELEMENTS tokens, whatever the thread count: an elementwise op on a chunk
    then stays under ATen's parallel grain (32K) and opens no OpenMP region, which on a loaded machine
    costs more than the op (measured in docs/policy_losses.md)."""
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # the integer twin of each compute dtype


def _mask_chunk(mask: torch.Tensor, rs: slice, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights m in ``dtype``, keep bits: all ones where m ≠ 0, else 0) of rows ``rs``."""
    m = mask[rs].to(dtype)
    width = 8 * m.element_size() - 1
    bits = m.view(_BITS[dtype]) & ((1 << width) - 1)  # |m|'s bits: -0.0 is 0 too
    return m, (bits | -bits) >> width  # integer steps, no second conversion of the mask


def _keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where ``keep`` is all ones, +0 where it is 0, by a bitwise and: NaN and inf at masked positions
    vanish, NaN at valid ones stays (a ``where`` costs ~40 multiplications on CPU)."""
    return (x.view(keep.dtype) & keep).view(x.dtype)


def _row_dot(x: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ_t x·m per row over the valid positions, whatever x holds elsewhere (bool x is read as 0/1 bytes,
    finite everywhere: no conversion pass and no masking needed)."""
    if x.dtype == torch.bool:
        return (weights * x.view(torch.uint8)).sum(-1)
    return (weights * _keep(x, keep)).sum(-1)


def unless(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """x where ``flags`` (bool) is False, 0 where it is True: a product with the flags' bytes, exact for
    finite x (a ``where`` costs ~40 multiplications on CPU); NaN or inf x gives NaN either way."""
    return x * (~flags).view(torch.uint8)


def choose(flags: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where ``flags`` (bool) is True, else b: exact for finite a and b (see :func:`unless`)."""
    return a * flags.view(torch.uint8) + unless(b, flags)


def nan_like(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where x is a number (±inf included), NaN where x is NaN: value + clamp(x, ±1)·0 (keeps
    NaN flowing into constant derivatives without a ``where``)."""
    return value + x.clamp(-1.0, 1.0).mul_(0.0)


# ---------------------------------------------------------------------------------------------------
# The two shapes every op here takes: forward partial sums, backward gradient.  Chunks of rows small
# enough that every temporary stays in the L2 cache (32K tokens): the inputs are read from
# memory once per pass and the dozen elementwise steps of a loss run on cached data.  Every term is
# elementwise, so inputs are used as they are; what masked positions produce is zeroed by a bitwise and
# on each float term (and on the gradient) just before it is summed (or written), never by a ``where``.
# ---------------------------------------------------------------------------------------------------
def _forward(
    inputs: tuple[torch.Tensor | None, ...], mask: torch.Tensor, n_stats: int, chunk_terms: Callable,
    max_of: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t L·m [B, 1], statistics [n_stats, B, 1]); ``chunk_terms(*inputs)`` gives a chunk's per-token
    loss and {statistic row: per-token value (float or bool)}; row 0 is Σ_t m.  ``max_of = (row, of)``
    also writes the max over valid tokens of statistic ``of`` into ``row`` (NaN skipped; 0 without any)."""
    x = inputs[0]
    rows, cols = x.shape
    dtype = compute_dtype(*inputs)
    loss_partials = torch.empty(rows, 1, dtype=dtype, device=x.device)
    stats = torch.zeros(n_stats, rows, 1, dtype=dtype, device=x.device)
    for rs in _row_slices(rows, cols):
        m, keep = _mask_chunk(mask, rs, dtype)
        loss, row_terms = chunk_terms(*(None if t is None else t[rs].to(dtype) for t in inputs))
        loss_partials[rs, 0] = _row_dot(loss, m, keep)
        stats[0, rs, 0] = m.sum(-1)
        for index, value in row_terms.items():
            stats[index, rs, 0] = _row_dot(value, m, keep)
        if max_of is not None and cols:
            valid_values = _keep(row_terms[max_of[1]], keep)
            stats[max_of[0], rs, 0] = valid_values.nan_to_num_(nan=0.0).amax(-1)
    return loss_partials, stats


def _backward(
    grad_partials: torch.Tensor, inputs: tuple[torch.Tensor | None, ...], mask: torch.Tensor,
    derivative: Callable,
) -> torch.Tensor:
    """∂/∂inputs[0] [B, T] in its dtype: g_b·m·derivative(*inputs) at valid positions, exactly 0 elsewhere
    (also where g_b is not finite: the product is zeroed at masked positions by a bitwise and)."""
    x = inputs[0]
    rows, cols = x.shape
    dtype = compute_dtype(*inputs)
    grad = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    # One partial per row on this path (a forward and its backward always share a backend).
    g = grad_partials.sum(-1, keepdim=True).to(dtype)
    for rs in _row_slices(rows, cols):
        m, keep = _mask_chunk(mask, rs, dtype)
        scaled = derivative(*(None if t is None else t[rs].to(dtype) for t in inputs)) * (m * g[rs])
        if grad.dtype == dtype:  # written in place: no [B, T] copy
            torch.bitwise_and(scaled.view(keep.dtype), keep, out=grad[rs].view(keep.dtype))
        else:
            grad[rs] = _keep(scaled, keep)
    return grad


def _partials_fake(n_stats: int) -> Callable:
    def fake(x, *args):
        dtype = compute_dtype(x, *args[:2])
        return x.new_empty(x.shape[0], 1, dtype=dtype), x.new_empty(n_stats, x.shape[0], 1, dtype=dtype)

    return fake


def _grad_fake(grad_partials, x, *args):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------------
# Policy loss.
# ---------------------------------------------------------------------------------------------------
def policy_terms(lp, old, adv, clip_low, clip_high, dual_clip):
    """(L, log-ratio ℓ, ratio r, clipped, dual-clipped or None, raw lp − old) per token."""
    raw = lp - old
    log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # torch.clamp propagates NaN
    ratio = log_ratio.exp()
    neg_adv = -adv
    loss1 = neg_adv * ratio
    loss2 = neg_adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = loss2 > loss1
    loss = torch.maximum(loss1, loss2)  # = where(clipped, loss2, loss1); both are NaN or neither
    lower = None
    if dual_clip is not None:
        bound = neg_adv * dual_clip
        lower = (adv < 0) & (loss > bound)
        loss = choose(lower, bound, loss)
    return loss, log_ratio, ratio, clipped, lower, raw


def policy_derivative(lp, old, adv, clip_low, clip_high, dual_clip):
    """∂L/∂lp per token: −A·r on unclipped tokens inside the log-ratio clamp, else 0; NaN stays NaN
    (comparisons with NaN are False, so a NaN token is neither clipped nor outside the clamp)."""
    raw = lp - old
    ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    neg_adv = -adv
    loss1 = neg_adv * ratio
    loss2 = neg_adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    flat = loss2 > loss1  # clipped
    if dual_clip is not None:
        flat |= (adv < 0) & (torch.maximum(loss1, loss2) > neg_adv * dual_clip)
    flat |= raw.abs() > LOG_RATIO_CLAMP
    return unless(loss1, flat)


def _policy_fwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    def chunk_terms(lp, old, adv):
        loss, log_ratio, ratio, clipped, lower, _ = policy_terms(lp, old, adv, clip_low, clip_high, dual_clip)
        row_terms = {P_CLIP: clipped, P_NEG_LOG_RATIO: -log_ratio, P_RATIO: ratio}
        if lower is not None:
            row_terms[P_CLIP_LOWER] = lower
        return loss, row_terms

    inputs = (logprobs, old_logprobs, advantages)
    return _forward(inputs, mask, POLICY_STATS, chunk_terms, max_of=(P_RATIO_MAX, P_RATIO))


def _policy_bwd(
    grad_partials: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    def derivative(lp, old, adv):
        return policy_derivative(lp, old, adv, clip_low, clip_high, dual_clip)

    return _backward(grad_partials, (logprobs, old_logprobs, advantages), mask, derivative)


# ---------------------------------------------------------------------------------------------------
# Value loss.
# ---------------------------------------------------------------------------------------------------
def value_terms(v, v_old, ret, clip):
    """(L, ∂L/∂v, clipped or None) per token."""
    err = v - ret
    loss = 0.5 * err * err
    if clip is None:
        return loss, err, None
    v_clipped = torch.where(v < v_old - clip, v_old - clip, torch.where(v > v_old + clip, v_old + clip, v))
    err_clipped = v_clipped - ret
    loss_clipped = 0.5 * err_clipped * err_clipped
    clipped = loss_clipped > loss
    return choose(clipped, loss_clipped, loss), unless(err, clipped), clipped


def _value_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    def chunk_terms(v, v_old, ret):
        loss, _, clipped = value_terms(v, v_old, ret, clip)
        return loss, ({} if clipped is None else {V_CLIP: clipped})

    return _forward((values, old_values, returns), mask, VALUE_STATS, chunk_terms)


def _value_bwd(
    grad_partials: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    def derivative(v, v_old, ret):
        return value_terms(v, v_old, ret, clip)[1]

    return _backward(grad_partials, (values, old_values, returns), mask, derivative)


# ---------------------------------------------------------------------------------------------------
# The C++ CPU kernel (csrc/policy_losses.cpp, the "cpp" backend, the default on CPU): the policy loss is the
# token-level core's "vanilla" variant (code 0) without weights, the value loss its code 11.
# ---------------------------------------------------------------------------------------------------
VANILLA_CODE = 0  # TOKEN_VARIANTS.index("vanilla") in ops/cpu/policy_losses.py (which imports this module)
VALUE_CODE = 11


def _inf_if_none(value: float | None) -> float:
    return float("inf") if value is None else value


def _policy_fwd_cpp(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_low: float, clip_high: float, dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = [clip_low, clip_high, _inf_if_none(dual_clip)]
    partials, stats, _ = _ext.load("cpp").policy_loss_token_fwd(
        logprobs, old_logprobs, advantages, mask, None, None, VANILLA_CODE, params
    )
    return partials, stats


def _policy_bwd_cpp(
    grad_partials: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
) -> torch.Tensor:
    params = [clip_low, clip_high, _inf_if_none(dual_clip)]
    return _ext.load("cpp").policy_loss_token_bwd(
        grad_partials, logprobs, old_logprobs, advantages, mask, None, None, VANILLA_CODE, params
    )


def _value_fwd_cpp(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    partials, stats, _ = _ext.load("cpp").policy_loss_token_fwd(
        values, old_values, returns, mask, None, None, VALUE_CODE, [_inf_if_none(clip)]
    )
    return partials, stats[:VALUE_STATS].clone()


def _value_bwd_cpp(
    grad_partials: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
    mask: torch.Tensor, clip: float | None,
) -> torch.Tensor:
    return _ext.load("cpp").policy_loss_token_bwd(
        grad_partials, values, old_values, returns, mask, None, None, VALUE_CODE, [_inf_if_none(clip)]
    )


ppo_policy_loss_fwd_cpp = torch_op(
    "ppo_policy_loss_fwd_cpp", _policy_fwd_cpp, fake=_partials_fake(POLICY_STATS)
)
ppo_policy_loss_bwd_cpp = torch_op("ppo_policy_loss_bwd_cpp", _policy_bwd_cpp, fake=_grad_fake)
ppo_value_loss_fwd_cpp = torch_op("ppo_value_loss_fwd_cpp", _value_fwd_cpp, fake=_partials_fake(VALUE_STATS))
ppo_value_loss_bwd_cpp = torch_op("ppo_value_loss_bwd_cpp", _value_bwd_cpp, fake=_grad_fake)

ppo_policy_loss_fwd_torch = torch_op(
    "ppo_policy_loss_fwd_torch", _policy_fwd, fake=_partials_fake(POLICY_STATS)
)
ppo_policy_loss_bwd_torch = torch_op("ppo_policy_loss_bwd_torch", _policy_bwd, fake=_grad_fake)
ppo_value_loss_fwd_torch = torch_op("ppo_value_loss_fwd_torch", _value_fwd, fake=_partials_fake(VALUE_STATS))
ppo_value_loss_bwd_torch = torch_op("ppo_value_loss_bwd_torch", _value_bwd, fake=_grad_fake)
