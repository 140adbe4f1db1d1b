"""What a run leaves behind: ``metrics.jsonl``, ``ppo.png``, ``summary.json`` (and TensorBoard events)."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

import rlhf_kernels
from rlhf_kernels import _dispatch

# The library ops the trainer's hot path calls, with the kernel family each belongs to (the name the ops
# module registers with rlhf_kernels._dispatch; one module can hold several families).
HOT_PATH_OPS = {
    "logprobs_from_logits": "logprobs",
    "linear_logprobs": "linear_logprobs",
    "kl_penalty": "kl",
    "token_level_rewards": "token_rewards",
    "compute_gae": "gae",
    "masked_whiten": "whiten",
    "ppo_policy_loss": "ppo_losses",
    "ppo_value_loss": "ppo_losses",
    "kl_loss": "ppo_losses",
    "pairwise_reward_loss": "reward_losses",
    "ranking_reward_loss": "reward_losses",
}


def op_backends(device: torch.device) -> dict[str, str]:
    """{op name: the backend ``rlhf_kernels.backend_for(family, device)`` picks for it}."""
    out = {}
    for name, family in HOT_PATH_OPS.items():
        fn = getattr(rlhf_kernels, name, None)
        if fn is None:
            out[name] = "missing"
            continue
        if family not in _dispatch._AUTO:  # a renamed family: fall back to the module's own FAMILY
            family = getattr(inspect.getmodule(fn), "FAMILY", family)
        out[name] = rlhf_kernels.backend_for(family, device)
    return out


class MetricsLog:
    """One JSON object per line: ``{"stage": ..., "step": ..., <metric>: <number>, ...}``."""

    def __init__(self, path: str | Path, enabled: bool, tensorboard: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; metrics go to metrics.jsonl only")

    def start(self, keep: Callable[[dict], bool] | None) -> None:
        """Begin a run: a fresh file, or (resuming) the records ``keep`` accepts from the old one, so that
        a resumed run's file equals the uninterrupted run's."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if keep(r)] if keep and self.path.exists() else []
        with open(self.path, "w") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step",):
                    self.writer.add_scalar(f"{record['stage']}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(obj: dict, path: str | Path) -> Path:
    """Written to a temporary file, then moved into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
