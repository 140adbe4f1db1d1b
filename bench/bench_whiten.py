"""Masked whitening: ours vs verl's eager ``masked_whiten``.

Minimal traffic (fp32 x, bool mask, fp32 out): the statistics read x and the mask twice (the mean,
then the second moment about it), the output pass reads them once more and writes fp32:
3·B·T·(4 + 1) + B·T·4 bytes.
"""

from __future__ import annotations

from rlhf_kernels.ops.whiten import masked_whiten

from .baselines.whiten import verl_masked_whiten
from .bench_gae import inputs, shapes
from .harness import Bench

FAMILY = "whiten"


def _bench_whiten(bench: Bench, B: int, T: int) -> None:
    _, values, mask = inputs(B, T, bench.device)
    case = f"whiten B={B} T={T}"
    traffic = 3 * B * T * (4 + 1) + B * T * 4
    bench.measure(FAMILY, case, "verl_masked_whiten", "fwd", lambda: verl_masked_whiten(values, mask),
                  bytes_moved=traffic)
    bench.measure(FAMILY, case, "rlhf_kernels", "fwd", lambda: masked_whiten(values, mask),
                  bytes_moved=traffic, baseline="verl_masked_whiten")


def run(bench: Bench) -> None:
    for B, T in shapes(bench)[-2:]:
        _bench_whiten(bench, B, T)
