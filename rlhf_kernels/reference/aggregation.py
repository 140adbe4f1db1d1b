"""Float64 oracle of the aggregation of a [B, T] per-token loss (see docs/aggregation.md).

With n_b = Σ_t m the tokens of row b, N = Σ_b n_b, R = #{b : n_b > 0} and T the padded row length, the
modes mean what verl 0.9.1's ``agg_loss`` means:

    token-mean               Σ L·m / N
    token-sum                Σ L·m
    seq-mean-token-sum       Σ_b Σ_t L·m / R
    seq-mean-token-mean      Σ_{b: n_b > 0} [Σ_t L·m / n_b] / R
    seq-mean-token-sum-norm  Σ L·m / (R·T)

``normalizer`` replaces the whole denominator (N, 1, R, R or R·T).  Without one, a denominator of 0
(no valid token) is taken as 1, so that an empty batch gives 0.  Masked positions are excluded with
``torch.where`` (NaN padding there cannot leak in).
"""

from __future__ import annotations

import torch

MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(per_token, mask, mode="token-mean", normalizer=None):
    L = per_token.to(torch.float64)
    m = mask.to(torch.float64)
    T = L.shape[-1]
    Lm = torch.where(m != 0, L * m, torch.zeros_like(L))
    row_sums = Lm.sum(-1)
    row_tokens = m.sum(-1)
    nonempty = row_tokens > 0
    rows = nonempty.to(torch.float64).sum()
    one = torch.ones((), dtype=torch.float64, device=L.device)
    if mode == "token-mean":
        numerator, denominator = Lm.sum(), m.sum()
    elif mode == "token-sum":
        numerator, denominator = Lm.sum(), one
    elif mode == "seq-mean-token-sum":
        numerator, denominator = row_sums.sum(), rows
    elif mode == "seq-mean-token-mean":
        row_means = row_sums / torch.where(nonempty, row_tokens, torch.ones_like(row_tokens))
        numerator, denominator = torch.where(nonempty, row_means, torch.zeros_like(row_means)).sum(), rows
    elif mode == "seq-mean-token-sum-norm":
        numerator, denominator = row_sums.sum(), rows * T
    else:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if normalizer is None:
        denominator = torch.where(denominator > 0, denominator, one)
    else:
        denominator = torch.as_tensor(normalizer, dtype=torch.float64, device=L.device)
    return numerator / denominator
