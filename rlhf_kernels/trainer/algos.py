"""Stage 3's algorithms: one registry, name → algorithm, with the checks each one makes of the flags.

Every algorithm starts from the same SFT checkpoint, uses the same reward models (or, for the preference
family, the same preference data they were trained on) and is evaluated by the same gold score; each
writes ``checkpoints/ppo.pt`` (stage 3's checkpoint, whatever the algorithm) and resumes like PPO.

========================  =============  =====================================================================
name                      module         what it trains on
========================  =============  =====================================================================
ppo                       ppo.py         one sample per prompt, GAE on the shared value head
grpo, rloo, remax,        critic_free.py ``group_size`` samples per prompt, ``compute_advantages(<name>)``,
reinforce_plus_plus                      ``--policy_loss``; no value head, no value optimiser state
reinforce                 critic_free.py one sample per prompt, s − b with b a moving average of the score
rrhf                      rrhf.py        ``group_size`` samples + the SFT demonstration, ranked by the reward
                                         models: ranking_hinge_loss + NLL of the best; no reference
dpo, simpo, orpo, kto     preference.py  the reward models' preference data, reference = SFT (dpo, kto)
best_of_n                 (pipeline)     no training: best-of-N sampling from the SFT policy
========================  =============  =====================================================================
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str  # "ppo" | "critic_free" | "rrhf" | "preference" | "best_of_n"
    estimator: str | None  # the advantage estimator --adv_estimator auto means (None: none / its own)
    grouped: bool  # samples group_size responses per prompt
    uses_reference: bool  # the frozen SFT model takes part in training (KL penalty or loss)
    what: str


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ppo", "ppo", "gae", False, True, "PPO with a value head on the policy's backbone"),
        Algorithm(
            "grpo",
            "critic_free",
            "grpo",
            True,
            True,
            "group-normalised advantages (Dr. GRPO: --norm_adv_by_std false)",
        ),
        Algorithm("rloo", "critic_free", "rloo", True, True, "leave-one-out baseline"),
        Algorithm("remax", "critic_free", "remax", True, True, "the greedy response's reward as baseline"),
        Algorithm(
            "reinforce_plus_plus",
            "critic_free",
            "reinforce_plus_plus",
            True,
            True,
            "discounted returns whitened over the batch",
        ),
        Algorithm("reinforce", "critic_free", None, False, True, "REINFORCE with a moving-average baseline"),
        Algorithm("rrhf", "rrhf", None, True, False, "ranking hinge over length-normalised log-probs + NLL"),
        Algorithm("dpo", "preference", None, False, True, "DPO (--dpo_loss_type) on the preference data"),
        Algorithm("simpo", "preference", None, False, False, "SimPO on the preference data (no reference)"),
        Algorithm("orpo", "preference", None, False, False, "ORPO on the preference data (no reference)"),
        Algorithm("kto", "preference", None, False, True, "KTO: chosen desirable, rejected undesirable"),
        Algorithm("best_of_n", "best_of_n", None, False, False, "best-of-N sampling from SFT, no training"),
    )
}

# Estimators whose inputs the trainer does not produce.
UNSUPPORTED_ESTIMATORS = {"gae": "a value head (use --algo ppo)"}
# Estimators that read Σ_v π(v)² per token: the rollout's old-log-prob forward computes it in the same pass.
SUM_PI_SQUARED_ESTIMATORS = ("optimal_token_baseline", "tir_optimal_token_baseline")
# What the trainer passes to a policy loss; a loss needing any other keyword cannot run here.
OFFERED_LOSS_KWARGS = ("clip_low", "clip_high", "dual_clip", "is_weights", "loss_agg", "normalizer")


def estimator_of(cfg: TrainConfig) -> str | None:
    algo = ALGORITHMS[cfg.algo]
    return algo.estimator if cfg.adv_estimator == "auto" else cfg.adv_estimator


def is_group_normalised(estimator: str) -> bool:
    """Estimators over a uid index: their baseline (and scale) come from a prompt's other samples."""
    import rlhf_kernels

    return "index" in inspect.signature(rlhf_kernels.ADVANTAGE_ESTIMATORS[estimator]).parameters


def samples_per_prompt(cfg: TrainConfig) -> int:
    algo = ALGORITHMS[cfg.algo]
    return cfg.group_size if algo.grouped else 1


def models_in_memory(cfg: TrainConfig, n_reward_models: int) -> dict[str, int]:
    """The models stage 3 holds while it trains (the frozen SFT copy every evaluation uses aside)."""
    algo = ALGORITHMS[cfg.algo]
    needs_rm = algo.family in ("ppo", "critic_free", "rrhf", "best_of_n")
    return {
        "policy": 1,  # PPO's value head shares the policy's backbone: no separate critic
        "reference": int(algo.uses_reference),
        "reward_models": n_reward_models if needs_rm else 0,
    }


def algorithm_problems(cfg: TrainConfig) -> list[str]:
    """One line per flag that does not fit ``--algo`` (config.problems() calls this after its range
    checks)."""
    algo = ALGORITHMS[cfg.algo]
    out = []
    estimator = estimator_of(cfg)
    sampled = algo.family in ("ppo", "critic_free")
    if algo.family == "ppo" and estimator != "gae":
        out.append(
            f"--adv_estimator {estimator} is for the critic-free algorithms: --algo ppo uses gae (its value "
            "head); pick --algo grpo, rloo, remax, reinforce_plus_plus or reinforce"
        )
    elif algo.family == "critic_free" and cfg.algo == "reinforce" and cfg.adv_estimator != "auto":
        out.append(
            f"--algo reinforce uses its moving-average baseline: --adv_estimator must be auto; got "
            f"{cfg.adv_estimator}"
        )
    elif algo.family == "critic_free" and estimator in UNSUPPORTED_ESTIMATORS:
        out.append(f"--adv_estimator {estimator} needs {UNSUPPORTED_ESTIMATORS[estimator]}")
    elif algo.family == "critic_free" and estimator is not None:
        if is_group_normalised(estimator) and cfg.group_size < 2:
            out.append(
                f"--group_size {cfg.group_size} leaves --adv_estimator {estimator} a group of one sample per "
                "prompt (its baseline is the prompt's other samples): --group_size must be >= 2"
            )
    elif not sampled and cfg.adv_estimator != "auto":
        out.append(f"--adv_estimator applies to ppo and the critic-free algorithms, not --algo {cfg.algo}")
    if algo.grouped and cfg.rollout_batch % cfg.group_size:
        out.append(
            f"--rollout_batch {cfg.rollout_batch} must be a multiple of --group_size {cfg.group_size} "
            f"(--algo {cfg.algo} samples group_size responses per prompt)"
        )
    if not sampled:
        for flag, default in (("policy_loss", "auto"), ("rollout_is", "none"), ("rollout_rs", "none")):
            if getattr(cfg, flag) != default:
                out.append(f"--{flag} applies to ppo and the critic-free algorithms, not --algo {cfg.algo}")
    elif cfg.rollout_rs.endswith("k1") and cfg.rollout_rs_threshold <= 1:
        out.append(
            f"--rollout_rs {cfg.rollout_rs} keeps ratios in [1/u, u]: --rollout_rs_threshold must be > 1; "
            f"got {cfg.rollout_rs_threshold}"
        )
    if sampled and cfg.policy_loss not in ("auto", "bypass_mode"):
        from rlhf_kernels.ops.policy_losses import POLICY_LOSSES

        params = inspect.signature(POLICY_LOSSES[cfg.policy_loss]).parameters.values()
        missing = [
            p.name
            for p in params
            if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in OFFERED_LOSS_KWARGS
        ]
        if missing:
            out.append(
                f"--policy_loss {cfg.policy_loss} needs {', '.join(missing)}, which the trainer does not set"
            )
    if cfg.fused_loss:
        out += fused_loss_problems(cfg)
    return out


def fused_loss_problems(cfg: TrainConfig) -> list[str]:
    """What ``--fused_loss`` (``rlhf_kernels.linear_policy_loss``) cannot do with the other flags."""
    from rlhf_kernels.ops.linear_policy_loss import LINEAR_POLICY_LOSSES

    algo = ALGORITHMS[cfg.algo]
    if algo.family not in ("ppo", "critic_free"):
        return [f"--fused_loss applies to ppo and the critic-free algorithms, not --algo {cfg.algo}"]
    out = []
    name = cfg.policy_loss
    if name == "auto":
        name = {"ppo": "vanilla", "reinforce": "gpg"}.get(cfg.algo, "vanilla")
    if name not in LINEAR_POLICY_LOSSES:
        why = {
            "gspo": "its ratio is per sequence",
            "geo_mean": "its ratio is per sequence",
            "clip_cov": "it selects tokens over the whole batch first",
            "kl_cov": "it selects tokens over the whole batch first",
            "bypass_mode": "it computes its own weights from the generation's log-probs",
        }.get(name, "linear_policy_loss does not implement it")
        out.append(
            f"--fused_loss fuses the token-level losses {', '.join(LINEAR_POLICY_LOSSES)}; --policy_loss "
            f"{name} cannot be fused ({why})"
        )
    if cfg.fsdp:
        out.append("--fused_loss is not supported with --fsdp (untested: the lm_head weight is sharded)")
    return out


def make_trainer(rt, cfg: TrainConfig, policy, ref, reward, task, log, save_checkpoint):
    """Stage 3's trainer of ``--algo`` (None for best_of_n, which trains nothing)."""
    family = ALGORITHMS[cfg.algo].family
    if family == "best_of_n":
        return None
    if family == "ppo":
        from .ppo import PPOTrainer as cls
    elif family == "critic_free":
        from .critic_free import CriticFreeTrainer as cls
    elif family == "rrhf":
        from .rrhf import RRHFTrainer as cls
    else:
        from .preference import PreferenceTrainer as cls
    return cls(rt, cfg, policy, ref, reward, task, log, save_checkpoint)


def final_evaluation(rt, cfg: TrainConfig, task, policy, ref, reward, results: dict) -> dict:
    """The trained policy's evaluation (gold, reward score, KL to SFT, length), on the SFT evaluation's
    prompts; best_of_n reports its selection, with KL ≤ log N − (N − 1)/N (Beirami et al., 2024)."""
    from .ppo import evaluate_policy

    if ALGORITHMS[cfg.algo].family == "best_of_n":
        n = cfg.best_of_n
        return {
            "gold": results["best_of_n_gold"],
            "score": results.get("best_of_n_score"),
            "kl": math.log(n) - (n - 1) / n,
            "kl_is_bound": True,
        }
    return evaluate_policy(rt, cfg, task, policy, ref, reward, seed_offset=1)
