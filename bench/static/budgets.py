"""Register budgets per kernel (registers per thread on sm_90), each with the reason it is what it is.

A budget is the most registers a kernel may use while still getting the residency its launch
configuration relies on; ``tests/test_static.py`` fails when a compiled specialisation exceeds it or
spills at all.  The arithmetic: 65536 registers per SM, allocated per warp in units of 256, so r
registers per thread leave floor(65536 / (32·r rounded up to 256)) warps per SM: 64 → 32 warps,
128 → 16 warps, 255 → 8 warps.

Specialisations computing in fp64 (fp64 inputs) get :data:`FP64`: they are the correctness path
(float64 oracles, gradcheck), not a speed target, so they only must not spill.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    registers: int
    reason: str


# Streaming kernels: HBM at 4.8 TB/s with ~0.7 µs latency needs ~3.4 MB in flight, ~25 KiB per SM over
# 132 SMs; 16 resident warps with two to four independent 16-byte loads per thread hold that.
STREAM = Budget(
    128, "streaming: ≥ 16 warps per SM (2 × 16-B loads/thread in flight cover ~25 KiB/SM of HBM latency)"
)
# One logits row per CTA of 8 warps, streamed in 4096-element blocks: 8 KiB (bf16) per CTA in flight.
ROW = Budget(
    64, "one row per 8-warp CTA streaming 8 KiB blocks: ≥ 4 CTAs (32 warps) per SM to keep ~25 KiB in flight"
)
# Tensor-core tiles: a 128 × 128 fp32 accumulator over 256 threads is 64 registers a thread before the
# softmax epilogue's temporaries; 1 CTA of 8 warps per SM is the design (2 would need ≤ 128).
TILE = Budget(
    255, "128×128 tensor-core tile, 1 CTA of 8 warps per SM by design: any count up to 255, but no spills"
)
FP64 = Budget(255, "fp64 correctness path: no speed target, no spills")
# token_stats' top-k keeps a row's k best (log p, index) pairs in registers beside a 1024-element block
# over 4 warps: 96 leaves 5 CTAs (20 warps) per SM.
TOP_K = Budget(
    96, "row streaming with the k best (log p, index) pairs in registers: 5 CTAs of 4 warps per SM"
)


@dataclass(frozen=True)
class WhenSet:
    """A budget that depends on a constexpr: ``if_set`` when ``name`` is truthy, else ``otherwise``."""

    name: str
    if_set: Budget
    otherwise: Budget

    def __call__(self, constexprs: dict) -> Budget:
        return self.if_set if constexprs.get(self.name) else self.otherwise


# kernel -> its Budget, or a WhenSet choosing one from the launch's constexprs.
BUDGETS: dict[str, Budget | WhenSet] = {
    "_logprobs_fwd_kernel": ROW,
    "_logprobs_bwd_kernel": ROW,
    "_token_stats_fwd_kernel": WhenSet("TOP_K", TOP_K, ROW),
    "_token_stats_bwd_kernel": ROW,
    "_linear_logprobs_fwd_kernel": TILE,
    "_linear_logprobs_bwd_kernel": TILE,
    # A scan over T, B/BLOCK_B programs: at B = 256 that is 128 programs, fewer than the SMs, so registers
    # do not limit residency there; at B = 1024 (512 programs) 3 CTAs per SM (≤ 168) keep it to 1.3 waves.
    "_gae_fwd_kernel": Budget(
        168, "scan: 3 CTAs of 4 warps per SM, so B = 1024 (512 programs) runs in 1.3 waves"
    ),
    "_whiten_pivot_kernel": STREAM,
    "_whiten_moments_kernel": STREAM,
    "_whiten_apply_kernel": STREAM,
    "_token_rewards_fwd_kernel": STREAM,
    "_kl_penalty_fwd_kernel": STREAM,
    "_kl_penalty_bwd_kernel": STREAM,
    "_ppo_policy_loss_fwd_kernel": STREAM,
    "_ppo_policy_loss_bwd_kernel": STREAM,
    "_ppo_value_loss_fwd_kernel": STREAM,
    "_ppo_value_loss_bwd_kernel": STREAM,
    "_policy_loss_token_fwd_kernel": STREAM,
    "_policy_loss_token_bwd_kernel": STREAM,
    "_pairwise_reward_fwd_kernel": STREAM,
    "_pairwise_reward_bwd_kernel": STREAM,
    "_pointwise_reward_fwd_kernel": STREAM,
    "_pointwise_reward_bwd_kernel": STREAM,
    # One prompt per CTA; PAIRS_PER_THREAD sizes the warps so a thread holds ≤ 16 of the K × K pairs.
    "_ranking_fwd_kernel": Budget(128, "pair tiles, 8 warps at K = 64: 2 CTAs per SM"),
    "_ranking_bwd_kernel": Budget(128, "pair tiles, 8 warps at K = 64: 2 CTAs per SM"),
    # One 1-warp program per league looping over its comparisons: latency-bound, no residency target.
    "_linear_distill_rows_kernel": ROW,
    "_linear_logprobs_grad_hidden_kernel": TILE,
    "_sampling_logprobs_fwd_kernel": Budget(
        96, "row selection: a [16, 1024] comparison tile per pass; 3 CTAs of 8 warps per SM"
    ),
    "_sampling_logprobs_bwd_kernel": ROW,
    "_elo_fwd_kernel": Budget(64, "sequential Elo scan, one 1-warp program per league: latency-bound"),
}


def budget_for(kernel: str, fp64: bool, constexprs: dict | None = None) -> Budget | None:
    """The budget of ``kernel`` (None when it has none: a new kernel must be given one here)."""
    if kernel not in BUDGETS:
        return None
    if fp64:
        return FP64
    budget = BUDGETS[kernel]
    return budget if isinstance(budget, Budget) else budget(constexprs or {})
