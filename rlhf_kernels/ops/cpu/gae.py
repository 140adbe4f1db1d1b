"""GAE off the Triton path: the PyTorch scan (any device) and the csrc extension kernels.

``gae_torch``  a Hillis–Steele scan in plain PyTorch: log₂T rounds of whole-tensor ops, no loop over T.
``gae_cpp``    the C++ CPU kernel of ``csrc/gae.cpp`` (rows in parallel, the sequential fp32 recurrence).
``gae_cuda``   the CUDA kernel of ``csrc/gae_cuda.cu`` (a warp per row, shuffle scan).

All three take ``(rewards, values, mask, gamma, lam, carry)`` ([B, T] each, any dtypes and strides) and
return fp32 ``(advantages, returns)``; the math (and why a scan gives the loop's answer) is in
``rlhf_kernels/ops/gae.py``, the extension loader in ``rlhf_kernels/_ext.py``.
"""

from __future__ import annotations

import torch

from ... import _ext
from ..._registration import torch_op


def _carry_maps(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, ...]:
    """The per-position affine maps (p, q, r, c, d) of mask_mode="carry" in fp32; identity where m = 0."""
    r = rewards.to(torch.float32)
    v = values.to(torch.float32)
    m = mask.to(torch.float32)
    valid = m != 0
    zero = torch.zeros_like(r)
    p = torch.where(valid, 1.0 - m, 1.0)
    q = torch.where(valid, m * gamma, zero)
    rr = torch.where(valid, m * (gamma * lam) + (1.0 - m), 1.0)
    c = torch.where(valid, m * v, zero)
    d = torch.where(valid, m * (r - v), zero)
    return p, q, rr, c, d


def _carry_scan(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """Inclusive scan of the carry-mode maps in reversed time (the Triton kernel's operator, in a
    genuinely tree-shaped order); the initial state is (0, 0), so A_t is the d-component."""
    p, q, rr, c, d = (x.flip(-1) for x in _carry_maps(rewards, values, mask, gamma, lam))
    shift = 1
    while shift < rewards.shape[-1]:
        p1, q1, r1, c1, d1 = (x[:, :-shift] for x in (p, q, rr, c, d))  # earlier in the scan
        p2, q2, r2, c2, d2 = (x[:, shift:] for x in (p, q, rr, c, d))
        head = slice(0, shift)
        p, q, rr, c, d = (
            torch.cat([p[:, head], p2 * p1], dim=1),
            torch.cat([q[:, head], q2 * p1 + r2 * q1], dim=1),
            torch.cat([rr[:, head], r2 * r1], dim=1),
            torch.cat([c[:, head], p2 * c1 + c2], dim=1),
            torch.cat([d[:, head], q2 * c1 + r2 * d1 + d2], dim=1),
        )
        shift *= 2
    return d.flip(-1)


def _zero_scan(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """mask_mode="zero" on the masked r' and V': δ_t = r'_t + γV'_{t+1} − V'_t, then A_t = δ_t + γλA_{t+1}
    as a scan with one constant decay: A_t ← A_t + (γλ)^s·A_{t+s} for s = 1, 2, 4, ..."""
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]  # V'_T = 0
    advantages = rewards + gamma * next_values - values
    decay = gamma * lam
    shift = 1
    while shift < rewards.shape[-1]:
        advantages = torch.cat(
            [advantages[:, :-shift] + decay**shift * advantages[:, shift:], advantages[:, -shift:]], dim=1
        )
        shift *= 2
    return advantages


def _gae_scan(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if carry:
        advantages = _carry_scan(rewards, values, mask, gamma, lam)
        v_returns = values.to(torch.float32)
    else:
        m = mask.to(torch.float32)
        valid = m != 0
        r = torch.where(valid, m * rewards.to(torch.float32), 0.0)  # never reads a masked position
        v_returns = torch.where(valid, m * values.to(torch.float32), 0.0)
        advantages = _zero_scan(r, v_returns, gamma, lam)
    advantages = advantages.contiguous()
    return advantages, advantages + v_returns


def _extension_gae(backend: str):
    """The ``gae_forward`` of the ``backend`` ("cpp" or "cuda") extension, built on first use."""

    def gae(
        rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(_ext.load(backend).gae_forward(rewards, values, mask, gamma, lam, carry))

    gae.__name__ = gae.__qualname__ = f"gae_{backend}"
    return gae


def _outputs_like(rewards, values, mask, gamma, lam, carry):
    advantages = rewards.new_empty(rewards.shape, dtype=torch.float32)
    return advantages, torch.empty_like(advantages)


gae_torch, gae_cpp, gae_cuda = (
    torch_op(f"gae_{backend}", fn, fake=_outputs_like)
    for backend, fn in (
        ("torch", _gae_scan), ("cpp", _extension_gae("cpp")), ("cuda", _extension_gae("cuda"))
    )
)
