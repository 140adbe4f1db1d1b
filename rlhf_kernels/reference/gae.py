"""Float64 oracles of GAE, KL penalties, reward shaping, whitening and group advantages.

Plain reverse loops and direct formulas, exactly as the issue states them; no attention to speed.
"""

from __future__ import annotations

import torch


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    mask_mode: str = "carry",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) in float64, one time step at a time from T−1 down to 0."""
    r = rewards.double()
    v = values.double()
    m = mask.double()
    B, T = r.shape
    advantages = torch.zeros(B, T, dtype=torch.float64, device=r.device)
    if mask_mode == "carry":
        nv = torch.zeros(B, dtype=torch.float64, device=r.device)
        lg = torch.zeros(B, dtype=torch.float64, device=r.device)
        for t in reversed(range(T)):
            delta = r[:, t] + gamma * nv - v[:, t]
            a = delta + gamma * lam * lg
            nv = m[:, t] * v[:, t] + (1 - m[:, t]) * nv
            lg = m[:, t] * a + (1 - m[:, t]) * lg
            advantages[:, t] = lg
        return advantages, advantages + v
    if mask_mode == "zero":
        v = v * m
        r = r * m
        last = torch.zeros(B, dtype=torch.float64, device=r.device)
        for t in reversed(range(T)):
            next_value = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
            delta = r[:, t] + gamma * next_value - v[:, t]
            last = delta + gamma * lam * last
            advantages[:, t] = last
        return advantages, advantages + v
    raise ValueError(f"unknown mask_mode {mask_mode!r}")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """k1 = lp − ref; abs = |lp − ref|; k2 = ½(lp − ref)²; k3 = clamp(e^d − d − 1, −10, 10) with
    d = clamp(ref − lp, −20, 20); float64, differentiable through autograd."""
    lp = logprobs.double()
    ref = ref_logprobs.double()
    if estimator == "k1":
        return lp - ref
    if estimator == "abs":
        return (lp - ref).abs()
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    if estimator in ("k3", "low_var_kl"):
        d = torch.clamp(ref - lp, -20, 20)
        return torch.clamp(torch.exp(d) - d - 1, -10, 10)
    raise ValueError(f"unknown estimator {estimator!r}")


def token_level_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards = −kl_coef·KL·m, plus the (clamped) score at each row's last valid position; and the mean
    over rows of each row's masked-mean KL (0 for a row without valid positions)."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    m = mask.double()
    rewards = -kl_coef * kl * m
    score = scores.double()
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    row_kl = torch.zeros(m.shape[0], dtype=torch.float64)
    for b in range(m.shape[0]):
        valid = (m[b] != 0).nonzero().flatten()
        if len(valid):
            rewards[b, valid[-1]] += score[b]
            row_kl[b] = (kl[b] * m[b]).sum() / m[b].sum()
    return rewards, row_kl.mean()


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    dim: int | None = None,
) -> torch.Tensor:
    """out = (x − μ)·rsqrt(var + eps) where m ≠ 0, else 0; plus μ when not shift_mean.  μ = Σxm/Σm,
    var = Σ(x − μ)²m/Σm·n/(n−1) (unbiased).  Empty selection: μ = var = 0; unbiased with n = 1: var = 0."""
    xd = x.double()
    md = mask.double()
    if dim is None:
        rows_x, rows_m = xd.reshape(1, -1), md.reshape(1, -1)
    else:
        rows_x, rows_m = xd.reshape(-1, x.shape[-1]), md.reshape(-1, x.shape[-1])
    out = torch.zeros_like(rows_x)
    for i in range(rows_x.shape[0]):
        xs, ms = rows_x[i], rows_m[i]
        valid = ms != 0
        n = ms[valid].sum()
        if n > 0:
            mean = (xs[valid] * ms[valid]).sum() / n
            var = ((xs[valid] - mean) ** 2 * ms[valid]).sum() / n
            if unbiased:
                var = var * n / (n - 1) if n > 1 else torch.zeros((), dtype=torch.float64)
        else:
            mean = torch.zeros((), dtype=torch.float64)
            var = torch.zeros((), dtype=torch.float64)
        row = torch.where(valid, (xs - mean) / torch.sqrt(var + eps), torch.zeros_like(xs))
        out[i] = row if shift_mean else row + mean
    return out.reshape(x.shape)


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    norm: str = "std",
    eps: float = 1e-6,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """A_i = (s_i − baseline_i)/(std_g + eps) (or without the division), group by group."""
    s = scores.double()
    out = torch.empty_like(s)
    for start in range(0, s.shape[0], group_size):
        group = s[start : start + group_size]
        std = group.std(unbiased=True)
        for i in range(group_size):
            if leave_one_out:
                others = torch.cat([group[:i], group[i + 1 :]])
                baseline = others.mean()
            else:
                baseline = group.mean()
            a = group[i] - baseline
            out[start + i] = a / (std + eps) if norm == "std" else a
    return out


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """advantages[b]·m[b, t], 0 where m = 0."""
    m = mask.double()
    return torch.where(m != 0, advantages.double()[:, None] * m, torch.zeros_like(m))
