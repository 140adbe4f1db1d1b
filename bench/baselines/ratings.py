"""Eager idioms of the Elo scan and the Bradley–Terry fit, written the way a trainer would with tensors.

``elo_tensor_loop``: the scan as a Python loop of 0-dim tensor ops (a dozen small ops per comparison).
``bradley_terry_dense_mm``: Hunter's MM on a dense I×I count matrix (the textbook / ``choix``-style
formulation: O(I²) per iteration), with the same prior and anchoring as ``rlhf_kernels``.
"""

from __future__ import annotations

import torch


def elo_tensor_loop(winners: torch.Tensor, losers: torch.Tensor, num_items: int, k: float,
                    initial: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """[N] comparisons -> [I] float64 ratings (no padding: every index must be a valid, distinct pair
    or is skipped by a data-dependent branch, which synchronises a CUDA device)."""
    ratings = torch.full((num_items,), float(initial), dtype=torch.float64, device=winners.device)
    for c in range(winners.numel()):
        w, l = winners[c], losers[c]
        if not (0 <= w < num_items and 0 <= l < num_items) or w == l:
            continue
        expected = 1.0 / (1.0 + 10.0 ** ((ratings[l] - ratings[w]) / 400.0))
        delta = k * ((1.0 if scores is None else scores[c].double()) - expected)
        ratings[w] += delta
        ratings[l] -= delta
    return ratings


def bradley_terry_dense_mm(winners: torch.Tensor, losers: torch.Tensor, num_items: int, iters: int,
                           prior: float = 1.0) -> torch.Tensor:
    """[N] comparisons (all valid) -> [I] centred log-strengths, fp32, ``iters`` MM steps on the count
    matrix n_ij (plus one Newton step on the common shift per iteration, as rlhf_kernels does)."""
    device = winners.device
    wins = torch.zeros(num_items, num_items, device=device)
    wins.index_put_((winners, losers), torch.ones(winners.numel(), device=device), accumulate=True)
    games = wins + wins.T
    won = wins.sum(1) + prior
    theta = torch.zeros(num_items, device=device)
    for _ in range(iters):
        p = theta.exp()
        denom = (games / (p[:, None] + p[None, :])).sum(1) + 2 * prior / (p + 1)
        theta = won.log() - denom.log()
        sig = torch.sigmoid(theta)
        theta = theta + (1 - 2 * sig).sum() / (2 * sig * (1 - sig)).sum()
    theta = theta - theta.mean()
    return theta
