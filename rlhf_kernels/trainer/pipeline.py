"""The whole run: SFT → reward model(s) → evaluations of SFT and best-of-N → PPO → final evaluation.

Before any work or any write, :func:`train` checks the flags (``config.py``), the device and process
layout (``runtime.plan_runtime``) and the output folder (``rundir.plan_run``: whose run it holds, what
``--resume`` continues from).
"""

from __future__ import annotations

import copy
import gc
import os
import time

import torch
import torch.distributed as dist

import rlhf_kernels

from . import checkpoint, hf, rundir
from .algos import final_evaluation, make_trainer, models_in_memory
from .config import GPU_PRESETS, TrainConfig
from .model import ATTENTION_USED, PolicyValueModel
from .ppo import best_of_n, evaluate_policy, frozen_copy
from .report import MetricsLog, op_backends, plot_ppo, read_metrics, write_json
from .reward import ensemble_from_state, ensemble_state, train_reward_models
from .runtime import (
    Interrupted,
    Runtime,
    estimate_cpu_seconds,
    plan_runtime,
    shutdown_runtime,
    start_runtime,
)
from .sft import train_sft
from .task import LabelerTask

STAGE_ORDER = {stage: i for i, stage in enumerate(checkpoint.STAGES)}


def _keep_records(resume_stage: str | None, ppo_step: int):
    """Which metrics records a resumed run keeps (those its checkpoints already cover)."""
    if resume_stage is None:
        return None

    def keep(record: dict) -> bool:
        stage = record.get("stage", "")
        kind = (
            "ppo" if stage == "ppo" else "sft" if stage == "sft" else "rm" if stage.startswith("rm_") else ""
        )
        if kind == "ppo":
            return resume_stage == "ppo" and record["step"] <= ppo_step
        return kind != "" and STAGE_ORDER[kind] <= STAGE_ORDER[resume_stage]

    return keep


def train(cfg: TrainConfig, *, process_started: float | None = None) -> dict:
    """Runs the pipeline; returns the summary (also written to ``<out_dir>/summary.json`` by rank 0).

    Raises, before any work: :class:`~.config.ConfigError` (a flag out of range, a device or dtype this
    machine cannot use), :class:`~.checkpoint.RunDirError` (the output folder holds another run, or a
    corrupt checkpoint).  Ctrl-C raises :class:`~.runtime.Interrupted` (where it stopped)."""
    started = time.perf_counter()
    cfg.validate()
    rt = plan_runtime(cfg)
    hf_setup = hf.HFSetup(cfg) if cfg.model else None  # --model: loads and checks all it needs first
    plan = rundir.plan_run(cfg, rt.device.type, rt.world)
    if plan.complete is not None:
        rt.print(plan.note)
        return plan.complete
    try:
        start_runtime(rt)
        return _train(rt, cfg, plan, started, process_started, hf_setup)
    except KeyboardInterrupt:
        raise Interrupted(rt.where(), rt.last_checkpoint) from None
    finally:
        shutdown_runtime(rt)


def _train(
    rt: Runtime,
    cfg: TrainConfig,
    plan: rundir.RunPlan,
    started: float,
    process_started: float | None,
    hf_setup: hf.HFSetup | None = None,
) -> dict:
    out = plan.out
    paths = checkpoint.checkpoint_paths(out)
    states, resume_stage = plan.states, plan.resume_stage
    ids: dict[str, str] = {}  # this run's checkpoint ids, for the lineage of the next ones

    def save(stage: str, state: dict) -> str:
        parents = {parent: ids[parent] for parent in rundir.PARENTS[stage]}
        stamped = checkpoint.stamp(state, stage, plan.identity, parents)
        step = f" at PPO step {state['step']}" if stage == "ppo" else ""
        checkpoint.save_atomic(stamped, paths[stage], what=f"{stage}.pt{step}")
        ids[stage] = stamped["run"]["id"]
        rt.last_checkpoint = str(paths[stage])
        return rt.last_checkpoint

    log = MetricsLog(out / "metrics.jsonl", rt.is_main, cfg.tensorboard)
    if rt.is_main:
        rundir.prepare(plan)
        log.start(_keep_records(resume_stage, states["ppo"]["step"] if "ppo" in states else -1))
    rt.barrier()
    for stage, state in states.items():
        ids[stage] = state["run"]["id"]
        rt.last_checkpoint = str(paths[stage])
    if plan.note:
        rt.print(plan.note)
    rt.print(
        f"rlhf-kernels trainer: preset {cfg.preset}, device {rt.device}, {rt.world} process(es), "
        f"model {cfg.model or f'{cfg.n_layer}x{cfg.d_model}, vocab {cfg.vocab_size}'}, out {out}"
    )
    if rt.device.type == "cpu" and cfg.preset in GPU_PRESETS:
        minutes = estimate_cpu_seconds(cfg) / 60
        rt.print(
            f"note: preset {cfg.preset} is sized for a GPU; on this CPU the run will take about "
            f"{minutes:.0f} minutes (a rough estimate from one timed training step)"
        )

    _warm_up_ops(rt)
    if hf_setup is not None:  # --model: no SFT or reward-model stage (hf.py)
        return hf.run(rt, cfg, hf_setup, plan, save, log, started, process_started)
    task = LabelerTask(cfg)
    torch.manual_seed(cfg.seed)
    model = PolicyValueModel(cfg).to(rt.device)
    rt.print(
        f"parameters: {sum(p.numel() for p in model.parameters()):,} (one backbone, lm_head + value_head)"
    )
    results: dict = {}

    # --- stage 1: SFT ---------------------------------------------------------------------------------
    if "sft" in states:
        model.load_state_dict(states["sft"]["model"])
        results.update(states["sft"]["results"])
    else:
        results.update(train_sft(rt, cfg, model, task, log))
        if rt.is_main:
            save("sft", {"model": model.state_dict(), "results": results})
        rt.barrier()
    model.eval()
    ref = frozen_copy(model)

    # --- stage 2: reward models, then the pre-PPO evaluations ---------------------------------------
    if "rm" in states:
        ensemble = ensemble_from_state(states["rm"]["ensemble"], cfg, rt.device)
        results.update(states["rm"]["results"])
    else:
        ensemble, rm_results = train_reward_models(rt, cfg, model, task, log)
        results.update(rm_results)
        rt.at("evaluation of the SFT policy")
        with rt.timed("eval_sft"):
            sft_eval = evaluate_policy(rt, cfg, task, model, ref, ensemble, seed_offset=0)
        checkpoint.crash_point("SFT policy evaluated")
        rt.at(f"best-of-{cfg.best_of_n}")
        with rt.timed("best_of_n"):
            results.update(best_of_n(rt, cfg, task, model, ensemble))
        checkpoint.crash_point("best-of-N evaluated")
        results.update({"sft_gold": sft_eval["gold"], "sft_eval": sft_eval})
        if rt.is_main:
            save("rm", {"ensemble": ensemble_state(ensemble), "results": results})
        rt.barrier()
    rt.print(
        f"reward ensemble held-out pairwise accuracy {results['rm_heldout_accuracy']:.3f}; "
        f"SFT gold {results['sft_gold']:.3f}; best-of-{cfg.best_of_n} gold {results['best_of_n_gold']:.3f}"
    )

    # --- stage 3: PPO -----------------------------------------------------------------------------------
    # A fresh copy: its parameters carry no gradient hooks of the SFT stage's DistributedDataParallel.
    policy = copy.deepcopy(model)
    del model
    gc.collect()
    trainer = make_trainer(rt, cfg, policy, ref, ensemble, task, log, lambda state: save("ppo", state))
    if trainer is not None and "ppo" in states:
        trainer.load(states["ppo"], str(paths["ppo"]))
    ppo_started = time.perf_counter()
    if trainer is not None:
        trainer.run()
    ppo_wall = time.perf_counter() - ppo_started

    rt.at(f"evaluation of the {cfg.algo} policy")
    with rt.timed("eval_ppo"):
        ppo_eval = final_evaluation(rt, cfg, task, policy, ref, ensemble, results)
    checkpoint.crash_point("PPO policy evaluated")
    ddp = _ddp_consistency(rt, policy)
    wall = time.perf_counter() - started
    ppo_tokens = trainer.tokens - (states["ppo"]["tokens"] if "ppo" in states else 0) if trainer else 0
    summary = {
        "algo": cfg.algo,
        "sft_gold": results["sft_gold"],
        "ppo_gold": ppo_eval["gold"],
        "best_of_n_gold": results["best_of_n_gold"],
        "rm_heldout_accuracy": results["rm_heldout_accuracy"],
        "final_kl": ppo_eval["kl"],
        "tokens_per_s": ppo_tokens / max(ppo_wall, 1e-9),
        "wall_s": wall,
        "backends": {**op_backends(rt.device), "attention": sorted(ATTENTION_USED)},
        "gold_gain": ppo_eval["gold"] - results["sft_gold"],
        "targets": {
            "gold_gain>=0.25": ppo_eval["gold"] - results["sft_gold"] >= 0.25,
            "rm_heldout_accuracy>=0.85": results["rm_heldout_accuracy"] >= 0.85,
        },
        "sft_eval": results["sft_eval"],
        "ppo_eval": ppo_eval,
        "demo_gold": results["demo_gold"],
        "best_of_n": cfg.best_of_n,
        "best_of_n_oracle_gold": results["best_of_n_oracle_gold"],
        "rm_heldout_label_accuracy": results["rm_heldout_label_accuracy"],
        "reward_models": results["reward_models"],
        "ppo_steps": cfg.ppo_steps,
        "stage3_s": ppo_wall,
        "gen_tokens": trainer.gen_tokens if trainer else results.get("best_of_n_gen_tokens", 0),
        "models_in_memory": models_in_memory(cfg, len(ensemble.models)),
        "resumed_from": resume_stage,
        "timings_s": {k: round(v, 3) for k, v in sorted(rt.timings.items())},
        "startup_s": None if process_started is None else round(started - process_started, 3),
        "device": str(rt.device),
        "cpu_count": os.cpu_count(),
        "world_size": rt.world,
        "ddp": ddp,
        "torch": torch.__version__,
        "preset": cfg.preset,
        "seed": cfg.seed,
    }
    if rt.is_main:
        write_json(summary, out / "summary.json")
        if cfg.plot:
            plot = plot_ppo(
                read_metrics(out / "metrics.jsonl"),
                out / "ppo.png",
                {"SFT": summary["sft_gold"], f"best-of-{cfg.best_of_n}": summary["best_of_n_gold"]},
            )
            if plot:
                rt.print(f"plot: {plot}")
        log.close()
        _print_summary(rt, summary, out)
    return summary


def _warm_up_ops(rt: Runtime) -> None:
    """Calls the ops that may build an extension on first use (the C++ GAE kernel is compiled just in
    time, once per machine), so that the build is reported apart and not inside a PPO step."""
    rt.at("the first use of the library's extensions")
    started = time.perf_counter()
    with rt.timed("warm_up"):
        rewards = torch.ones(1, 2, device=rt.device)
        rlhf_kernels.compute_gae(rewards, rewards, torch.ones_like(rewards), 1.0, 1.0)
    elapsed = time.perf_counter() - started
    if elapsed > 2.0:
        rt.print(f"first use of the library's extensions (a one-time build) took {elapsed:.0f} s")


def _ddp_consistency(rt: Runtime, model: PolicyValueModel) -> dict | None:
    """With several processes: the largest difference of any policy weight between ranks (0 in sync)."""
    if not rt.distributed:
        return None
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(rt.world)]
    dist.all_gather(gathered, flat)
    diff = torch.stack([(g - gathered[0]).abs().max() for g in gathered]).max().item()  # host sync: once
    return {"world_size": rt.world, "max_param_diff": diff, "in_sync": diff == 0.0}


def _print_summary(rt: Runtime, s: dict, out) -> None:
    rt.print(
        f"\nSFT gold {s['sft_gold']:.3f} → {s['algo']} gold {s['ppo_gold']:.3f} "
        f"(gain {s['gold_gain']:+.3f}); "
        f"best-of-{s['best_of_n']} gold {s['best_of_n_gold']:.3f}; "
        f"reward-model held-out accuracy {s['rm_heldout_accuracy']:.3f}; final KL {s['final_kl']:.3f} nats\n"
        f"PPO throughput {s['tokens_per_s']:.0f} tokens/s; wall {s['wall_s']:.1f} s; "
        f"time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timings_s"].items()) + "\n"
        "backends: " + ", ".join(f"{k}={v}" for k, v in s["backends"].items()) + "\n"
        f"summary: {out / 'summary.json'}"
    )
