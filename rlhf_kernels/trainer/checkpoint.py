"""Atomic checkpoints that resume bit-for-bit.

A checkpoint is one ``torch.save`` of plain containers and tensors (model and optimizer state dicts,
RNG states, the KL controller's state, the step), written to a temporary file in the same folder,
flushed to disk, then moved over the old one with ``os.replace``: a crash at any point leaves either the
old or the new checkpoint, never half of one.  Loading uses ``torch.load(weights_only=True)``.

Files under ``<out_dir>/checkpoints/``: ``sft.pt`` (the SFT policy: PPO's starting point and frozen
reference), ``rm.pt`` (the reward model(s), their score normalisation and the pre-PPO evaluations),
``ppo.pt`` (the latest PPO step).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    return torch.load(Path(path), map_location=device, weights_only=True)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random stream the trainer draws from: torch's global (CPU and CUDA), Python's, and the
    trainer's own generators."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": {name: gen.get_state() for name, gen in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for name, gen in generators.items():
        gen.set_state(state["generators"][name].cpu())


def _as_tuple(value):
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def kl_controller_state(controller) -> dict:
    """The controller's attributes (its coefficient and, for the adaptive one, target and horizon)."""
    if hasattr(controller, "state_dict"):
        return {"state_dict": controller.state_dict()}
    return {"attrs": {k: v for k, v in vars(controller).items() if isinstance(v, int | float | str | bool)}}


def restore_kl_controller(controller, state: dict) -> None:
    if "state_dict" in state:
        controller.load_state_dict(state["state_dict"])
    else:
        for key, value in state["attrs"].items():
            setattr(controller, key, value)
