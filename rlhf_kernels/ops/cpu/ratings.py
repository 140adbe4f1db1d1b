"""The PyTorch path of the Elo scan: ``elo_ratings_torch`` (a loop over Python floats).

The math is documented in ``rlhf_kernels/ops/ratings.py``.  An Elo scan is sequential by definition, and
each step touches two ratings, so per-step tensor ops cost far more than the arithmetic: on the 2-core
machine (``python -m bench --cpu --quick --families ratings``, docs/ratings.md) this loop over Python
floats ran 1,000 comparisons in 0.24 ms, a loop of 0-dim tensor ops in 40.7 ms.  The loop reads the
comparisons with ``tolist()``, so on a CUDA tensor (a forced ``torch`` backend) it synchronises: the
Triton kernel is the CUDA path.
"""

from __future__ import annotations

import math

import torch

from ..._registration import torch_op


def elo_scan_lists(
    ratings: list[float], winners: list[int], losers: list[int], scores: list[float] | None,
    k: float, scale: float,
) -> list[float]:
    """Sequential Elo updates of ``ratings`` (a list, updated in place and returned), in Python floats.

    Comparisons whose index is outside [0, len(ratings)) or whose two items are the same are skipped.
    """
    num_items = len(ratings)
    for i, (w, l) in enumerate(zip(winners, losers)):
        if not (0 <= w < num_items and 0 <= l < num_items) or w == l:
            continue
        r_w, r_l = ratings[w], ratings[l]
        x = (r_l - r_w) * scale
        # 1 / (1 + e^x) without overflow for a large gap (NaN fails the comparison and stays NaN)
        expected = 0.0 if x > 700.0 else 1.0 / (1.0 + math.exp(x))
        delta = k * ((1.0 if scores is None else scores[i]) - expected)
        ratings[w] = r_w + delta
        ratings[l] = r_l - delta
    return ratings


def _elo(
    initial: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, scores: torch.Tensor | None,
    k: float, scale: float,
) -> torch.Tensor:
    """initial [L, I] float, winners / losers [L, N] int, scores [L, N] or None -> ratings [L, I]."""
    rows = initial.double().tolist()
    w_rows, l_rows = winners.tolist(), losers.tolist()
    s_rows = scores.double().tolist() if scores is not None else [None] * len(rows)
    out = [elo_scan_lists(r, w, l, s, k, scale) for r, w, l, s in zip(rows, w_rows, l_rows, s_rows)]
    return torch.tensor(out, dtype=initial.dtype).reshape(initial.shape).to(initial.device)


def _elo_fake(initial, winners, losers, scores, k, scale):
    return torch.empty_like(initial)


elo_ratings_torch = torch_op("elo_ratings_torch", _elo, fake=_elo_fake)
