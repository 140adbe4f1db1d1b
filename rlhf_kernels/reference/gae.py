"""Float64 oracle of GAE: the reverse loop, one time step at a time, exactly as the formula states it."""

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
