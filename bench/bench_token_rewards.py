"""Token-level rewards (KL reward shaping): ours vs verl's eager ``apply_kl_penalty``.

Minimal traffic (fp32 log-probs and reference log-probs, bool mask, fp32 rewards): read
B·T·(4 + 4 + 1) bytes, write B·T·4.
"""

from __future__ import annotations

from rlhf_kernels.ops.token_rewards import token_level_rewards

from .baselines.token_rewards import verl_token_level_rewards
from .bench_gae import inputs, shapes
from .harness import Bench

FAMILY = "token_rewards"
KL_COEF = 0.05


def _bench_token_rewards(bench: Bench, B: int, T: int) -> None:
    logprobs, ref_logprobs, mask = inputs(B, T, bench.device)
    scores = logprobs[:, 0].contiguous()
    case = f"kl_rewards B={B} T={T}"
    traffic = B * T * (4 + 4 + 1 + 4)
    bench.measure(FAMILY, case, "verl_apply_kl_penalty", "fwd",
                  lambda: verl_token_level_rewards(scores, logprobs, ref_logprobs, mask, KL_COEF),
                  bytes_moved=traffic)
    bench.measure(FAMILY, case, "rlhf_kernels", "fwd",
                  lambda: token_level_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=KL_COEF),
                  bytes_moved=traffic, baseline="verl_apply_kl_penalty")


def run(bench: Bench) -> None:
    for B, T in shapes(bench)[-2:]:
        _bench_token_rewards(bench, B, T)
