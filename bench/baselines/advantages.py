"""The advantage idioms' old import path: GAE is ``gae.py``, whitening ``whiten.py``, KL reward shaping
``token_rewards.py`` (tests and ``bench/bench_overhead.py`` import these names from here)."""

from __future__ import annotations

from .gae import openrlhf_get_advantages_and_returns, verl_compute_gae_advantage_return, verl_gae
from .token_rewards import verl_token_level_rewards
from .whiten import openrlhf_normalize

__all__ = [
    "openrlhf_get_advantages_and_returns",
    "openrlhf_normalize",
    "verl_compute_gae_advantage_return",
    "verl_gae",
    "verl_token_level_rewards",
]
