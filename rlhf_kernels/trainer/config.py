"""The trainer's one configuration object, its presets, and the command line built from it.

Every field of :class:`TrainConfig` is a flag (``--ppo_steps 40``, ``--fused_lm_head false``), described
by its ``help`` and checked against its ``allowed`` range before any work starts; a preset
(``--preset tiny|micro|small``) sets the defaults the flags then override.  ``tiny`` is the default: the
whole SFT → reward model → PPO pipeline on a 2-core CPU in about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """One or more flags are out of range; ``problems`` holds one line per flag."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid trainer config: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Allowed:
    """The values a field accepts: an interval (bounds optional, open or closed), plus ``also`` (e.g. 0 =
    off) and ``inf`` (+inf accepted, e.g. "no clipping"), or ``choices``.  NaN is never accepted."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()
    inf: bool = False
    choices: tuple | Callable[[], tuple] | None = None

    def options(self) -> tuple:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def accepts(self, value) -> bool:
        if self.choices is not None:
            return value in self.options()
        if value in self.also or (self.inf and value == math.inf):
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.options()))
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo}"
        else:
            text = f"{'<' if self.hi_open else '<='} {self.hi}"
        text = " or ".join([*map(str, self.also), text])
        return text + " or inf" if self.inf else text


AT_LEAST_0, AT_LEAST_1, POSITIVE = Allowed(0), Allowed(1), Allowed(0, lo_open=True)
UNIT, LEARNING_RATE = Allowed(0, 1), Allowed(0, 1, lo_open=True)
HOOK_STEP = Allowed(-1)


def _loss_agg_modes() -> tuple:
    import rlhf_kernels

    return tuple(rlhf_kernels.LOSS_AGG_MODES)


def _rejection_options() -> tuple:
    from rlhf_kernels.ops.rollout_correction import REJECTION_OPTIONS

    return ("none", *REJECTION_OPTIONS)


def _kl_estimators() -> tuple:
    import rlhf_kernels

    return tuple(rlhf_kernels.KL_ESTIMATORS)


def _presets() -> tuple:
    return tuple(PRESETS)


def _algorithms() -> tuple:
    from .algos import ALGORITHMS

    return tuple(ALGORITHMS)


def _adv_estimators() -> tuple:
    import rlhf_kernels

    return ("auto", *rlhf_kernels.ADVANTAGE_ESTIMATORS)


def _policy_losses() -> tuple:
    from rlhf_kernels.ops.policy_losses import POLICY_LOSSES

    return ("auto", *POLICY_LOSSES)


def _dpo_loss_types() -> tuple:
    from rlhf_kernels.ops.preference_losses import DPO_LOSS_TYPES

    return tuple(DPO_LOSS_TYPES)


def _opt(section: str, default, help: str, allowed: Allowed | None = None):
    return field(default=default, metadata={"section": section, "help": help, "allowed": allowed})


SECTIONS = {
    "run": "run",
    "task": "embedded task (task.py)",
    "model": "model",
    "hf": "real models (--model; hf.py) and scale-out",
    "sft": "stage 1: SFT",
    "rm": "stage 2: reward model(s)",
    "algo": "stage 3: the algorithm (algos.py)",
    "ppo": "stage 3: PPO (and the settings the other algorithms share)",
    "eval": "evaluation",
    "hooks": "test hooks",
}


@dataclass
class TrainConfig:
    # --- run ---------------------------------------------------------------------------------------
    preset: str = _opt("run", "tiny", "the defaults of every other flag", Allowed(choices=_presets))
    out_dir: str = _opt("run", "", "output folder (empty: runs/<preset>)")
    seed: int = _opt("run", 0, "seed of every random stream", Allowed(0, 2**32 - 1))
    device: str = _opt(
        "run", "auto", "auto: CUDA when available, else CPU", Allowed(choices=("auto", "cpu", "cuda"))
    )
    dtype: str = _opt(
        "run",
        "float32",
        "bfloat16: autocast on CUDA, master weights stay fp32 (an error on CPU)",
        Allowed(choices=("float32", "bfloat16")),
    )
    # The tiny model's matrices are too small for intra-op threads to pay: on the shared 2-core machine
    # one thread ran a PPO step in 0.54 s, two in 3.6 s.
    threads: int = _opt("run", 1, "torch.set_num_threads for CPU ops; 0: torch's default", AT_LEAST_0)
    progress: bool = _opt("run", True, "progress bars (tqdm when installed)")
    plot: bool = _opt("run", True, "write ppo.png (needs matplotlib)")
    tensorboard: bool = _opt("run", False, "also write TensorBoard events (when installed)")
    resume: bool = _opt("run", False, "continue the run in out_dir from its last checkpoint")
    overwrite: bool = _opt("run", False, "replace an earlier run's outputs in out_dir")
    profile: bool = _opt(
        "run", False, "synchronise the GPU around every timed phase: exact timings_s, more host syncs"
    )
    ckpt_every: int = _opt(
        "run", 20, "PPO steps between checkpoints (SFT and RM save at their end)", AT_LEAST_1
    )
    log_every: int = _opt("run", 1, "PPO steps between metrics.jsonl records", AT_LEAST_1)

    # --- embedded task (see task.py) ------------------------------------------------------------------
    n_groups: int = _opt("task", 6, "topics; each owns topic_size content tokens", AT_LEAST_1)
    topic_size: int = _opt("task", 4, "content tokens per topic (one of them banned)", Allowed(2))
    prompt_min_filler: int = _opt("task", 2, "fewest filler tokens in a prompt", AT_LEAST_0)
    prompt_max_filler: int = _opt("task", 5, "most filler tokens in a prompt", AT_LEAST_0)
    max_new_tokens: int = _opt("task", 8, "longest response, tokens", AT_LEAST_1)
    target_len: int = _opt("task", 4, "a fully helpful response has this many on-topic tokens", AT_LEAST_1)
    demo_p_relevant: float = _opt(
        "task", 0.35, "how often the (imperfect) demonstrator stays on topic, per token", UNIT
    )
    demo_min_len: int = _opt("task", 2, "shortest demonstration, content tokens", AT_LEAST_0)
    demo_max_len: int = _opt("task", 6, "longest demonstration (+ EOS must fit max_new_tokens)", AT_LEAST_0)
    label_noise: float = _opt("task", 0.05, "Bradley-Terry temperature of the simulated labelers", POSITIVE)
    help_weight: float = _opt(
        "task", 0.5, "gold = (help_weight·helpful + harm_weight·harmless) / their sum", AT_LEAST_0
    )
    harm_weight: float = _opt("task", 0.5, "see help_weight", AT_LEAST_0)

    # --- model ---------------------------------------------------------------------------------------
    n_layer: int = _opt("model", 2, "transformer blocks", AT_LEAST_1)
    n_head: int = _opt("model", 4, "attention heads (must divide d_model)", AT_LEAST_1)
    d_model: int = _opt("model", 64, "width", AT_LEAST_1)
    d_ff: int = _opt("model", 256, "MLP width", AT_LEAST_1)
    attention: str = _opt(
        "model",
        "auto",
        "auto: flash-attn on CUDA in bf16 when installed, else SDPA",
        Allowed(choices=("auto", "sdpa")),
    )
    fused_lm_head: bool = _opt(
        "model", True, "log-probs with rlhf_kernels.linear_logprobs (logits never materialised)"
    )

    # --- real models (hf.py) and scale-out --------------------------------------------------------------
    model: str = _opt(
        "hf",
        "",
        "a local Hugging Face causal LM folder (needs transformers): the policy, with a value head; "
        "empty: the built-in model on the embedded task",
    )
    prompts: str = _opt("hf", "", "--model's prompts: a JSONL file, one {\"prompt\": \"...\"} per line")
    reward: str = _opt(
        "hf", "", "--model's reward: module:function(prompts: list[str], responses: list[str]) -> "
        "list[float], or a local Hugging Face sequence-classification reward model folder"
    )
    pack: bool = _opt(
        "hf", False, "--model: the training forward on the real tokens only (padding removed, packed "
        "position ids); refused for a model that does not honour them"
    )
    fsdp: bool = _opt(
        "hf", False, "with several processes: shard the trained model's parameters, gradients and optimizer "
        "state (torch FSDP2 fully_shard) instead of DDP replicas"
    )

    # --- stage 1: SFT ----------------------------------------------------------------------------------
    sft_demos: int = _opt("sft", 4096, "demonstrations", AT_LEAST_1)
    sft_steps: int = _opt("sft", 300, "optimizer steps", AT_LEAST_1)
    sft_batch: int = _opt("sft", 64, "demonstrations per step, all processes together", AT_LEAST_1)
    sft_lr: float = _opt("sft", 2e-3, "AdamW peak learning rate (warm-up, cosine decay)", LEARNING_RATE)

    # --- stage 2: reward model(s) ----------------------------------------------------------------------
    # Weights apply to scores standardised on held-out responses; harmlessness is weighted more strictly
    # (the gold rule ranks any harmful response below every harmless one of similar helpfulness).
    reward_models: str = _opt(
        "rm",
        "helpful:1.0,harmless:1.5",
        "name:weight pairs, a name per labeler aspect (helpful, harmless, overall); weights > 0",
    )
    rm_items: int = _opt("rm", 3072, "comparisons per reward model (K ranked responses each)", AT_LEAST_1)
    rm_heldout: int = _opt("rm", 512, "held-out comparisons per reward model", AT_LEAST_1)
    rm_pair_frac: float = _opt(
        "rm", 0.5, "share of comparisons that are pairs; the rest are K-way rankings", LEARNING_RATE
    )
    rm_max_k: int = _opt("rm", 4, "largest K of a ranking", Allowed(2))
    rm_steps: int = _opt("rm", 300, "optimizer steps per reward model", AT_LEAST_1)
    rm_batch: int = _opt("rm", 32, "comparisons per step, all processes together", AT_LEAST_1)
    rm_lr: float = _opt("rm", 1e-3, "AdamW peak learning rate", LEARNING_RATE)
    rm_lm_coef: float = _opt("rm", 0.05, "LM-loss regulariser on the preferred response", AT_LEAST_0)
    rm_center_coef: float = _opt("rm", 0.0, "pairwise_reward_loss's center_coef (0: off)", AT_LEAST_0)
    rm_labels: str = _opt(
        "rm", "pairwise", "pairwise: pairwise + K-way losses on the rankings; elo: each prompt's responses "
        "rated by an Elo scan over the rankings' pairs, pointwise_reward_loss on those scalar labels",
        Allowed(choices=("pairwise", "elo")),
    )

    # --- stage 3: PPO ----------------------------------------------------------------------------------
    ppo_steps: int = _opt("ppo", 60, "PPO steps (rollout, then ppo_epochs of updates)", AT_LEAST_1)
    rollout_batch: int = _opt("ppo", 64, "prompts per step and process", AT_LEAST_1)
    minibatch: int = _opt("ppo", 16, "rollouts per update (must divide rollout_batch)", AT_LEAST_1)
    ppo_epochs: int = _opt("ppo", 4, "passes over each step's rollouts", AT_LEAST_1)
    ppo_lr: float = _opt("ppo", 5e-4, "AdamW learning rate", LEARNING_RATE)
    clip: float = _opt(
        "ppo", 0.2, "ratio clip: [1 − clip, 1 + clip]", Allowed(0, 1, lo_open=True, hi_open=True)
    )
    clip_high: float = _opt(
        "ppo", 0.0, "asymmetric upper clip 1 + clip_high (DAPO's clip-higher); 0: = clip", AT_LEAST_0
    )
    dual_clip: float = _opt(
        "ppo",
        0.0,
        "dual-clip constant c for negative advantages; 0: off",
        Allowed(1, lo_open=True, also=(0,)),
    )
    loss_agg: str = _opt(
        "ppo",
        "token-mean",
        "aggregation of the PPO losses and the entropy (rlhf_kernels.agg_loss)",
        Allowed(choices=_loss_agg_modes),
    )
    vf_clip: float = _opt("ppo", 0.2, "value clip around the rollout's values; 0: off", AT_LEAST_0)
    vf_coef: float = _opt("ppo", 0.1, "weight of the value loss", AT_LEAST_0)
    ent_coef: float = _opt("ppo", 0.0, "weight of the entropy bonus", AT_LEAST_0)
    kl_loss_coef: float = _opt(
        "ppo", 0.0, "weight of a kl_loss term (GRPO-style), on top of the KL reward penalty", AT_LEAST_0
    )
    kl_loss_estimator: str = _opt(
        "ppo", "k3", "estimator of the kl_loss term", Allowed(choices=_kl_estimators)
    )
    fused_loss: bool = _opt(
        "ppo",
        False,
        "policy loss (+ entropy bonus, + kl_loss) straight from the hidden states and the lm_head weight "
        "(rlhf_kernels.linear_policy_loss: token-level losses; logits never materialised)",
    )
    gamma: float = _opt("ppo", 1.0, "GAE discount", UNIT)
    lam: float = _opt("ppo", 0.95, "GAE λ", UNIT)
    kl_ctl: str = _opt("ppo", "adaptive", "KL coefficient controller", Allowed(choices=("adaptive", "fixed")))
    kl_coef: float = _opt("ppo", 0.05, "(initial) KL coefficient β", AT_LEAST_0)
    kl_target: float = _opt("ppo", 6.0, "the adaptive controller's target KL, nats per response", POSITIVE)
    kl_horizon: int = _opt("ppo", 10000, "the adaptive controller's horizon, responses", AT_LEAST_1)
    kl_estimator: str = _opt(
        "ppo", "k1", "estimator of the KL reward penalty", Allowed(choices=_kl_estimators)
    )
    score_clip: float = _opt(
        "ppo", 5.0, "clip of the reward score; inf: none", Allowed(0, lo_open=True, inf=True)
    )
    whiten_advantages: bool = _opt("ppo", True, "whiten the advantages (masked_whiten)")
    max_grad_norm: float = _opt(
        "ppo", 1.0, "gradient-norm clip of every stage; inf: none", Allowed(0, lo_open=True, inf=True)
    )
    temperature: float = _opt(
        "ppo", 1.0, "sampling temperature; 0: greedy (log-probs then at temperature 1)", AT_LEAST_0
    )
    top_k: int = _opt(
        "ppo", 0, "sample from the top k tokens; 0: the full vocabulary (what PPO optimises)", AT_LEAST_0
    )

    # --- stage 3: the algorithm (algos.py; docs/trainer.md "Algorithms") ---------------------------------
    algo: str = _opt("algo", "ppo", "stage 3's algorithm", Allowed(choices=_algorithms))
    group_size: int = _opt(
        "algo", 4, "samples per prompt of the critic-free algorithms and rrhf (divides rollout_batch)",
        AT_LEAST_1,
    )
    adv_estimator: str = _opt(
        "algo", "auto", "advantage estimator (rlhf_kernels.ADVANTAGE_ESTIMATORS); auto: the algorithm's",
        Allowed(choices=_adv_estimators),
    )
    norm_adv_by_std: bool = _opt("algo", True, "grpo's division by the group's std (false: Dr. GRPO)")
    policy_loss: str = _opt(
        "algo", "auto", "policy loss (rlhf_kernels.POLICY_LOSSES); auto: ppo_policy_loss for "
        "ppo, vanilla for the critic-free algorithms, gpg for reinforce",
        Allowed(choices=_policy_losses),
    )
    baseline_decay: float = _opt(
        "algo", 0.9, "reinforce: moving-average baseline b ← decay·b + (1 − decay)·mean score", UNIT
    )
    rollout_is: str = _opt(
        "algo", "none", "rollout correction: importance weights π_train/π_rollout per token or sequence",
        Allowed(choices=("none", "token", "sequence")),
    )
    rollout_is_threshold: float = _opt("algo", 2.0, "truncation of those weights (TIS)", POSITIVE)
    rollout_rs: str = _opt(
        "algo",
        "none",
        "rollout correction: rejection sampling (rlhf_kernels.REJECTION_OPTIONS): tokens or sequences whose "
        "training/rollout mismatch statistic is out of rollout_rs_threshold's bounds leave the loss",
        Allowed(choices=_rejection_options),
    )
    rollout_rs_threshold: float = _opt(
        "algo", 2.0, "its bound: k1 keeps ratios in [1/u, u] (u > 1); k2/k3 keep statistic <= u", POSITIVE
    )
    pref_beta: float = _opt(
        "algo", 0.1, "β of dpo, orpo and kto (simpo: 20·pref_beta, its usual 2.0)", POSITIVE
    )
    dpo_loss_type: str = _opt("algo", "sigmoid", "dpo's loss_type", Allowed(choices=_dpo_loss_types))
    rrhf_nll_coef: float = _opt("algo", 1.0, "rrhf: weight of the best response's NLL", AT_LEAST_0)
    gen_token_budget: int = _opt(
        "algo", 0, "stage 3 stops once it generated this many response tokens (0: ppo_steps decides)",
        AT_LEAST_0,
    )

    # --- evaluation --------------------------------------------------------------------------------------
    eval_prompts: int = _opt("eval", 256, "evaluation prompts", AT_LEAST_1)
    best_of_n: int = _opt("eval", 8, "N of the best-of-N baseline", AT_LEAST_1)

    # --- test hooks (documented in docs/trainer.md) ----------------------------------------------------
    inject_nan_at_step: int = _opt(
        "hooks", -1, "poison this PPO step's rewards (the NaN guard); -1: off", HOOK_STEP
    )
    halt_after_step: int = _opt(
        "hooks", -1, "stop after this PPO step as if killed (resume); -1: off", HOOK_STEP
    )

    @property
    def vocab_size(self) -> int:
        return 4 + self.n_groups * self.topic_size

    @property
    def prompt_len(self) -> int:
        return 3 + self.prompt_max_filler

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    def problems(self) -> list[str]:
        """One line per flag out of its range or inconsistent with another (empty when valid)."""
        out = []
        for f in fields(self):
            value, allowed = getattr(self, f.name), f.metadata["allowed"]
            if not isinstance(value, _TYPES[f.type]):
                out.append(f"--{f.name} must be a {f.type}; got {value!r}")
            elif allowed is not None and not allowed.accepts(value):
                out.append(f"--{f.name} must be {allowed}; got {value!r}")
        if out:  # the checks below assume every field is in range
            return out

        checks = [
            (
                self.d_model % self.n_head == 0,
                f"--d_model {self.d_model} must be divisible by --n_head {self.n_head}",
            ),
            (
                self.demo_min_len <= self.demo_max_len,
                f"--demo_min_len {self.demo_min_len} must be <= --demo_max_len {self.demo_max_len}",
            ),
            (
                self.demo_max_len + 1 <= self.max_new_tokens,
                f"--demo_max_len {self.demo_max_len} + 1 must be <= --max_new_tokens {self.max_new_tokens} "
                "(a demonstration ends with EOS)",
            ),
            (
                self.prompt_min_filler <= self.prompt_max_filler,
                f"--prompt_min_filler {self.prompt_min_filler} must be <= "
                f"--prompt_max_filler {self.prompt_max_filler}",
            ),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other; got both"),
            (self.help_weight + self.harm_weight > 0, "--help_weight + --harm_weight must be > 0; got 0"),
            (
                self.rollout_batch % self.minibatch == 0,
                f"--rollout_batch {self.rollout_batch} must be a multiple of --minibatch {self.minibatch}",
            ),
            (
                bool(self.model) or self.top_k <= self.vocab_size,  # --model: checked by hf.py
                f"--top_k must be in [0, {self.vocab_size}] (the vocabulary); got {self.top_k}",
            ),
            (
                bool(self.model) or not (self.prompts or self.reward or self.pack),
                "--prompts, --reward and --pack apply to --model (a Hugging Face model); got no --model",
            ),
            (
                bool(self.model) or not self.fsdp,
                "--fsdp applies to --model runs (the built-in pipeline copies its SFT model into the reward "
                "models and the reference); got no --model",
            ),
        ]
        for flag in ("rm_items", "rm_heldout"):
            n = getattr(self, flag)
            checks.append(
                (
                    rm_item_split(self, n)[0] >= 1,
                    f"--{flag} {n} leaves no pairwise comparison at --rm_pair_frac {self.rm_pair_frac}",
                )
            )
        has_ranked = rm_item_split(self, self.rm_items)[1] > 0
        checks.append(
            (
                not has_ranked or rm_batch_split(self, has_ranked, world=1)[1] >= 1,
                f"--rm_batch {self.rm_batch} leaves no room for a ranked comparison at --rm_pair_frac "
                f"{self.rm_pair_frac} (a batch holds max(1, round(rm_batch·rm_pair_frac)) pairs)",
            )
        )
        out += [text for ok, text in checks if not ok]
        from .algos import algorithm_problems

        out += algorithm_problems(self)
        try:
            parse_reward_models(self.reward_models)
        except ValueError as exc:
            out.append(str(exc))
        return out

    def validate(self) -> TrainConfig:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def rm_item_split(cfg: TrainConfig, n: int) -> tuple[int, int]:
    """(pairs, K-way rankings) among ``n`` comparisons of one reward model."""
    n_ranked = 0 if cfg.rm_max_k == 2 else int(round(n * (1 - cfg.rm_pair_frac)))
    return n - n_ranked, n_ranked


def rm_batch_split(cfg: TrainConfig, has_ranked: bool, world: int) -> tuple[int, int]:
    """(pairs, rankings) per reward-model step; with several processes every rank gets one of each."""
    frac = cfg.rm_pair_frac if has_ranked else 1.0
    pair_batch = max(1, int(round(cfg.rm_batch * frac)))
    ranked_batch = cfg.rm_batch - pair_batch if has_ranked else 0
    if world > 1:
        pair_batch = max(pair_batch, world)
        ranked_batch = max(ranked_batch, world) if has_ranked else 0
    return pair_batch, ranked_batch


REWARD_ASPECTS = ("helpful", "harmless", "overall")


def parse_reward_models(spec: str) -> list[tuple[str, float]]:
    """``"helpful:1.0,harmless:1.5"`` → [("helpful", 1.0), ("harmless", 1.5)]."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        if name not in REWARD_ASPECTS:
            raise ValueError(f"--reward_models: unknown aspect {name!r} (known: {', '.join(REWARD_ASPECTS)})")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--reward_models: the weight of {name!r} must be a number > 0; got {part!r}")
        out.append((name, value))
    if not out:
        raise ValueError(f"--reward_models must name at least one reward model; got {spec!r}")
    return out


PRESETS: dict[str, dict] = {
    # The default: the README's command; the whole pipeline in about a minute on a 2-core CPU.
    "tiny": {},
    # For tests: seconds, not minutes.  Numbers are not meaningful.
    "micro": dict(
        n_groups=3,
        topic_size=3,
        prompt_max_filler=3,
        max_new_tokens=6,
        target_len=3,
        demo_max_len=4,
        n_layer=1,
        n_head=2,
        d_model=32,
        d_ff=64,
        sft_demos=256,
        sft_steps=12,
        sft_batch=32,
        rm_items=128,
        rm_heldout=64,
        rm_steps=8,
        rm_batch=16,
        ppo_steps=4,
        rollout_batch=16,
        minibatch=8,
        ppo_epochs=2,
        ckpt_every=2,
        eval_prompts=32,
        best_of_n=2,
    ),
    # A bigger model and longer run (meant for a GPU).
    "small": dict(
        n_groups=12,
        topic_size=5,
        prompt_max_filler=10,
        max_new_tokens=16,
        target_len=8,
        demo_max_len=12,
        n_layer=6,
        n_head=8,
        d_model=256,
        d_ff=1024,
        sft_demos=32768,
        sft_steps=2000,
        sft_batch=128,
        sft_lr=1e-3,
        rm_items=16384,
        rm_heldout=2048,
        rm_steps=1500,
        rm_batch=64,
        rm_lr=5e-4,
        ppo_steps=200,
        rollout_batch=256,
        minibatch=64,
        ppo_lr=1e-4,
        eval_prompts=2048,
        best_of_n=16,
    ),
}
PRESET_NOTES = {
    "tiny": "the whole pipeline in about a minute on a 2-core CPU",
    "micro": "for tests: seconds; its numbers mean nothing",
    "small": "a bigger model and a longer run, sized for a GPU",
}
GPU_PRESETS = ("small",)  # a CPU run of these says so and estimates how long it will take


def make_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """The preset's values with ``overrides`` on top, validated (:class:`ConfigError` lists every
    problem)."""
    if preset not in PRESETS:
        raise ConfigError([f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}"])
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError([f"unknown config field {name!r}" for name in unknown])
    cfg = TrainConfig(**{**PRESETS[preset], **overrides, "preset": preset})
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{preset}"
    return cfg.validate()


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (``prog: error: …``) and exit status 2, without the usage
    block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None


_PARSERS = {"bool": _parse_bool, "float": _parse_float, "int": _parse_int, "str": str}


def build_parser(
    prog: str = "python -m rlhf_kernels.trainer", preset: str = "tiny"
) -> argparse.ArgumentParser:
    """Every field as a flag, in its section, with its description, range and ``preset``'s default."""
    defaults = make_config(preset)
    parser = OneLineParser(
        prog=prog,
        description="Minimal end-to-end RLHF (SFT → reward model → PPO) on an embedded synthetic task. "
        f"Defaults shown are those of preset {preset} ({PRESET_NOTES[preset]}).",
        usage="%(prog)s [--preset {" + ",".join(PRESETS) + "}] [--FLAG VALUE ...]",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    groups = {key: parser.add_argument_group(title) for key, title in SECTIONS.items()}
    for f in fields(TrainConfig):
        default, allowed = getattr(defaults, f.name), f.metadata["allowed"]
        text = f.metadata["help"]
        if f.name == "preset":
            text += " (" + "; ".join(f"{name}: {note}" for name, note in PRESET_NOTES.items()) + ")"
        text += f" (default {default}" + (f"; {allowed}" if allowed and allowed.choices is None else "") + ")"
        kwargs = dict(type=_PARSERS[f.type], help=text.replace("%", "%%"), metavar=f.type.upper())
        if f.type == "bool":  # --resume alone means true; --resume false is accepted too
            kwargs.update(nargs="?", const=True)
        if allowed is not None and allowed.choices is not None:  # checked by validate(), in its words
            kwargs.update(metavar="{" + ",".join(allowed.options()) + "}")
        groups[f.metadata["section"]].add_argument(f"--{f.name}", **kwargs)
    return parser


def _chosen_preset(argv: list[str]) -> str:
    pre = OneLineParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="tiny")
    known, _ = pre.parse_known_args(argv)
    return known.preset


def config_from_args(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    """The config of a command line; a bad flag prints one line per problem and exits with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m rlhf_kernels.trainer"
    preset = _chosen_preset(argv)
    if preset not in PRESETS:
        OneLineParser(prog=prog).error(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    parser = build_parser(prog, preset)
    args = vars(parser.parse_args(argv))
    args.pop("preset", None)
    try:
        return make_config(preset, **args)
    except ConfigError as exc:
        parser.exit(2, "".join(f"{prog}: error: {line}\n" for line in exc.problems))
