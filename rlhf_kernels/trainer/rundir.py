"""The output folder: what a run finds in it, and whether the run may use it.

:func:`plan_run` only reads.  It refuses, before any file is touched:

- without ``--resume``, a folder that already holds a run's outputs: another run's (``--overwrite``
  replaces them), or this run's unfinished (``--resume`` continues it).  This run, finished, is left
  as it is (nothing to do: ``make demo`` twice does not redo or lose anything);
- with ``--resume``, checkpoints or a ``config.json`` of another run, naming the fields that differ (only
  :data:`RESUMABLE` may change), checkpoints whose lineage does not hold together (an ``rm.pt`` not
  built from the ``sft.pt`` beside it), a corrupt checkpoint (named, with what to do), and a
  ``--ppo_steps`` below what ``ppo.pt`` has done.

The run's identity is every config field except :data:`RESUMABLE` and :data:`NOT_IDENTITY`, plus the
device type and the process count; ``config.json`` and every checkpoint record it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from .checkpoint import REDO, STAGES, RunDirError, checkpoint_dir, checkpoint_paths, load
from .config import ConfigError, TrainConfig, config_dict

# May change between a run and its resumption: they extend the run (ppo_steps) or do not change what it
# computes.  (threads and profile may change the last bits of CPU and CUDA arithmetic.)
RESUMABLE = (
    "ppo_steps",
    "device",  # "auto" and "cpu" may name the same device; the device type itself is compared
    "threads",
    "progress",
    "plot",
    "tensorboard",
    "profile",
    "ckpt_every",
    "log_every",
    "inject_nan_at_step",
    "halt_after_step",
)
NOT_IDENTITY = ("out_dir", "resume", "overwrite")
# Flags only stage 3 reads: sft.pt and rm.pt do not depend on them, so those two checkpoints are checked
# against the rest of the identity (`compare` starts every algorithm from one SFT and one RM this way;
# a run's config.json is still compared whole).
STAGE3_ONLY = tuple(
    f.name
    for f in fields(TrainConfig)
    if f.metadata["section"] in ("algo", "ppo") and f.name not in ("max_grad_norm", "temperature", "top_k")
)
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "ppo.png", "tensorboard")
PARENTS = {"sft": (), "rm": ("sft",), "ppo": ("sft", "rm")}


@dataclass
class RunPlan:
    out: Path
    identity: dict
    record: dict  # what config.json holds
    resume_stage: str | None = None  # the latest checkpoint resumed from
    states: dict = field(default_factory=dict)  # the checkpoints resumed from, by stage (on the CPU)
    clear: list = field(default_factory=list)  # paths removed before the run writes anything
    note: str = ""
    complete: dict | None = None  # the summary of this very run, already finished: nothing to do


def config_record(cfg: TrainConfig, device_type: str, world: int) -> dict:
    return {**config_dict(cfg), "device_type": device_type, "world_size": world}


def identity_of(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in RESUMABLE and k not in NOT_IDENTITY}


def stage_identity(identity: dict, stage: str) -> dict:
    """What a ``stage`` checkpoint's identity must match: all of it for ppo.pt, all but
    :data:`STAGE3_ONLY` for sft.pt and rm.pt."""
    return identity if stage == "ppo" else {k: v for k, v in identity.items() if k not in STAGE3_ONLY}


def differences(theirs: dict, ours: dict, most: int = 6) -> str:
    """ "seed: 0 there, 7 here; ppo_lr: 0.0005 there, 0.002 here" (empty when equal)."""
    keys = [k for k in ours if theirs.get(k, _ABSENT) != ours[k]] + [k for k in theirs if k not in ours]
    parts = [f"{k}: {_show(theirs.get(k, _ABSENT))} there, {_show(ours.get(k, _ABSENT))} here" for k in keys]
    if len(parts) > most:
        parts = parts[:most] + [f"{len(parts) - most} more"]
    return "; ".join(parts)


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value) if isinstance(value, str) else str(value)


def check_out_dir(out: Path) -> None:
    """``--out_dir`` is, or can be created as, a writable folder (:class:`ConfigError` otherwise)."""
    if out.exists() and not out.is_dir():
        raise ConfigError([f"--out_dir {out} is not a folder"])
    target = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not target.is_dir():
        raise ConfigError([f"--out_dir {out} cannot be created: {target} is not a folder"])
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError([f"--out_dir {out} cannot be written: {target} is not writable"])


def plan_run(cfg: TrainConfig, device_type: str, world: int) -> RunPlan:
    out = Path(cfg.out_dir)
    check_out_dir(out)
    record = config_record(cfg, device_type, world)
    plan = RunPlan(out, identity_of(record), record)
    paths = checkpoint_paths(out)
    found = [p for p in (*(out / name for name in OUTPUTS), *paths.values()) if p.exists()]
    plan.clear = _leftovers(out)
    if not found:
        plan.note = "nothing to resume: starting afresh" if cfg.resume else ""
        return plan
    names = ", ".join(str(p.relative_to(out)) for p in found)
    if cfg.overwrite:
        plan.clear += found
        plan.note = f"--overwrite: removed the earlier run's outputs ({names})"
        return plan
    if cfg.resume:
        return _plan_resume(cfg, plan, paths, names)
    theirs = _recorded_identity(out, paths)
    if theirs is None:
        raise RunDirError(
            f"{out} holds outputs of an unknown run ({names}): pass --overwrite to replace them, "
            "or choose another --out_dir"
        )
    diff = differences(theirs, plan.identity)
    if diff:
        raise RunDirError(
            f"{out} holds another run's outputs (it differs in {diff}): pass --overwrite to replace "
            "them, or choose another --out_dir"
        )
    summary = _read_json(out / "summary.json")
    if summary is not None and summary.get("ppo_steps") == cfg.ppo_steps:
        plan.complete = summary
        plan.note = (
            f"{out} already holds this run, finished (summary.json): nothing to do; pass --overwrite to "
            "run it again"
        )
        return plan
    raise RunDirError(
        f"{out} already holds this run, unfinished ({names}): pass --resume to continue it, --overwrite "
        "to start over, or choose another --out_dir"
    )


def _plan_resume(cfg: TrainConfig, plan: RunPlan, paths: dict, names: str) -> RunPlan:
    may_change = f"only {', '.join(RESUMABLE)} may change on --resume"
    config_json = plan.out / "config.json"
    if config_json.exists():
        recorded = _read_identity(config_json)
        if recorded is None:
            raise RunDirError(f"{config_json} is unreadable: start over with --overwrite")
        diff = differences(recorded, plan.identity)
        if diff:
            raise RunDirError(
                f"{config_json} belongs to another run (it differs in {diff}; {may_change}): pass the "
                "same flags, --overwrite to start over, or choose another --out_dir"
            )
    states = {stage: load(path) for stage, path in paths.items() if path.exists()}
    if not states:
        if not config_json.exists():
            raise RunDirError(
                f"{plan.out} holds outputs of an unknown run ({names}) and no checkpoint: pass --overwrite "
                "to replace them, or choose another --out_dir"
            )
        plan.clear += [p for p in (plan.out / name for name in OUTPUTS) if p.exists()]
        plan.note = "nothing to resume (no checkpoint yet): starting afresh"
        return plan
    for stage, state in states.items():
        diff = differences(*(stage_identity(i, stage) for i in (state["run"]["identity"], plan.identity)))
        if diff:
            raise RunDirError(
                f"{paths[stage]} belongs to another run (it differs in {diff}; {may_change}): pass the same "
                "flags, --overwrite to start over, or choose another --out_dir"
            )
        for parent in PARENTS[stage]:
            if parent not in states:
                raise RunDirError(
                    f"{paths[stage]} was built from checkpoints/{parent}.pt, which is missing: "
                    "start over with --overwrite"
                )
            if state["run"]["parents"].get(parent) != states[parent]["run"]["id"]:
                raise RunDirError(
                    f"{paths[stage]} was not built from the {parent}.pt beside it (they come from different "
                    f"attempts): {REDO[stage]}, or start over with --overwrite"
                )
    if "ppo" in states and cfg.ppo_steps < states["ppo"]["step"] + 1:
        done = states["ppo"]["step"] + 1
        where = f"{paths['ppo']} has done {done}"
        raise ConfigError([f"--ppo_steps must be >= {done} on --resume ({where}); got {cfg.ppo_steps}"])
    plan.states = states
    plan.resume_stage = next(stage for stage in reversed(STAGES) if stage in states)
    plan.note = f"resuming from {paths[plan.resume_stage]}"
    return plan


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_identity(config_json: Path) -> dict | None:
    record = _read_json(config_json)
    return None if record is None else identity_of(record)


def _recorded_identity(out: Path, paths: dict) -> dict | None:
    """The identity ``config.json`` records, else the first loadable checkpoint's; None if unknown."""
    recorded = _read_identity(out / "config.json")
    if recorded is not None:
        return recorded
    for path in paths.values():
        try:
            return load(path)["run"]["identity"]
        except (OSError, RunDirError):
            continue
    return None


def _leftovers(out: Path) -> list[Path]:
    """Temporary files of an atomic write that a killed process left behind."""
    return [*checkpoint_dir(out).glob(".*.pt.tmp-*"), *out.glob(".*.tmp")] if out.is_dir() else []


def prepare(plan: RunPlan) -> None:
    """Clears what the plan says, creates the folder and writes ``config.json`` (rank 0, after the plan
    was accepted)."""
    from .report import write_json

    for path in reversed(plan.clear):  # checkpoints first (the latest stage first), config.json last
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    plan.out.mkdir(parents=True, exist_ok=True)
    write_json(plan.record, plan.out / "config.json")
