"""Passes over the row that the ``sampling_logprobs`` forward kernel makes, counted by replaying its
threshold search (``_radix_select`` in ``rlhf_kernels/ops/sampling_logprobs.py``: 4 bits per pass,
digits shared by the lower bound and the row maximum skipped, a count stopped once the candidate holds
exactly k keys) on CPU keys.  No GPU and no interpreter: the counts are what a GPU run would do.

    python -m bench.sampling_logprobs_passes

Also checks that each replayed top-k threshold keeps the same set as the exact k-th key.
"""

from __future__ import annotations

import math

import torch

from rlhf_kernels.ops.cpu.sampling_logprobs import sort_keys

from .bench_sampling_logprobs import TEMPERATURE, _logits

RADIX_BITS, KEY_BITS = 4, 32
SMALLEST = -(1 << (KEY_BITS - 1))


def _search(keys: torch.Tensor, e: torch.Tensor, floor: int, ceiling: int, target: float, by_mass: bool):
    """(threshold key, passes) of one row's search, as the kernel runs it (fp32 keys)."""
    prefix, passes, done, unscaled = SMALLEST, 0, False, True
    digits = torch.arange(1 << RADIX_BITS)
    weights = torch.where(keys >= floor, e, 0.0) if by_mass else torch.ones_like(e)
    for level in range(KEY_BITS // RADIX_BITS):
        shift = KEY_BITS - RADIX_BITS * (level + 1)
        shared = (floor ^ ceiling) >> shift == 0
        searched = not (shared or done)
        totals = torch.zeros(1 << RADIX_BITS, dtype=torch.float64)
        if searched:
            passes += 1
            above = keys[None, :] >= prefix + (digits[:, None] << shift)
            totals = torch.where(above, weights[None, :], 0.0).sum(-1)
            if by_mass and unscaled:
                target, unscaled = target * float(totals[0]), False
        chosen = int(torch.where(totals >= target, digits, 0).max())
        if searched and not by_mass and float(totals[chosen]) == target:
            done = True
        if not searched:
            chosen = ((floor - SMALLEST) >> shift) & ((1 << RADIX_BITS) - 1) if shared else 0
        prefix += chosen << shift
    return prefix, passes


def row_passes(row: torch.Tensor, top_k: int, top_p: float) -> int:
    """Reads of the row: max pass + the searches + the lse pass."""
    x = row.float() / TEMPERATURE
    m = x.max()
    keys = sort_keys(x).long()
    e = (x - m).exp().double()
    floor, ceiling = int(sort_keys(torch.tensor(-math.inf))), int(sort_keys(m))
    passes = 2
    if top_k:
        kth, n = _search(keys, e, floor, ceiling, float(top_k), False)
        exact = keys.sort(descending=True).values[top_k - 1]
        assert torch.equal(keys >= kth, keys >= exact), "the replayed top-k keeps another set"
        floor, passes = max(floor, kth), passes + n
    if top_p < 1.0:
        passes += _search(keys, e, floor, ceiling, top_p, True)[1]
    return passes


def main() -> None:
    torch.manual_seed(0)
    rows, vocab = 4, 151936
    for kind, peaked in (("randn", False), ("peaked", True)):
        logits = _logits(rows, vocab, torch.float32, torch.device("cpu"), peaked)
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype)
            for top_k, top_p in ((50, 1.0), (50, 0.9), (0, 0.9)):
                counts = [row_passes(x[r], top_k, top_p) for r in range(rows)]
                most = 2 + 8 * (top_k > 0) + 8 * (top_p < 1.0)
                case = f"{kind:6s} {str(dtype)[6:]:8s} top_k={top_k:2d} top_p={top_p}"
                print(f"{case}: passes {counts} (at most {most})")


if __name__ == "__main__":
    main()
