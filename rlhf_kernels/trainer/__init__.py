"""A minimal end-to-end RLHF trainer (SFT → reward model → PPO) built on the library's ops.

    python -m rlhf_kernels.trainer                      # the default `tiny` preset, a few minutes on CPU
    rlhf-kernels train --preset micro --ppo_steps 8     # any config field is a flag
    torchrun --nproc_per_node 2 -m rlhf_kernels.trainer  # DistributedDataParallel (gloo on CPU)

See docs/trainer.md.
"""

from __future__ import annotations

import sys

from .config import PRESETS, TrainConfig, config_from_args, make_config
from .pipeline import train
from .runtime import NonFiniteError

__all__ = ["PRESETS", "NonFiniteError", "TrainConfig", "main", "make_config", "train"]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    cfg = config_from_args(argv, prog)
    try:
        summary = train(cfg)
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary else 1
