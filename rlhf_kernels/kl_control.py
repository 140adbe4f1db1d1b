"""KL coefficient controllers (Ziegler et al., 2019, "Fine-Tuning Language Models from Human Preferences").

The coefficient β of the KL penalty in :func:`rlhf_kernels.token_level_rewards` (or of a
:func:`rlhf_kernels.kl_loss` term; see docs/kl.md) either stays fixed or adapts so that the measured KL
tracks a target:

    e = clip(KL / target − 1, −0.2, 0.2),   β ← β·(1 + e·n_steps / horizon)

Controllers live on the host: ``update`` takes the measured KL as a Python float or a 0-dim tensor (a
tensor is read with ``float()``, i.e. one host synchronisation: call it where the step logs metrics).
"""

from __future__ import annotations

import torch

from ._validation import check_int, check_positive, check_real


def _measured_kl(current_kl: float | torch.Tensor) -> float:
    if isinstance(current_kl, torch.Tensor):
        if current_kl.numel() != 1:
            raise ValueError(
                f"current_kl must be a number or a one-element tensor; got shape {tuple(current_kl.shape)}"
            )
        return float(current_kl.detach().reshape(()).item())  # host sync (documented)
    return check_real("current_kl", current_kl)


class FixedKLController:
    """β stays ``kl_coef``; ``update`` does nothing (so trainers can call it unconditionally)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = check_real("kl_coef", kl_coef)
        if self.value < 0:
            raise ValueError(f"kl_coef must be >= 0; got {self.value}")

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        check_int("n_steps", n_steps)

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Proportional control of β towards a target KL over a horizon (in samples).

    ``update(current_kl, n_steps)``: e = clip(current_kl / target − 1, −0.2, 0.2),
    β ← β·(1 + e·n_steps / horizon).  ``value`` holds β as a Python float.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = check_real("init_kl_coef", init_kl_coef)
        if self.value < 0:
            raise ValueError(f"init_kl_coef must be >= 0; got {self.value}")
        self.target = check_positive("target", target)
        self.horizon = check_positive("horizon", horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        n_steps = check_int("n_steps", n_steps)
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0; got {n_steps}")
        error = min(max(_measured_kl(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"
