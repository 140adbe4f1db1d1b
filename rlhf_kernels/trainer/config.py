"""The trainer's one configuration object, its presets, and the command line built from it.

Every field of :class:`TrainConfig` is a flag (``--ppo_steps 40``, ``--fused_lm_head false``); a preset
(``--preset tiny|micro|small``) sets the defaults the flags then override.  ``tiny`` is the default: the
whole SFT → reward model → PPO pipeline on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields


@dataclass
class TrainConfig:
    # --- run ---------------------------------------------------------------------------------------
    preset: str = "tiny"
    out_dir: str = ""  # default: runs/<preset>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast on CUDA; master weights stay fp32)
    # torch.set_num_threads (CPU ops); 0 leaves torch's default.  The tiny model's matrices are too small
    # for intra-op threads to pay: on the shared 2-core machine one thread ran a PPO step in 0.54 s, two
    # in 3.6 s.
    threads: int = 1
    progress: bool = True
    plot: bool = True
    tensorboard: bool = False
    resume: bool = False
    ckpt_every: int = 20  # PPO steps between checkpoints (SFT and RM write one at their end)
    log_every: int = 1

    # --- embedded task (see task.py) ------------------------------------------------------------------
    n_groups: int = 6  # topics; each owns group_size content tokens, one of them banned
    group_size: int = 4
    prompt_min_filler: int = 2
    prompt_max_filler: int = 5
    max_new_tokens: int = 8
    target_len: int = 4  # a fully helpful response has at least this many on-topic tokens
    demo_p_relevant: float = 0.35  # how often the (imperfect) demonstrator stays on topic
    demo_min_len: int = 2
    demo_max_len: int = 6
    label_noise: float = 0.05  # Bradley-Terry temperature of the simulated labelers
    help_weight: float = 0.5  # gold = help_weight * helpful + harm_weight * harmless
    harm_weight: float = 0.5

    # --- model ---------------------------------------------------------------------------------------
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 256
    attention: str = "auto"  # auto (flash-attn on CUDA when installed, else SDPA) | sdpa
    fused_lm_head: bool = True  # log-probs with rlhf_kernels.linear_logprobs (logits never materialised)

    # --- stage 1: SFT ----------------------------------------------------------------------------------
    sft_demos: int = 4096
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 2e-3

    # --- stage 2: reward model(s) ----------------------------------------------------------------------
    # name:weight pairs; a name is an aspect of the labeler ("helpful", "harmless", or "overall").  Weights
    # apply to scores standardised on held-out responses; harmlessness is weighted more strictly (the gold
    # rule ranks any harmful response below every harmless one of similar helpfulness).
    reward_models: str = "helpful:1.0,harmless:1.5"
    rm_items: int = 3072  # comparisons per reward model (a prompt with K ranked responses each)
    rm_heldout: int = 512
    rm_pair_frac: float = 0.5  # share of comparisons that are pairs; the rest are K-way rankings
    rm_max_k: int = 4
    rm_steps: int = 300
    rm_batch: int = 32
    rm_lr: float = 1e-3
    rm_lm_coef: float = 0.05  # LM-loss regulariser on the preferred response
    rm_center_coef: float = 0.0

    # --- stage 3: PPO ----------------------------------------------------------------------------------
    ppo_steps: int = 60
    rollout_batch: int = 64  # prompts per step and rank
    minibatch: int = 16
    ppo_epochs: int = 4
    ppo_lr: float = 5e-4
    clip: float = 0.2
    clip_high: float = 0.0  # > 0: asymmetric upper clip 1 + clip_high (DAPO's clip-higher); 0: = clip
    dual_clip: float = 0.0  # > 1: dual-clip constant c for negative advantages; 0: off
    loss_agg: str = "token-mean"  # aggregation of the PPO losses and the entropy (rlhf_kernels.agg_loss)
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    kl_loss_coef: float = 0.0  # optional kl_loss term (GRPO-style), on top of the KL reward penalty
    kl_loss_estimator: str = "k3"
    gamma: float = 1.0
    lam: float = 0.95
    kl_ctl: str = "adaptive"  # adaptive | fixed
    kl_coef: float = 0.05
    kl_target: float = 6.0  # nats per response (the adaptive controller's target)
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    score_clip: float = 5.0
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0 = full vocabulary (the log-probs PPO optimises are of the untruncated policy)

    # --- evaluation --------------------------------------------------------------------------------------
    eval_prompts: int = 256
    best_of_n: int = 8

    # --- test hooks (documented in docs/trainer.md) ----------------------------------------------------
    inject_nan_at_step: int = -1  # poison the rewards of this PPO step (exercises the NaN guard)
    halt_after_step: int = -1  # stop after this PPO step as if interrupted (exercises --resume)

    @property
    def vocab_size(self) -> int:
        return 4 + self.n_groups * self.group_size

    @property
    def prompt_len(self) -> int:
        return 3 + self.prompt_max_filler

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    def validate(self) -> TrainConfig:
        problems = []
        if self.d_model % self.n_head:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.demo_max_len + 1 > self.max_new_tokens:
            problems.append(
                f"demo_max_len + 1 ({self.demo_max_len + 1}) must be <= max_new_tokens "
                f"({self.max_new_tokens}): a demonstration ends with EOS"
            )
        if self.rollout_batch % self.minibatch:
            problems.append(
                f"rollout_batch ({self.rollout_batch}) must be a multiple of minibatch ({self.minibatch})"
            )
        if self.group_size < 2:
            problems.append(
                f"group_size must be >= 2 (one token of each group is banned); got {self.group_size}"
            )
        if not 0 < self.rm_pair_frac <= 1:
            problems.append(f"rm_pair_frac must be in (0, 1]; got {self.rm_pair_frac}")
        if self.rm_max_k < 2:
            problems.append(f"rm_max_k must be >= 2; got {self.rm_max_k}")
        if self.kl_ctl not in ("adaptive", "fixed"):
            problems.append(f"kl_ctl must be 'adaptive' or 'fixed'; got {self.kl_ctl!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16; got {self.dtype!r}")
        modes = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
        if self.loss_agg not in modes:
            problems.append(f"loss_agg must be one of {modes}; got {self.loss_agg!r}")
        if self.attention not in ("auto", "sdpa"):
            problems.append(f"attention must be auto or sdpa; got {self.attention!r}")
        try:
            parse_reward_models(self.reward_models)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("invalid trainer config: " + "; ".join(problems))
        return self


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
            raise ValueError(f"reward_models: unknown aspect {name!r} (known: {REWARD_ASPECTS})")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"reward_models: weight of {name!r} must be a number; got {weight!r}") from None
    if not out:
        raise ValueError(f"reward_models must name at least one reward model; got {spec!r}")
    return out


PRESETS: dict[str, dict] = {
    # The default: the README's command; the whole pipeline in a few minutes on a 2-core CPU.
    "tiny": {},
    # For tests: seconds, not minutes.  Numbers are not meaningful.
    "micro": dict(
        n_groups=3,
        group_size=3,
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
        group_size=5,
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


def make_config(preset: str = "tiny", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    cfg = TrainConfig(**values)
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{preset}"
    return cfg.validate()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false); got {text!r}")


def build_parser(prog: str = "python -m rlhf_kernels.trainer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Minimal end-to-end RLHF (SFT → reward model → PPO) on an embedded synthetic task.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            # --resume alone means true; --resume false is accepted too.
            parser.add_argument(
                f"--{f.name}", type=_parse_bool, nargs="?", const=True, help=f"(default {default})"
            )
        else:
            parser.add_argument(f"--{f.name}", type=type(default), help=f"(default {default!r})")
    return parser


def config_from_args(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    parser = build_parser(prog) if prog else build_parser()
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", "tiny")
    try:
        return make_config(preset, **args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable; parser.error exits


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
