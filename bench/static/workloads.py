"""The ops the static report compiles, at the shapes RLHF training runs them.

Each :class:`Case` calls one public function (forwards) or one registered backward op (backwards: the
fake CUDA device has no autograd, see ``fake_device``) on fake CUDA tensors; the kernels it launches,
their configurations and grids are whatever the launchers choose for those tensors.  ``min_bytes`` is
the op's minimal memory traffic (each input read once, each output written once), the figure the
report sets the estimated traffic against.

Shapes: N = 16384 tokens (16 sequences of 1024) of a V = 151936 vocabulary (Qwen2; Llama 3 has
128256) and hidden size H = 4096 for the log-prob ops; [B, T] = [256, 4096] token tensors for GAE,
whitening and rewards (issue 3's target), [512, 4096] for the PPO and KL losses (issue 4's); 8192
pairs and [1024, 8] rankings for the reward-model losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

N, V, H = 16384, 151936, 4096
B_ADV, T_ADV = 256, 4096
B_LOSS, T_LOSS = 512, 4096
PAIRS, RANK_B, RANK_K = 8192, 1024, 8
RANK_LONG_B, RANK_LONG_K = 256, 64  # K = 64 responses: the ranking kernels' largest pair tile

SHORT = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bool: "bool",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.int8: "i8",
}


@dataclass
class Case:
    family: str
    op: str  # the public function or registered op called
    label: str  # dtype / options / shape, as the report prints it
    make: Callable[[], tuple]  # builds the (fake) inputs; launches made here are not recorded
    run: Callable[..., object]  # run(*make()): the recorded call
    min_bytes: int
    ci: bool = False  # compiled by tests/test_static.py too (the CI subset)
    settings: dict = field(default_factory=dict)  # torch.backends flags the case runs under


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


def _ops():
    return torch.ops.rlhf_kernels


def _size(dtype: torch.dtype) -> int:
    return dtype.itemsize


# ---------------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------------
def logprobs_cases() -> list[Case]:
    import rlhf_kernels as rk

    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        e = _size(dtype)
        out = 8 if dtype == torch.float64 else 4
        fwd_min = N * V * e + N * 8 + N * out
        cases.append(
            Case(
                "logprobs",
                "logprobs_from_logits",
                f"{SHORT[dtype]} [{N}, {V}]",
                lambda dtype=dtype: (empty(N, V, dtype=dtype), empty(N, dtype=torch.int64)),
                lambda x, y: rk.logprobs_from_logits(x, y),
                fwd_min,
                ci=dtype == torch.bfloat16,
            )
        )
        cases.append(
            Case(
                "logprobs",
                "logprobs_from_logits",
                f"{SHORT[dtype]} [{N}, {V}] +entropy",
                lambda dtype=dtype: (empty(N, V, dtype=dtype), empty(N, dtype=torch.int64)),
                lambda x, y: rk.logprobs_from_logits(x, y, temperature=0.7, return_entropy=True),
                fwd_min + N * out,
                ci=dtype == torch.bfloat16,
            )
        )
        for grad_entropy in (False, True):
            bwd_min = 2 * N * V * e + N * 8 + N * out * (2 + 2 * grad_entropy)
            cases.append(
                Case(
                    "logprobs",
                    "logprobs_bwd",
                    f"{SHORT[dtype]} [{N}, {V}]" + (" +grad entropy" * grad_entropy),
                    lambda dtype=dtype, ge=grad_entropy: logprobs_bwd_args(empty(N, V, dtype=dtype), ge),
                    lambda g, ge, x, y, lse, ent: _ops().logprobs_bwd(g, ge, x, y, lse, ent, 1.0, -100),
                    bwd_min,
                    ci=dtype == torch.bfloat16 and grad_entropy,
                )
            )
    # Layouts: rows through two strided dimensions (logits[:, :-1] of [B, T + 1, V]), in-place backward.
    b, t = 16, 1024
    cases.append(
        Case(
            "logprobs",
            "logprobs_from_logits",
            f"bf16 logits[:, :-1] of [{b}, {t + 1}, {V}] +entropy",
            lambda: (empty(b, t + 1, V, dtype=torch.bfloat16)[:, :-1], empty(b, t, dtype=torch.int64)),
            lambda x, y: rk.logprobs_from_logits(x, y, return_entropy=True),
            N * V * 2 + N * 8 + 2 * N * 4,
        )
    )
    cases.append(
        Case(
            "logprobs",
            "logprobs_bwd",
            f"bf16 logits[:, :-1] of [{b}, {t + 1}, {V}]",
            lambda: logprobs_bwd_args(empty(b, t + 1, V, dtype=torch.bfloat16)[:, :-1], False),
            lambda g, ge, x, y, lse, ent: _ops().logprobs_bwd(g, ge, x, y, lse, ent, 1.0, -100),
            2 * N * V * 2 + N * 8 + 2 * N * 4,
        )
    )
    cases.append(
        Case(  # the gradient overwrites the logits: the estimate counts that buffer once
            "logprobs",
            "logprobs_bwd_inplace",
            f"bf16 [{N}, {V}] +grad entropy (in place)",
            lambda: logprobs_bwd_args(empty(N, V, dtype=torch.bfloat16), True),
            lambda g, ge, x, y, lse, ent: _ops().logprobs_bwd_inplace(g, ge, x, y, lse, ent, 1.0, -100),
            2 * N * V * 2 + N * 8 + 4 * N * 4,
        )
    )
    cases.append(
        Case(
            "logprobs",
            "entropy_from_logits",
            f"bf16 [{N}, {V}]",
            lambda: (empty(N, V, dtype=torch.bfloat16),),
            lambda x: rk.entropy_from_logits(x),
            N * V * 2 + N * 4,
        )
    )
    return cases


def logprobs_bwd_args(logits: torch.Tensor, grad_entropy: bool) -> tuple[torch.Tensor, ...]:
    """(grad_logprobs, grad_entropy or [0], logits, labels, lse, entropy) for the logprobs backward ops."""
    out = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.shape[:-1].numel()
    return (
        empty(rows, dtype=out),
        empty(rows if grad_entropy else 0, dtype=out),
        logits,
        empty(rows, dtype=torch.int64),
        empty(rows, dtype=out),
        empty(rows, dtype=out),
    )


# ---------------------------------------------------------------------------------------------------
# linear_logprobs
# ---------------------------------------------------------------------------------------------------
_LINEAR_VARIANTS = (
    # (dtype, bias, entropy, tf32, in the CI subset)
    (torch.bfloat16, False, False, False, True),
    (torch.bfloat16, False, True, False, True),
    (torch.float16, True, True, False, True),
    (torch.float32, False, True, False, True),
    (torch.float32, False, True, True, False),
)


def linear_logprobs_cases() -> list[Case]:
    import rlhf_kernels as rk

    cases = []
    for dtype, has_bias, entropy, tf32, ci in _LINEAR_VARIANTS:
        e = _size(dtype)
        label = (
            f"{SHORT[dtype]} N={N} H={H} V={V}"
            + (" +bias" if has_bias else "")
            + (" +entropy" if entropy else "")
            + (" TF32" if tf32 else "")
        )
        settings = {"allow_tf32": tf32}
        inputs = (N * H + V * H + (V if has_bias else 0)) * e + N * 8

        def make(dtype=dtype, has_bias=has_bias):
            return (
                empty(N, H, dtype=dtype),
                empty(V, H, dtype=dtype),
                empty(N, dtype=torch.int64),
                empty(V, dtype=dtype) if has_bias else None,
            )

        cases.append(
            Case(
                "linear_logprobs",
                "linear_logprobs",
                label,
                make,
                lambda h, w, y, b, entropy=entropy: rk.linear_logprobs(
                    h, w, y, bias=b, return_entropy=entropy
                ),
                inputs + N * 4 * (1 + entropy),
                ci=ci,
                settings=settings,
            )
        )

        def make_bwd(dtype=dtype, has_bias=has_bias, entropy=entropy):
            return (
                empty(N),
                empty(N if entropy else 0),
                empty(N, H, dtype=dtype),
                empty(V, H, dtype=dtype),
                empty(V, dtype=dtype) if has_bias else None,
                empty(N, dtype=torch.int64),
                empty(N),
                empty(N),
            )

        cases.append(
            Case(
                "linear_logprobs",
                "linear_logprobs_bwd",
                label,
                make_bwd,
                lambda g, ge, h, w, b, y, lse, ent: _ops().linear_logprobs_bwd(
                    g, ge, h, w, b, y, lse, ent, 1.0, -100, 0, V, True, True, b is not None
                ),
                inputs + N * 4 * (2 + 2 * entropy) + N * H * 4 + V * H * e + (V * e if has_bias else 0),
                ci=ci and dtype == torch.bfloat16 and entropy,
                settings=settings,
            )
        )
    cases += linear_logprobs_issue15_cases()
    cases += linear_logprobs_topk_cases()
    return cases


def linear_logprobs_topk_cases() -> list[Case]:
    """Issue 15: the top-k (k = 64, the largest) in the forward's running per-row set, and its one-hot
    gradient terms in the backward kernel."""
    from rlhf_kernels.ops.linear_logprobs import linear_token_stats

    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        e = _size(dtype)
        label = f"{SHORT[dtype]} N={N} H={H} V={V} top_k=64"

        def make(dtype=dtype):
            return empty(N, H, dtype=dtype), empty(V, H, dtype=dtype), empty(N, dtype=torch.int64)

        cases.append(Case(
            "linear_logprobs", "linear_token_stats", label, make,
            lambda h, w, y: linear_token_stats(h, w, y, top_k=64),
            (N * H + V * H) * e + N * 8 + N * 4 + N * 64 * 12, ci=dtype == torch.bfloat16,
        ))

        def make_bwd(dtype=dtype):
            return (empty(N), empty(N, H, dtype=dtype), empty(V, H, dtype=dtype), empty(N, dtype=torch.int64),
                    empty(N), empty(N, 64), empty(N, 64, dtype=torch.int64))

        cases.append(Case(
            "linear_logprobs", "linear_logprobs_bwd", label, make_bwd,
            lambda g, h, w, y, lse, gk, idx: _ops().linear_logprobs_bwd(
                g, g.new_empty(0), h, w, None, y, lse, lse, 1.0, -100, 0, V, True, True, False,
                None, None, None, 1.0, 0.0, False, gk, idx),
            (N * H + V * H) * e + N * 8 * 2 + N * 64 * 12 + N * H * 4 + V * H * e,
            ci=False,
        ))
    return cases


def linear_logprobs_issue15_cases() -> list[Case]:
    """Issue 15: every statistic with a soft cap (narrower tiles, see _launch_config) and the
    batch_invariant backward (its fixed-tile d_hidden kernel, _linear_logprobs_grad_hidden_kernel)."""
    from rlhf_kernels.ops.linear_logprobs import linear_token_stats

    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        e = _size(dtype)
        label = f"{SHORT[dtype]} N={N} H={H} V={V} +stats +softcap"

        def make(dtype=dtype):
            return empty(N, H, dtype=dtype), empty(V, H, dtype=dtype), empty(N, dtype=torch.int64)

        cases.append(Case(
            "linear_logprobs", "linear_token_stats", label, make,
            lambda h, w, y: linear_token_stats(
                h, w, y, softcap=30.0, entropy=True, sum_sq_probs=True, top1_match=True, mean_logit=True
            ),
            (N * H + V * H) * e + N * 8 + N * 4 * 5, ci=dtype == torch.bfloat16,
        ))

        def make_bwd(dtype=dtype):
            return (empty(N), empty(N), empty(N, H, dtype=dtype), empty(V, H, dtype=dtype),
                    empty(N, dtype=torch.int64), empty(N), empty(N), empty(N), empty(N), empty(N))

        for invariant in (False, True):
            cases.append(Case(
                "linear_logprobs", "linear_logprobs_bwd", label + (" batch_invariant" if invariant else ""),
                make_bwd,
                lambda g, ge, h, w, y, lse, ent, gq, gm, sq, invariant=invariant: (
                    _ops().linear_logprobs_bwd(g, ge, h, w, None, y, lse, ent, 1.0, -100, 0, V, True, True,
                                               False, gq, gm, sq, 1.0, 30.0, invariant)
                ),
                (N * H + V * H) * e + N * 8 * 4 + N * H * 4 + V * H * e,
                ci=invariant and dtype == torch.bfloat16,
            ))
    return cases


# ---------------------------------------------------------------------------------------------------
# gae, whiten, token_rewards: [B, T] token tensors
# ---------------------------------------------------------------------------------------------------
def gae_cases() -> list[Case]:
    import rlhf_kernels as rk

    cases = []
    for dtype, mode, (b, t) in (
        (torch.float32, "carry", (B_ADV, T_ADV)),
        (torch.bfloat16, "carry", (B_ADV, T_ADV)),
        (torch.float32, "zero", (B_ADV, T_ADV)),
        (torch.float32, "carry", (1024, 8192)),
    ):
        e = _size(dtype)
        cases.append(
            Case(
                "gae",
                "compute_gae",
                f"{SHORT[dtype]} [{b}, {t}] mask_mode={mode}",
                lambda dtype=dtype, b=b, t=t: (
                    empty(b, t, dtype=dtype),
                    empty(b, t, dtype=dtype),
                    empty(b, t, dtype=torch.bool),
                ),
                lambda r, v, m, mode=mode: rk.compute_gae(r, v, m, 0.99, 0.95, mask_mode=mode),
                b * t * (2 * e + 1 + 2 * 4),
                ci=dtype == torch.float32 and mode == "carry" and b == B_ADV,
            )
        )
    return cases


def whiten_cases() -> list[Case]:
    import rlhf_kernels as rk

    b, t = B_ADV, T_ADV
    cases = []
    for dtype, dim, shift in (
        (torch.float32, None, True),
        (torch.float32, 1, True),
        (torch.bfloat16, None, False),
    ):
        e = _size(dtype)
        cases.append(
            Case(
                "whiten",
                "masked_whiten",
                f"{SHORT[dtype]} [{b}, {t}] dim={dim} shift_mean={shift}",
                lambda dtype=dtype: (empty(b, t, dtype=dtype), empty(b, t, dtype=torch.bool)),
                lambda x, m, dim=dim, shift=shift: rk.masked_whiten(x, m, dim=dim, shift_mean=shift),
                b * t * (e + 1 + 4),
                ci=dim is None and dtype == torch.float32,
            )
        )
    return cases


def token_rewards_cases() -> list[Case]:
    import rlhf_kernels as rk

    b, t = B_ADV, T_ADV
    cases = []
    for dtype, estimator, clip in ((torch.float32, "k1", None), (torch.bfloat16, "k3", 5.0)):
        e = _size(dtype)
        cases.append(
            Case(
                "token_rewards",
                "token_level_rewards",
                f"{SHORT[dtype]} [{b}, {t}] {estimator} clip={clip}",
                lambda dtype=dtype: (
                    empty(b),
                    empty(b, t, dtype=dtype),
                    empty(b, t, dtype=dtype),
                    empty(b, t, dtype=torch.bool),
                ),
                lambda s, lp, ref, m, estimator=estimator, clip=clip: rk.token_level_rewards(
                    s, lp, ref, m, kl_coef=0.05, estimator=estimator, score_clip=clip
                ),
                b * 4 + b * t * (2 * e + 1 + 4),
                ci=dtype == torch.float32,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------------
# kl, ppo_losses, reward_losses
# ---------------------------------------------------------------------------------------------------
def kl_cases() -> list[Case]:
    import rlhf_kernels as rk

    b, t = B_LOSS, T_LOSS
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        e = _size(dtype)
        cases.append(
            Case(
                "kl",
                "kl_penalty",
                f"{SHORT[dtype]} [{b}, {t}] k3",
                lambda dtype=dtype: (empty(b, t, dtype=dtype), empty(b, t, dtype=dtype)),
                lambda lp, ref: rk.kl_penalty(lp, ref, "k3"),
                b * t * (2 * e + 4),
                ci=dtype == torch.float32,
            )
        )
        cases.append(
            Case(
                "kl",
                "kl_penalty_bwd",
                f"{SHORT[dtype]} [{b}, {t}] k3 +grad ref",
                lambda dtype=dtype: (empty(b, t), empty(b, t, dtype=dtype), empty(b, t, dtype=dtype)),
                lambda g, lp, ref: _ops().kl_penalty_bwd(g, lp, ref, "k3", True),
                b * t * (4 + 4 * e),
                ci=dtype == torch.float32,
            )
        )
    cases.append(
        Case(
            "kl",
            "kl_loss",
            f"fp32 [{b}, {t}] k3 token-mean",
            lambda: (empty(b, t), empty(b, t), empty(b, t, dtype=torch.bool)),
            lambda lp, ref, m: rk.kl_loss(lp, ref, m),
            b * t * (2 * 4 + 1),
        )
    )
    return cases


def token_inputs(b: int, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Three [B, T] float inputs (log-probs, old log-probs, advantages, or values, old values, returns) and
    a bool mask."""
    return (*(empty(b, t, dtype=dtype) for _ in range(3)), empty(b, t, dtype=torch.bool))


def ppo_losses_cases() -> list[Case]:
    import rlhf_kernels as rk

    b, t = B_LOSS, T_LOSS
    cases = []
    for dtype, dual in ((torch.float32, None), (torch.bfloat16, 3.0)):
        e = _size(dtype)

        def make(dtype=dtype):
            return token_inputs(b, t, dtype)

        cases.append(
            Case(
                "ppo_losses",
                "ppo_policy_loss",
                f"{SHORT[dtype]} [{b}, {t}] dual_clip={dual}",
                make,
                lambda lp, old, adv, m, dual=dual: rk.ppo_policy_loss(
                    lp, old, adv, m, clip_high=0.28, dual_clip=dual
                ),
                b * t * (3 * e + 1),
                ci=dtype == torch.float32,
            )
        )

        def make_bwd(dtype=dtype, dual=dual, make=make):
            lp, old, adv, m = make(dtype)
            partials, _ = _ops().ppo_policy_loss_fwd(lp, old, adv, m, 0.2, 0.28, dual)
            return (torch.empty_like(partials), lp, old, adv, m)

        cases.append(
            Case(
                "ppo_losses",
                "ppo_policy_loss_bwd",
                f"{SHORT[dtype]} [{b}, {t}] dual_clip={dual}",
                make_bwd,
                lambda gp, lp, old, adv, m, dual=dual: _ops().ppo_policy_loss_bwd(
                    gp, lp, old, adv, m, 0.2, 0.28, dual
                ),
                b * t * (4 * e + 1),
                ci=dtype == torch.float32,
            )
        )
    for dtype, clip in ((torch.float32, 0.5), (torch.bfloat16, None)):
        e = _size(dtype)

        def make_value(dtype=dtype):
            return token_inputs(b, t, dtype)

        cases.append(
            Case(
                "ppo_losses",
                "ppo_value_loss",
                f"{SHORT[dtype]} [{b}, {t}] clip={clip}",
                make_value,
                lambda v, old, ret, m, clip=clip: rk.ppo_value_loss(v, old, ret, m, clip=clip),
                b * t * ((3 if clip else 2) * e + 1),
                ci=dtype == torch.float32,
            )
        )

        def make_value_bwd(dtype=dtype, clip=clip, make_value=make_value):
            v, old, ret, m = make_value(dtype)
            partials, _ = _ops().ppo_value_loss_fwd(v, old, ret, m, clip)
            return (torch.empty_like(partials), v, old, ret, m)

        cases.append(
            Case(
                "ppo_losses",
                "ppo_value_loss_bwd",
                f"{SHORT[dtype]} [{b}, {t}] clip={clip}",
                make_value_bwd,
                lambda gp, v, old, ret, m, clip=clip: _ops().ppo_value_loss_bwd(gp, v, old, ret, m, clip),
                b * t * ((4 if clip else 3) * e + 1),
                ci=dtype == torch.float32,
            )
        )
    return cases


def reward_losses_cases() -> list[Case]:
    import rlhf_kernels as rk

    cases = []
    n = PAIRS
    for dtype, margin in ((torch.float32, "tensor"), (torch.bfloat16, None)):
        e = _size(dtype)

        def make(dtype=dtype, margin=margin):
            return (empty(n, dtype=dtype), empty(n, dtype=dtype), empty(n) if margin else None)

        cases.append(
            Case(
                "reward_losses",
                "pairwise_reward_loss",
                f"{SHORT[dtype]} [{n}] margin={margin}",
                make,
                lambda c, r, m: rk.pairwise_reward_loss(c, r, margin=m, center_coef=0.01),
                n * (2 * e + (4 if margin else 0)),
                ci=dtype == torch.float32,
            )
        )

        def make_bwd(dtype=dtype, margin=margin, make=make):
            c, r, m = make(dtype, margin)
            partials, _ = _ops().pairwise_reward_loss_fwd(c, r, m, 0.0)
            return (torch.empty_like(partials), c, r, m)

        cases.append(
            Case(
                "reward_losses",
                "pairwise_reward_loss_bwd",
                f"{SHORT[dtype]} [{n}] margin={margin}",
                make_bwd,
                lambda gp, c, r, m: _ops().pairwise_reward_loss_bwd(gp, c, r, m, 0.0),
                n * (4 * e + (4 if margin else 0)),
                ci=dtype == torch.float32,
            )
        )
    for dtype, masked, hinge, (b, k) in (
        (torch.float32, True, False, (RANK_B, RANK_K)),
        (torch.bfloat16, False, False, (RANK_B, RANK_K)),
        (torch.float32, True, True, (RANK_B, RANK_K)),
        (torch.float32, True, False, (RANK_LONG_B, RANK_LONG_K)),
        (torch.bfloat16, False, True, (RANK_LONG_B, RANK_LONG_K)),
    ):
        e = _size(dtype)
        name = "ranking_hinge_loss" if hinge else "ranking_reward_loss"

        def make(dtype=dtype, masked=masked, b=b, k=k):
            return (empty(b, k, dtype=dtype), empty(b, k, dtype=torch.bool) if masked else None)

        cases.append(
            Case(
                "reward_losses",
                name,
                f"{SHORT[dtype]} [{b}, {k}] mask={masked}",
                make,
                (lambda s, m: rk.ranking_hinge_loss(s, mask=m))
                if hinge
                else (lambda s, m: rk.ranking_reward_loss(s, mask=m)),
                b * k * (e + masked),
                ci=dtype == torch.float32 or k == RANK_LONG_K,
            )
        )

        def make_bwd(dtype=dtype, masked=masked, hinge=hinge, make=make):
            s, m = make(dtype, masked)
            partials, _ = _ops().ranking_loss_fwd(s, m, hinge)
            return (torch.empty_like(partials), s, m)

        cases.append(
            Case(
                "reward_losses",
                "ranking_loss_bwd",
                f"{SHORT[dtype]} [{b}, {k}] mask={masked} hinge={hinge}",
                make_bwd,
                lambda gp, s, m, hinge=hinge: _ops().ranking_loss_bwd(gp, s, m, hinge),
                b * k * (2 * e + masked),
                ci=dtype == torch.float32 or k == RANK_LONG_K,
            )
        )
    cases.append(
        Case(
            "reward_losses",
            "pointwise_reward_loss",
            f"fp32 [{n}]",
            lambda: (empty(n), empty(n)),
            lambda p, y: rk.pointwise_reward_loss(p, y),
            n * 8,
            ci=True,
        )
    )
    cases.append(
        Case(
            "reward_losses",
            "pointwise_reward_loss_bwd",
            f"fp32 [{n}]",
            lambda: (
                torch.empty_like(_ops().pointwise_reward_loss_fwd(empty(n), empty(n))),
                empty(n),
                empty(n),
            ),
            lambda gp, p, y: _ops().pointwise_reward_loss_bwd(gp, p, y),
            n * 12,
            ci=True,
        )
    )
    return cases


def policy_losses_cases() -> list[Case]:
    """verl's registry variants (one kernel, the variant a constexpr): each public function forward, and
    the backward op with the arguments that forward gave the forward op (captured, so the per-variant
    scalars are the function's own)."""
    from rlhf_kernels.ops import policy_losses as pl

    b, t = B_LOSS, T_LOSS
    kwargs = {"dro": {"beta": 0.1}}
    cases = []

    def forward_args(name: str, fn, *args, **extra) -> tuple:
        captured = []
        original = pl.policy_loss_token_fwd

        def spy(*op_args):
            captured.append(op_args)
            return original(*op_args)

        pl.policy_loss_token_fwd = spy
        try:
            fn(*args, **extra)
        finally:
            pl.policy_loss_token_fwd = original
        (op_args,) = captured
        partials, _ = original(*op_args)
        return (torch.empty_like(partials), *op_args)

    # The CI subset: the variants with the most registers (dppo_kl, geo_mean), one with an auxiliary input
    # (gspo) and the rollout weights.
    ci = {"dppo_kl", "geo_mean", "gspo", "vanilla + is_weights"}
    variants = [
        (name, fn, kwargs.get(name, {})) for name, fn in pl.POLICY_LOSSES.items() if name != "vanilla"
    ]
    variants.append(("vanilla + is_weights", pl.POLICY_LOSSES["vanilla"], {"is_weights": None}))
    for name, fn, extra in variants:

        def make(fn=fn, extra=extra):
            args = token_inputs(b, t, torch.float32)
            return (*args, {k: (empty(b, t) if k == "is_weights" else v) for k, v in extra.items()})

        cases.append(
            Case(
                "policy_losses",
                fn.__name__,
                f"{name} fp32 [{b}, {t}]",
                make,
                lambda lp, old, adv, m, extra, fn=fn: fn(lp, old, adv, m, **extra),
                b * t * (3 * 4 + 1 + 4 * ("is_weights" in extra)),
                ci=name in ci,
            )
        )

        def make_bwd(name=name, fn=fn, extra=extra, make=make):
            *args, extra_args = make()
            return forward_args(name, fn, *args, **extra_args)

        cases.append(
            Case(
                "policy_losses",
                "policy_loss_token_bwd",
                f"{name} fp32 [{b}, {t}]",
                make_bwd,
                lambda *args: _ops().policy_loss_token_bwd(*args),
                b * t * (4 * 4 + 1 + 4 * ("is_weights" in extra)),
                ci=name in ci,
            )
        )
    return cases


def token_stats_cases() -> list[Case]:
    """The logprobs kernel's superset: every statistic, a softcap and a top-k, in bf16 and fp32."""
    import rlhf_kernels.ops.token_stats as ts

    cases = []
    variants = (  # (dtype, softcap, top_k, in the CI subset)
        (torch.bfloat16, None, 0, True),
        (torch.bfloat16, 30.0, 8, True),
        (torch.float32, None, 0, False),
    )
    for dtype, softcap, top_k, ci in variants:
        e = _size(dtype)
        label = f"{SHORT[dtype]} [{N}, {V}] all stats" + (f" softcap top_k={top_k}" if top_k else "")
        stats = dict(entropy=True, sum_sq_probs=True, top1_match=True, mean_logit=True, top_k=top_k)

        def make(dtype=dtype):
            return (empty(N, V, dtype=dtype), empty(N, dtype=torch.int64))

        cases.append(
            Case(
                "token_stats",
                "token_stats_from_logits",
                label,
                make,
                lambda x, y, softcap=softcap, stats=stats: ts.token_stats_from_logits(
                    x, y, softcap=softcap, **stats
                ),
                N * V * e + N * 8 + N * 4 * (5 + 3 * top_k),
                ci=ci,
            )
        )

        def make_bwd(make=make, softcap=softcap, top_k=top_k):
            x, y = make()
            lp, ent, sq, _, mean, topk_lp, topk_idx, lse = _ops().token_stats_fwd(
                x, y, 1.0, softcap or 0.0, 1.0, -100, True, True, True, True, top_k
            )
            grads = [torch.empty_like(t) for t in (lp, ent, sq, mean, topk_lp)]
            return (*grads, x, y, lse, ent, sq, topk_idx, softcap or 0.0)

        cases.append(
            Case(
                "token_stats",
                "token_stats_bwd",
                label,
                make_bwd,
                lambda *args: _ops().token_stats_bwd(*args[:-1], 1.0, args[-1], 1.0, -100),
                2 * N * V * e + N * 8 + N * 4 * (6 + 2 * top_k) + N * 8 * top_k,
                ci=ci,
            )
        )
    return cases


def ratings_cases() -> list[Case]:
    from rlhf_kernels.ops.ratings import elo_ratings

    leagues, n, items = 256, 64, 16
    return [
        Case(
            "ratings",
            "elo_ratings",
            f"fp32 leagues={leagues} N={n} I={items}",
            lambda: (empty(leagues, n, dtype=torch.int64), empty(leagues, n, dtype=torch.int64)),
            lambda winners, losers: elo_ratings(winners, losers, items),
            leagues * (n * 2 * 8 + items * 4),
            ci=True,
        )
    ]


def linear_distill_loss_cases() -> list[Case]:
    rows = 215  # one CUDA chunk: two [rows, V] fp32 buffers in _fused_linear.CHUNK_BYTES_CUDA (256 MiB)
    cases = []
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        cases.append(
            Case(
                "linear_distill_loss",
                "linear_distill_rows",
                f"fp32 [{rows}, {V}] {divergence} +grad (in place)",
                lambda: (empty(rows, V), empty(rows, V), empty(rows, dtype=torch.int64), empty(1)),
                lambda s, t, y, g, d=divergence: _ops().linear_distill_rows(s, t, y, g, d, 0.5, -100, True),
                3 * rows * V * 4 + rows * 12,
                ci=divergence == "jsd",
            )
        )
    return cases


def sampling_logprobs_cases() -> list[Case]:
    from rlhf_kernels.ops.sampling_logprobs import sampling_logprobs

    cases = []
    for top_k, top_p in ((50, 0.9), (0, 0.95)):
        cases.append(
            Case(
                "sampling_logprobs",
                "sampling_logprobs",
                f"bf16 [{N}, {V}] top_k={top_k} top_p={top_p} +entropy",
                lambda: (empty(N, V, dtype=torch.bfloat16), empty(N, dtype=torch.int64)),
                lambda x, y, k=top_k, p=top_p: sampling_logprobs(
                    x, y, temperature=0.8, top_k=k, top_p=p, return_entropy=True
                ),
                # logits, labels; logprobs, entropy, mask mass, lse (fp32) and threshold (int64)
                N * V * 2 + N * 8 + 4 * N * 4 + N * 8,
                ci=top_k > 0,
            )
        )
    cases.append(
        Case(
            "sampling_logprobs",
            "sampling_logprobs_bwd",
            f"bf16 [{N}, {V}] +grad entropy",
            lambda: (
                *logprobs_bwd_args(empty(N, V, dtype=torch.bfloat16), True), empty(N, dtype=torch.int64)
            ),
            lambda g, ge, x, y, lse, ent, thr: _ops().sampling_logprobs_bwd(
                g, ge, x, y, lse, ent, thr, 1.25, -100
            ),
            2 * N * V * 2 + 2 * N * 8 + 4 * N * 4,
            ci=True,
        )
    )
    return cases


FAMILIES: dict[str, Callable[[], list[Case]]] = {
    "logprobs": logprobs_cases,
    "linear_logprobs": linear_logprobs_cases,
    "gae": gae_cases,
    "whiten": whiten_cases,
    "token_rewards": token_rewards_cases,
    "kl": kl_cases,
    "ppo_losses": ppo_losses_cases,
    "reward_losses": reward_losses_cases,
    "policy_losses": policy_losses_cases,
    "token_stats": token_stats_cases,
    "ratings": ratings_cases,
    "linear_distill_loss": linear_distill_loss_cases,
    "sampling_logprobs": sampling_logprobs_cases,
}
