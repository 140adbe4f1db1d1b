"""Atomic checkpoints that carry their run's identity and resume bit-for-bit.

A checkpoint is one ``torch.save`` of plain containers and tensors (model and optimizer state dicts,
RNG states, the KL controller's state, the step), written to a temporary file in the same folder,
flushed to disk, then moved over the old one with ``os.replace``: a crash at any point leaves either the
old or the new checkpoint, never half of one.  Loading uses ``torch.load(weights_only=True)``; a file
that does not load is reported by name with what to do (:class:`CheckpointError`).

Every checkpoint also holds ``run``: ``identity`` (the config fields that shape the run, the seed, the
device type and process count), a random ``id``, and ``parents`` (the ids of the checkpoints it was built
from), so that ``--resume`` can refuse a directory that mixes runs (see ``rundir.py``).

Files under ``<out_dir>/checkpoints/``: ``sft.pt`` (the SFT policy: PPO's starting point and frozen
reference), ``rm.pt`` (the reward model(s), their score normalisation and the pre-PPO evaluations),
``ppo.pt`` (the latest PPO step).
"""

from __future__ import annotations

import os
import random
import signal
import uuid
from pathlib import Path

import torch

FORMAT = 1
STAGES = ("sft", "rm", "ppo")
# What each stage's checkpoint must hold besides ``stage``, ``format`` and ``run``.
PAYLOAD = {
    "sft": ("model", "results"),
    "rm": ("ensemble", "results"),
    "ppo": ("step", "policy", "optimizer", "kl_ctl", "rng", "tokens", "world"),
}
# What to do when a stage's checkpoint is unusable: the later ones were built from it.
REDO = {
    "sft": "delete it and the later checkpoints (rm.pt, ppo.pt), then rerun with --resume (SFT is redone)",
    "rm": "delete it and ppo.pt, then rerun with --resume (the reward models are retrained from sft.pt)",
    "ppo": "delete it and rerun with --resume (PPO restarts from rm.pt)",
}


class RunDirError(RuntimeError):
    """The output folder cannot be used as asked (another run's files, a corrupt checkpoint, ...)."""


class CheckpointError(RunDirError):
    """A checkpoint file that does not load, or is not one of this trainer's."""


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    return {stage: checkpoint_dir(out_dir) / f"{stage}.pt" for stage in STAGES}


def stamp(state: dict, stage: str, identity: dict, parents: dict[str, str]) -> dict:
    """``state`` as stage ``stage``'s checkpoint of the run ``identity``, built from ``parents``."""
    run = {"id": uuid.uuid4().hex, "identity": identity, "parents": dict(parents)}
    return {**state, "format": FORMAT, "stage": stage, "run": run}


def save_atomic(state: dict, path: str | os.PathLike, what: str = "") -> Path:
    """``what`` names the write for the crash-point test hook (default: the file name)."""
    path = Path(path)
    what = what or path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)  # host sync: the tensors are copied to the host
            handle.flush()
            os.fsync(handle.fileno())
        crash_point(f"{what} written, not yet in place")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    crash_point(f"{what} saved")
    return path


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """A checkpoint of this trainer, or :class:`CheckpointError` naming the file and what to do."""
    path = Path(path)
    stage = path.stem if path.stem in STAGES else None
    advice = REDO[stage] if stage else "delete it"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror})") from None
    except Exception as exc:  # the message of torch's loader would give the wrong advice for a bad file
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(exc).__name__} reading {size} bytes): "
            f"{advice}, or start over with --overwrite"
        ) from None
    expected = ("format", "stage", "run", *PAYLOAD.get(stage, ()))
    missing = [key for key in expected if key not in state] if isinstance(state, dict) else list(expected)
    if missing or (stage and state["stage"] != stage):
        raise CheckpointError(
            f"{path} is not a {stage or ''} checkpoint of this version of the trainer (it lacks "
            f"{', '.join(missing) or 'stage ' + repr(stage)}): {advice}, or start over with --overwrite"
        )
    return state


# ---------------------------------------------------------------------------------------------------
# Random streams and the KL controller
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Test hook: a real signal at a named point (tests/test_trainer.py kills every stage this way)
# ---------------------------------------------------------------------------------------------------
# RLHF_TRAINER_CRASH_AT=NAME sends RLHF_TRAINER_CRASH_SIGNAL (default KILL; INT is Ctrl-C) to this
# process at the first crash point called NAME; RLHF_TRAINER_CRASH_TRACE=FILE appends every point's name.
_CRASH_AT = os.environ.get("RLHF_TRAINER_CRASH_AT", "")
_CRASH_SIGNAL = getattr(signal, "SIG" + os.environ.get("RLHF_TRAINER_CRASH_SIGNAL", "KILL"))
_CRASH_TRACE = os.environ.get("RLHF_TRAINER_CRASH_TRACE", "")


def crash_point(name: str) -> None:
    if _CRASH_TRACE:
        with open(_CRASH_TRACE, "a") as handle:
            handle.write(name + "\n")
    if name == _CRASH_AT:
        os.kill(os.getpid(), _CRASH_SIGNAL)
