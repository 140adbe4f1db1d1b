"""Float64 oracles of group advantages, their broadcast to tokens and the advantage estimators, group by
group (Python loops over groups, samples and positions: the executable specification).

The token-level families' oracles live in ``reference/gae.py``, ``reference/whiten.py`` and
``reference/token_rewards.py`` (re-exported here for the old import path); the KL estimators only in
``reference/kl.py``.
"""

from __future__ import annotations

import torch

from .gae import compute_gae
from .token_rewards import token_level_rewards
from .whiten import masked_whiten

__all__ = [
    "broadcast_to_tokens",
    "compute_gae",
    "flash_reinforce_advantages",
    "gdpo_advantages",
    "gpg_advantages",
    "group_advantages",
    "grpo_advantages",
    "grpo_batch_std_advantages",
    "grpo_passk_advantages",
    "masked_whiten",
    "opo_advantages",
    "optimal_token_baseline_advantages",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "tir_optimal_token_baseline_advantages",
    "token_level_rewards",
]


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


# --------------------------------------------------------------------------------------------------
# Advantage estimators, group by group and sample by sample (docs/advantages.md states each rule).
# --------------------------------------------------------------------------------------------------
def _members(index: torch.Tensor) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for row, key in enumerate(index.tolist()):
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def _tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values[b] (or values[b, t]) · m[b, t], 0 where m = 0."""
    m = mask.double()
    values = values.double()
    values = values[:, None] if values.dim() == 1 else values
    return torch.where(m != 0, values * m, torch.zeros_like(m))


def _whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased masked whitening (eps 1e-8) times the mask; 0 with fewer than two valid tokens."""
    m = mask.double()
    n = m.sum()
    if n < 2:
        return torch.zeros_like(x)
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / n * n / (n - 1)
    return _tokens((x - mean) / torch.sqrt(var + 1e-8), mask)


def _group_stats(scores: torch.Tensor, rows: list[int]) -> tuple[float, float]:
    """(mean, unbiased std) of a group; (0, 1) for a group of one."""
    if len(rows) == 1:
        return 0.0, 1.0
    group = scores[rows]
    return float(group.mean()), float(group.std())


def grpo_advantages(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    s = rewards.double().sum(-1)
    out = torch.zeros_like(s)
    for rows in _members(index):
        mean, std = _group_stats(s, rows)
        for i in rows:
            out[i] = (s[i] - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else s[i] - mean
    return _tokens(out, mask)


def grpo_passk_advantages(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    s = rewards.double().sum(-1)
    out = torch.zeros_like(s)
    for rows in _members(index):
        if len(rows) < 2:
            continue
        ranked = sorted(rows, key=lambda i: (-float(s[i]), i))
        a = s[ranked[0]] - s[ranked[1]]
        out[ranked[0]] = a / (s[rows].std() + epsilon) if norm_adv_by_std_in_grpo else a
    return _tokens(out, mask)


def rloo_advantages(rewards, mask, index, singleton="score"):
    s = rewards.double().sum(-1)
    out = s.clone() if singleton == "score" else torch.zeros_like(s)
    for rows in _members(index):
        for i in rows if len(rows) > 1 else ():
            out[i] = s[i] - sum(float(s[j]) for j in rows if j != i) / (len(rows) - 1)
    return _tokens(out, mask)


def opo_advantages(rewards, mask, index):
    s = rewards.double().sum(-1)
    lengths = mask.double().sum(-1)
    out = s.clone()
    for rows in _members(index):
        weight = float(lengths[rows].sum())
        if len(rows) > 1 and weight != 0:
            out[rows] = s[rows] - float((lengths[rows] * s[rows]).sum()) / weight
    return _tokens(out, mask)


def gpg_advantages(rewards, mask, index, f_norm=1.0):
    s = rewards.double().sum(-1)
    alpha = s.shape[0] / max(1, int((s != 0).sum()))
    out = torch.zeros_like(s)
    for rows in _members(index):
        mean, _ = _group_stats(s, rows)
        out[rows] = alpha * (s[rows] - mean) / f_norm
    return _tokens(out, mask)


def reinforce_plus_plus_baseline_advantages(rewards, mask, index):
    s = rewards.double().sum(-1)
    out = torch.zeros_like(s)
    for rows in _members(index):
        out[rows] = s[rows] - _group_stats(s, rows)[0]
    return _whiten(_tokens(out, mask), mask)


def gdpo_advantages(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True, reward_scores=None,
                    reward_weights=None):
    scores = rewards.double().sum(-1, keepdim=True) if reward_scores is None else reward_scores.double()
    weights = [1.0] * scores.shape[1] if reward_weights is None else list(reward_weights)
    total = torch.zeros(scores.shape[0], dtype=torch.float64)
    for k, w in enumerate(weights):
        component = scores[:, k].contiguous()
        total += w * grpo_advantages(component[:, None], torch.ones_like(component[:, None]), index, epsilon,
                                     norm_adv_by_std_in_grpo)[:, 0]
    return _whiten(_tokens(total, mask), mask)


def _returns(rewards, mask, gamma=1.0, carry=False):
    """G_t = r_t·m_t + γ·G_{t+1} (carry: masked positions skipped, G there 0)."""
    r, m = rewards.double(), mask.double()
    out = torch.zeros_like(r)
    for b in range(r.shape[0]):
        running = 0.0
        for t in reversed(range(r.shape[1])):
            if carry:
                if m[b, t] != 0:
                    running = float(r[b, t]) + gamma * running
                    out[b, t] = running
            else:
                running = float(r[b, t] * m[b, t]) + running
                out[b, t] = running
    return out


def reinforce_plus_plus_advantages(rewards, mask, gamma=1.0):
    returns = _returns(rewards, mask, gamma, carry=True)
    return _whiten(returns, mask), returns


def remax_advantages(rewards, baselines, mask):
    returns = _returns(rewards, mask)
    return _tokens(returns - baselines.double()[:, None], mask), returns


def _otb(rewards, mask, index, old_log_probs, sum_pi_squared, weights, zero_tail, epsilon, packed):
    m = mask.double()
    returns = _returns(rewards, mask)
    w = (1 - 2 * old_log_probs.double().exp() + sum_pi_squared.double()) * m
    if weights is not None:
        w = w * weights.double() ** 2
    cumulative = w.cumsum(-1)
    B, T = m.shape
    # the positions that line up across a group: all T (packed=False), else the valid ones in order
    slots = [[t for t in range(T) if not packed or m[b, t] != 0] for b in range(B)]
    baseline = [[0.0] * len(slots[b]) for b in range(B)]
    for rows in _members(index):
        rows = [b for b in rows if not packed or slots[b]]
        if len(rows) < 2:
            continue
        lengths = sorted(float(m[b].sum()) for b in rows)
        longest = [b for b in rows if float(m[b].sum()) == lengths[-1]]
        for k in range(T):
            num = den = 0.0
            for b in rows:
                if k < len(slots[b]) and m[b, slots[b][k]] != 0:
                    num += float(returns[b, slots[b][k]] * cumulative[b, slots[b][k]])
                    den += float(cumulative[b, slots[b][k]])
            value = num / (den + epsilon) if den + epsilon != 0 else 0.0
            for b in rows:
                if k < len(slots[b]):
                    cut = zero_tail and len(longest) == 1 and b == longest[0] and k >= int(lengths[-2])
                    baseline[b][k] = 0.0 if cut else value
    out = torch.zeros_like(m)
    for b in range(B):
        for k, t in enumerate(slots[b]):
            out[b, t] = (returns[b, t] - baseline[b][k]) * m[b, t]
    return out, returns


def optimal_token_baseline_advantages(rewards, mask, index, old_log_probs, sum_pi_squared,
                                      rollout_is_weights=None, handle_zero_tail=True, epsilon=1e-8):
    return _otb(rewards, mask, index, old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail,
                epsilon, packed=False)


def tir_optimal_token_baseline_advantages(rewards, mask, index, old_log_probs, sum_pi_squared,
                                          rollout_is_weights=None, handle_zero_tail=True, epsilon=1e-8):
    return _otb(rewards, mask, index, old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail,
                epsilon, packed=True)


def grpo_batch_std_advantages(rewards, mask, index, epsilon=1e-4):
    s = rewards.double().sum(-1)
    spread = float(s.std()) if s.shape[0] > 1 else 0.0
    out = torch.zeros_like(s)
    for rows in _members(index):
        out[rows] = (s[rows] - s[rows].mean()) / (spread + epsilon)
    return _tokens(out, mask)


def flash_reinforce_advantages(rewards, mask):
    s = rewards.double().sum(-1)
    return _tokens(s - s.mean() if s.shape[0] else s, mask)
