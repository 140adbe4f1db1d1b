"""What a run leaves behind: ``metrics.jsonl``, ``ppo.png``, ``summary.json`` (and TensorBoard events)."""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

import rlhf_kernels

from .checkpoint import crash_point

# The library ops the trainer's hot path calls; each one's kernel family is its ops module's FAMILY.
HOT_PATH_OPS = (
    "logprobs_from_logits",
    "linear_logprobs",
    "kl_penalty",
    "token_level_rewards",
    "compute_gae",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "kl_loss",
    "pairwise_reward_loss",
    "ranking_reward_loss",
)


def op_family(name: str) -> str:
    """The kernel family of the public op ``rlhf_kernels.<name>``: ``FAMILY`` of the module defining it."""
    return importlib.import_module(getattr(rlhf_kernels, name).__module__).FAMILY


def op_backends(device: torch.device) -> dict[str, str]:
    """{op name: the backend ``rlhf_kernels.backend_for(family, device)`` picks for it}."""
    return {name: rlhf_kernels.backend_for(op_family(name), device) for name in HOT_PATH_OPS}


class MetricsLog:
    """One JSON object per line: ``{"stage": ..., "step": ..., <metric>: <number>, ...}``."""

    def __init__(self, path: str | Path, enabled: bool, tensorboard: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.writer = None

    def start(self, keep: Callable[[dict], bool] | None) -> None:
        """Begin a run: a fresh file, or (resuming) the records ``keep`` accepts from the old one, so that
        a resumed run's file equals the uninterrupted run's.  Written atomically."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.path) if keep(r)] if keep and self.path.exists() else []
        write_atomic("".join(json.dumps(record) + "\n" for record in kept), self.path)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        crash_point(f"{record['stage']} step {record['step']} logged")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step",):
                    self.writer.add_scalar(f"{record['stage']}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a last line cut short by a crash is dropped."""
    records = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if line.endswith("\n"):  # a damaged line in the middle is not a crash's doing
                        raise
    return records


PLOTTED = (
    ("score", "reward-model score"),
    ("seq_kl", "KL(π‖π_ref) per response, nats"),
    ("gold", "gold score"),
    ("vf_loss", "value loss"),
    ("clipfrac", "clip fraction"),
)


def plot_ppo(records: list[dict], path: str | Path, reference_lines: dict | None = None) -> Path | None:
    """A PNG of reward, KL, gold score, value loss and clip fraction over PPO steps (None without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot")
        return None
    ppo = [r for r in records if r.get("stage") == "ppo"]
    if not ppo:
        return None
    steps = [r["step"] for r in ppo]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, PLOTTED):
        ax.plot(steps, [r.get(key, math.nan) for r in ppo], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        if key == "gold" and reference_lines:
            for label, value in reference_lines.items():
                if value is not None:
                    ax.axhline(
                        value,
                        ls="--",
                        lw=1,
                        color={"SFT": "gray"}.get(label, "tab:green"),
                        label=f"{label} {value:.2f}",
                    )
            ax.legend(fontsize=8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_atomic(text: str, path: str | Path) -> Path:
    """Written to a temporary file, flushed to disk, then moved into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    crash_point(f"{path.name} written, not yet in place")
    os.replace(tmp, path)
    return path


def write_json(obj: dict, path: str | Path) -> Path:
    return write_atomic(json.dumps(obj, indent=2) + "\n", path)
