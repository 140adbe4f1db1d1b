"""Ratings: the Elo scan and the Bradley–Terry fit, ours vs the eager tensor idioms of
``bench/baselines/ratings.py``.

Elo is sequential by definition: per comparison it reads two indices (and a score) and reads and writes
two ratings, so the minimal traffic is N·(2·8) bytes of int64 indices plus 2·I·4 bytes of ratings, and
the time is the latency chain of N dependent updates, not bandwidth.  Ours: the Triton kernel on CUDA,
the Python-float loop of ``ops/cpu/ratings.py`` on CPU; the baseline is a Python loop of 0-dim tensor ops.

Bradley–Terry: ``iters`` MM iterations; ours reads the N comparisons a few times per iteration (O(N)),
the dense baseline builds the I×I count matrix once and reads it per iteration (O(I²)).  Each
implementation is checked against the baseline before it is timed.
"""

from __future__ import annotations

import torch

from rlhf_kernels.ops.ratings import bradley_terry, elo_ratings

from .baselines import ratings as peers
from .harness import Bench

FAMILY = "ratings"
K, INITIAL, BT_ITERS = 32.0, 1000.0, 50


def comparisons(n: int, num_items: int, device: torch.device, seed: int = 0):
    """n comparisons of distinct uniformly drawn pairs (int64), winner first."""
    gen = torch.Generator().manual_seed(seed)
    winners = torch.randint(0, num_items, (n,), generator=gen)
    losers = (winners + torch.randint(1, num_items, (n,), generator=gen)) % num_items
    return winners.to(device), losers.to(device)


def _bench_elo(bench: Bench, n: int, num_items: int) -> None:
    winners, losers = comparisons(n, num_items, bench.device)
    case = f"elo N={n} I={num_items}"
    traffic = n * 16 + 2 * num_items * 4
    eager = "eager tensor loop"
    expected = peers.elo_tensor_loop(winners, losers, num_items, K, INITIAL)
    torch.testing.assert_close(elo_ratings(winners, losers, num_items, k=K).double(), expected,
                               rtol=1e-6, atol=1e-3)
    bench.measure(FAMILY, case, eager, "fwd",
                  lambda: peers.elo_tensor_loop(winners, losers, num_items, K, INITIAL), bytes_moved=traffic)
    bench.measure(FAMILY, case, "rlhf_kernels", "fwd", lambda: elo_ratings(winners, losers, num_items, k=K),
                  bytes_moved=traffic, baseline=eager)


def _bench_bradley_terry(bench: Bench, n: int, num_items: int) -> None:
    winners, losers = comparisons(n, num_items, bench.device, seed=1)
    case = f"bradley_terry N={n} I={num_items} iters={BT_ITERS}"
    dense = "eager dense-matrix MM"
    expected = peers.bradley_terry_dense_mm(winners, losers, num_items, BT_ITERS)
    ours = bradley_terry(winners, losers, num_items, iters=BT_ITERS, tol=0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    bench.measure(FAMILY, case, dense, "fwd",
                  lambda: peers.bradley_terry_dense_mm(winners, losers, num_items, BT_ITERS))
    bench.measure(FAMILY, case, "rlhf_kernels", "fwd",
                  lambda: bradley_terry(winners, losers, num_items, iters=BT_ITERS, tol=0.0), baseline=dense)


def run(bench: Bench) -> None:
    cuda = bench.device.type == "cuda"
    elo_cases = [(1000, 64), (10000, 1000)] if cuda or not bench.quick else [(1000, 64), (4000, 1000)]
    for n, num_items in elo_cases:
        _bench_elo(bench, n, num_items)
    for n, num_items in ([(10000, 100), (1 << 20, 4096)] if cuda else [(10000, 100), (100000, 1000)]):
        _bench_bradley_terry(bench, n, num_items)
