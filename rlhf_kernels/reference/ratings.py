"""Float64 oracles of the Elo scan and the Bradley–Terry fit.

Elo: a plain Python loop with the textbook formula 10^((R_l − R_w)/400).  Bradley–Terry: Newton's method
on the penalised log-likelihood (a different algorithm from the op's MM iteration, same objective),
with a dense Hessian, iterated to convergence.
"""

from __future__ import annotations

import math

import torch


def _rows(x):
    x = x.detach().cpu()
    return [x.tolist()] if x.dim() == 1 else x.tolist()


def _initial_rows(initial, leagues, num_items):
    if not isinstance(initial, torch.Tensor):
        return [[float(initial)] * num_items for _ in range(leagues)]
    init = initial.detach().double().cpu()
    return [init.tolist()] * leagues if init.dim() == 1 else init.tolist()


def elo_ratings(winners, losers, num_items, *, k=32.0, initial=1000.0, scores=None, dtype=None):
    w_rows, l_rows = _rows(winners), _rows(losers)
    s_rows = _rows(scores.double()) if scores is not None else [None] * len(w_rows)
    out = []
    for r, ws, ls, ss in zip(_initial_rows(initial, len(w_rows), num_items), w_rows, l_rows, s_rows):
        r = list(r)
        for c in range(len(ws)):
            a, b = ws[c], ls[c]
            if a < 0 or b < 0 or a >= num_items or b >= num_items or a == b:
                continue
            gap = (r[b] - r[a]) / 400.0
            expected = 0.0 if gap > 300 else 1.0 / (1.0 + 10.0 ** gap)
            score = 1.0 if ss is None else ss[c]
            change = k * (score - expected)
            r[a] += change
            r[b] -= change
        out.append(r)
    result = torch.tensor(out, dtype=torch.float64).reshape(len(w_rows), num_items)
    return result if winners.dim() == 2 else result[0]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def _fit_league(ws, ls, ss, num_items, prior, newton_iters=200):
    """MAP θ maximising Σ_c [s log σ(θ_w − θ_l) + (1 − s) log σ(θ_l − θ_w)]
    + α Σ_i [log σ(θ_i) + log σ(−θ_i)],
    by Newton's method (pseudo-inverse of the Hessian for α = 0, whose null space is the constant
    shift), then centred over the items that played."""
    pairs = [(a, b, 1.0 if ss is None else ss[c]) for c, (a, b) in enumerate(zip(ws, ls))
             if 0 <= a < num_items and 0 <= b < num_items and a != b]
    played = sorted({i for a, b, _ in pairs for i in (a, b)})
    theta = [0.0] * num_items
    for _ in range(newton_iters):
        grad = [0.0] * num_items
        hess = [[0.0] * num_items for _ in range(num_items)]
        for a, b, s in pairs:
            p = _sigmoid(theta[a] - theta[b])
            g = s - p
            grad[a] += g
            grad[b] -= g
            h = p * (1 - p)
            hess[a][a] -= h
            hess[b][b] -= h
            hess[a][b] += h
            hess[b][a] += h
        for i in played:
            p = _sigmoid(theta[i])
            grad[i] += prior * (1 - 2 * p)
            hess[i][i] -= 2 * prior * p * (1 - p)
        idx = torch.tensor(played, dtype=torch.long)
        g = torch.tensor(grad, dtype=torch.float64)[idx]
        h = torch.tensor(hess, dtype=torch.float64)[idx][:, idx]
        step = -(torch.linalg.pinv(h) @ g)
        for j, i in enumerate(played):
            theta[i] += float(step[j])
        if float(step.abs().max()) < 1e-14 if len(played) else True:
            break
    if played:
        mean = sum(theta[i] for i in played) / num_items
        theta = [t - mean if i in played else -mean for i, t in enumerate(theta)]
    return theta


def bradley_terry(winners, losers, num_items, *, scores=None, iters=200, tol=1e-6, prior=1.0, scale="log",
                  dtype=None):
    """The converged MAP fit (``iters`` and ``tol`` only bound the op's iteration)."""
    w_rows, l_rows = _rows(winners), _rows(losers)
    s_rows = _rows(scores.double()) if scores is not None else [None] * len(w_rows)
    out = [_fit_league(w, l, s, num_items, prior) for w, l, s in zip(w_rows, l_rows, s_rows)]
    result = torch.tensor(out, dtype=torch.float64).reshape(len(w_rows), num_items)
    if scale == "elo":
        result = 1000.0 + result * 400.0 / math.log(10.0)
    return result if winners.dim() == 2 else result[0]
