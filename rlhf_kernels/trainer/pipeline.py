"""The whole run: SFT → reward model(s) → evaluations of SFT and best-of-N → PPO → final evaluation."""

from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

import rlhf_kernels

from . import checkpoint
from .config import TrainConfig, config_dict
from .model import ATTENTION_USED, PolicyValueModel
from .ppo import PPOTrainer, best_of_n, evaluate_policy, frozen_copy
from .report import MetricsLog, op_backends, plot_ppo, read_metrics, write_json
from .reward import ensemble_from_state, ensemble_state, train_reward_models
from .runtime import Runtime, setup_runtime, shutdown_runtime
from .sft import train_sft
from .task import LabelerTask

REQUIRED_OPS = (
    "logprobs_from_logits",
    "compute_gae",
    "masked_whiten",
    "kl_penalty",
    "token_level_rewards",
    "AdaptiveKLController",
    "FixedKLController",
    "ppo_policy_loss",
    "ppo_value_loss",
    "pairwise_reward_loss",
    "ranking_reward_loss",
)
STAGE_ORDER = {"sft": 0, "rm": 1, "ppo": 2}


def missing_ops(cfg: TrainConfig) -> list[str]:
    needed = list(REQUIRED_OPS) + (["kl_loss"] if cfg.kl_loss_coef > 0 else [])
    return [name for name in needed if not hasattr(rlhf_kernels, name)]


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


def train(cfg: TrainConfig) -> dict:
    """Runs the pipeline; returns the summary (also written to ``<out_dir>/summary.json`` by rank 0)."""
    cfg.validate()
    absent = missing_ops(cfg)
    if absent:
        raise RuntimeError(
            f"the trainer needs rlhf_kernels.{', '.join(absent)}, which this build does not export"
        )
    started = time.perf_counter()
    rt = setup_runtime(cfg)
    try:
        return _train(rt, cfg, started)
    finally:
        shutdown_runtime(rt)


def _train(rt: Runtime, cfg: TrainConfig, started: float) -> dict:
    out = Path(cfg.out_dir)
    ckdir = checkpoint.checkpoint_dir(out)
    paths = {stage: ckdir / f"{stage}.pt" for stage in STAGE_ORDER}
    resume_stage = None
    if cfg.resume:
        resume_stage = next((s for s in ("ppo", "rm", "sft") if paths[s].exists()), None)
        rt.print(
            f"resuming from {paths[resume_stage]}" if resume_stage else "nothing to resume: starting afresh"
        )
    ppo_state = checkpoint.load(paths["ppo"], rt.device) if resume_stage == "ppo" else None

    task = LabelerTask(cfg)
    log = MetricsLog(out / "metrics.jsonl", rt.is_main, cfg.tensorboard)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log.start(_keep_records(resume_stage, ppo_state["step"] if ppo_state else -1))
        (out / "config.json").write_text(json.dumps(config_dict(cfg), indent=2) + "\n")
    rt.barrier()
    rt.print(
        f"rlhf-kernels trainer: preset {cfg.preset}, device {rt.device}, {rt.world} process(es), "
        f"model {cfg.n_layer}x{cfg.d_model}, vocab {cfg.vocab_size}, out {out}"
    )

    _warm_up_ops(rt)
    torch.manual_seed(cfg.seed)
    model = PolicyValueModel(cfg).to(rt.device)
    rt.print(
        f"parameters: {sum(p.numel() for p in model.parameters()):,} (one backbone, lm_head + value_head)"
    )
    results: dict = {}

    # --- stage 1: SFT ---------------------------------------------------------------------------------
    if resume_stage is not None:
        state = checkpoint.load(paths["sft"], rt.device)
        model.load_state_dict(state["model"])
        results.update(state["results"])
    else:
        results.update(train_sft(rt, cfg, model, task, log))
        if rt.is_main:
            checkpoint.save_atomic(
                {"stage": "sft", "model": model.state_dict(), "results": results}, paths["sft"]
            )
        rt.barrier()
    model.eval()
    ref = frozen_copy(model)

    # --- stage 2: reward models, then the pre-PPO evaluations ---------------------------------------
    if resume_stage in ("rm", "ppo"):
        state = checkpoint.load(paths["rm"], rt.device)
        ensemble = ensemble_from_state(state["ensemble"], cfg, rt.device)
        results.update(state["results"])
    else:
        ensemble, rm_results = train_reward_models(rt, cfg, model, task, log)
        results.update(rm_results)
        with rt.timed("eval_sft"):
            sft_eval = evaluate_policy(rt, cfg, task, model, ref, ensemble, seed_offset=0)
        with rt.timed("best_of_n"):
            results.update(best_of_n(rt, cfg, task, model, ensemble))
        results.update({"sft_gold": sft_eval["gold"], "sft_eval": sft_eval})
        if rt.is_main:
            checkpoint.save_atomic(
                {"stage": "rm", "ensemble": ensemble_state(ensemble), "results": results}, paths["rm"]
            )
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
    trainer = PPOTrainer(rt, cfg, policy, ref, ensemble, task, log, paths["ppo"])
    if ppo_state is not None:
        trainer.load(ppo_state)
    ppo_started = time.perf_counter()
    trainer.run()
    ppo_wall = time.perf_counter() - ppo_started

    with rt.timed("eval_ppo"):
        ppo_eval = evaluate_policy(rt, cfg, task, policy, ref, ensemble, seed_offset=1)
    ddp = _ddp_consistency(rt, policy)
    wall = time.perf_counter() - started
    ppo_tokens = trainer.tokens - (ppo_state["tokens"] if ppo_state else 0)
    summary = {
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
        "resumed_from": resume_stage,
        "timings_s": {k: round(v, 3) for k, v in sorted(rt.timings.items())},
        "device": str(rt.device),
        "world_size": rt.world,
        "ddp": ddp,
        "torch": torch.__version__,
        "preset": cfg.preset,
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
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    return {"world_size": rt.world, "max_param_diff": diff, "in_sync": diff == 0.0}


def _print_summary(rt: Runtime, s: dict, out: Path) -> None:
    rt.print(
        f"\nSFT gold {s['sft_gold']:.3f} → PPO gold {s['ppo_gold']:.3f} (gain {s['gold_gain']:+.3f}); "
        f"best-of-{s['best_of_n']} gold {s['best_of_n_gold']:.3f}; "
        f"reward-model held-out accuracy {s['rm_heldout_accuracy']:.3f}; final KL {s['final_kl']:.3f} nats\n"
        f"PPO throughput {s['tokens_per_s']:.0f} tokens/s; wall {s['wall_s']:.1f} s; "
        f"time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timings_s"].items()) + "\n"
        "backends: " + ", ".join(f"{k}={v}" for k, v in s["backends"].items()) + "\n"
        f"summary: {out / 'summary.json'}"
    )
