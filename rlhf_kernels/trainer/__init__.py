"""A minimal end-to-end RLHF trainer (SFT → reward model → PPO) built on the library's ops.

    python -m rlhf_kernels.trainer                      # the default `tiny` preset, about a minute on CPU
    rlhf-kernels train --preset micro --ppo_steps 8     # any config field is a flag
    torchrun --nproc_per_node 2 -m rlhf_kernels.trainer  # DistributedDataParallel (gloo on CPU)

See docs/trainer.md.
"""

from __future__ import annotations

from .checkpoint import CheckpointError, RunDirError
from .cli import main
from .config import PRESETS, ConfigError, TrainConfig, config_from_args, make_config
from .pipeline import train
from .runtime import Interrupted, NonFiniteError

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "Interrupted",
    "NonFiniteError",
    "RunDirError",
    "TrainConfig",
    "config_from_args",
    "main",
    "make_config",
    "train",
]
