"""Thin adapters over the float64 oracles of ``rlhf_kernels/reference`` where an oracle itself hides a
NaN (each marked with the finding of issue 19 it works around, and the fix reported for the oracle)."""

from __future__ import annotations

import torch

from rlhf_kernels.reference import logprobs as ref_logprobs


def _nan_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows whose softmax is undefined: a NaN or +inf logit, or every logit −inf (the library gives NaN)."""
    z = logits.double() / temperature
    return (z.isnan() | (z == torch.inf)).any(-1) | (z == -torch.inf).all(-1)


def entropy_with_nan(logits: torch.Tensor, entropy: torch.Tensor, temperature: float) -> torch.Tensor:
    """FINDING (issue 19): ``reference/logprobs.py`` computes −Σ where(p > 0, p log p, 0), which turns a
    NaN p (a NaN or +inf logit, or a row of −inf) into a hidden 0.  Fix reported for the oracle:
    ``torch.where(p == 0, 0, p * log_p)``.  Until then the NaN rows are restored here."""
    return torch.where(_nan_rows(logits, temperature), torch.nan, entropy)


def logprobs_oracle(logits, labels, *, temperature, ignore_index, return_entropy):
    out = ref_logprobs.logprobs_from_logits(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
    if not return_entropy:
        return [out]
    logprobs, entropy = out
    entropy = entropy_with_nan(logits, entropy, temperature).masked_fill(labels == ignore_index, 0.0)
    return [logprobs, entropy]


def logprobs_grad_oracle(logits, labels, grad_logprobs, grad_entropy, *, temperature, ignore_index):
    """``reference.logprobs.logprobs_grad`` with the label column as minus the sum of the others.

    FINDING (long fuzz profile, V = 2): the oracle forms g·(one_hot − p), and float64 rounds p_y to 1
    once 1 − p_y < 1.1e-16 (logits [0, −37], label 0: 0 where the gradient is 8.5e-17·g) and keeps
    only the digits of 1 − p_y above 1e-16 (logits [3, −30]: 4.66294e-15 for 4.65889e-15).  The gradient
    row sums to 0, so its label column is −Σ_{j≠y} of the others, exact in float64 (the library's
    backward computes it so where p_y > 1/2).  Fix reported for ``reference/logprobs.py``
    ``logprobs_grad``: the same two lines.  Until then it is applied here (a no-op on an oracle that has
    it)."""
    grad = ref_logprobs.logprobs_grad(logits, labels, grad_logprobs, grad_entropy,
                                      temperature=temperature, ignore_index=ignore_index)
    return exact_label_column(grad, labels, ignore_index)


def exact_label_column(grad, labels, ignore_index, where=None):
    """``grad`` [..., V] (float64) with its label column, in rows with a label (and ``where``, [...]),
    as minus the sum of the other columns: exact where the oracle's one_hot − p rounds (above).  NaN
    stays NaN (a one-column row has no other column to carry it)."""
    own = (labels != ignore_index) & (labels >= 0) & (labels < grad.shape[-1])
    if where is not None:
        own &= where
    column = labels.clamp(0, max(grad.shape[-1] - 1, 0)).long().unsqueeze(-1)
    rest = grad.scatter(-1, column, 0.0).sum(-1, keepdim=True)
    at_label = grad.gather(-1, column)
    return grad.scatter(-1, column, torch.where(own.unsqueeze(-1) & ~at_label.isnan(), -rest, at_label))


def kl_penalty_oracle(logprobs, ref_logprobs, estimator="k1", *, old_logprobs=None):
    """``reference.kl.kl_penalty`` with its straight-through sum parenthesised.

    FINDING (issue 19): the oracle writes ``value + w·k2 − (w·k2).detach()``; for |lp − ref| ≳ 1e8 the
    term w·k2 ≈ 5·(lp − ref)² is so large that value + w·k2 − w·k2 rounds to 0 in float64 (lp = 1e30,
    ref ≈ 0 gives 0 instead of 1e30), while the library gives 1e30.  Fix reported for
    ``reference/kl.py``: ``value + (w * k2 - (w * k2).detach())`` (or, as here, an explicit straight-through
    function, which also gives the finite value at lp = ±inf where s − s.detach() is inf − inf = NaN)."""
    from rlhf_kernels.reference import kl as ref_kl

    if not (estimator.endswith("+") or old_logprobs is not None):
        return ref_kl.kl_penalty(logprobs, ref_logprobs, estimator)
    value = ref_kl.kl_penalty(logprobs, ref_logprobs, estimator.rstrip("+")).detach()
    k2 = ref_kl.kl_penalty(logprobs, ref_logprobs, "k2")
    w = 1.0
    if old_logprobs is not None:
        w = torch.clamp(torch.exp(logprobs.double() - old_logprobs.double()), max=10.0).detach()
    return _StraightThrough.apply(value, w * k2)


class _StraightThrough(torch.autograd.Function):
    """The value of ``value``, the gradient of ``surrogate``: value + (s − s.detach()) without the
    arithmetic (inf − inf = NaN for lp = ±inf, where the forward value is finite)."""

    @staticmethod
    def forward(ctx, value, surrogate):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def kl_loss_oracle(logprobs, ref_logprobs, mask, *, estimator="k3", loss_agg="token-mean", normalizer=None,
                   old_logprobs=None):
    from rlhf_kernels.reference import aggregation as ref_agg

    per_token = kl_penalty_oracle(logprobs, ref_logprobs, estimator, old_logprobs=old_logprobs)
    return ref_agg.agg_loss(per_token, mask, loss_agg, normalizer)


def bradley_terry_oracle(winners, losers, num_items, *, scores=None, prior=1.0, scale="log"):
    """``reference.ratings.bradley_terry`` league by league, with two corrections.

    FINDING (this session): the oracle raises ``IndexError`` (``torch.tensor([])[idx][:, idx]``) for a
    league in which no valid comparison exists (num_items = 0, no comparisons, or only out-of-range /
    self-comparisons); such a league's strengths are 0 (ELO_CENTER on the Elo scale), as the op returns.
    Fix reported for ``reference/ratings.py``: return the zero θ when ``played`` is empty.
    A NaN score among a league's valid comparisons: the oracle's Newton steps turn NaN and its centring
    spreads the NaN to items that never played; the op gives NaN to the items that played and keeps the
    documented 0 for the others (their strength does not depend on the NaN) — taken as the spec here."""
    import math

    from rlhf_kernels.reference import ratings as ref_ratings

    batched = winners.dim() == 2
    w_rows, l_rows = (winners, losers) if batched else (winners[None], losers[None])
    s_rows = None if scores is None else (scores if batched else scores[None])
    center = 1000.0 if scale == "elo" else 0.0
    out = []
    for i in range(w_rows.shape[0]):
        w, l = w_rows[i], l_rows[i]
        valid = (w >= 0) & (w < num_items) & (l >= 0) & (l < num_items) & (w != l)
        row = torch.full((num_items,), center, dtype=torch.float64)
        if not bool(valid.any()):
            out.append(row)
            continue
        s = None if s_rows is None else s_rows[i]
        if s is not None and bool(s[valid].isnan().any()):
            played = torch.zeros(num_items, dtype=torch.bool)
            played[w[valid].long()] = True
            played[l[valid].long()] = True
            out.append(row.masked_fill(played, math.nan))
            continue
        out.append(ref_ratings.bradley_terry(w, l, num_items, scores=s, prior=prior, scale=scale))
    result = torch.stack(out) if out else torch.zeros(0, num_items, dtype=torch.float64)
    return result if batched else result[0]


def ignored_rows_zeroed(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The float64 leaf an oracle reads for ``x`` [..., D] (logits or hidden states), with the rows whose
    label is ``ignore_index`` set to 0.

    FINDING (this session): the oracles of sampling_logprobs, linear_logprobs / linear_token_stats and
    linear_distill_loss mask an ignored position's *output* (masked_fill / where) but differentiate
    through its row all the same: a NaN in an ignored row comes back as a NaN gradient (0 · NaN in the
    log-softmax backward), where the ops give the documented exact 0 ("ignored positions receive zero
    gradient", they are never projected).  An ignored row's values never matter, so the oracle reads
    zeros there.  Fix reported for the oracles: select the row's input (``torch.where(ignored, 0, x)``)
    before the softmax."""
    ignored = (labels == ignore_index).unsqueeze(-1)
    return torch.where(ignored, 0.0, x.detach().double()).requires_grad_(True)


def distill_oracle(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                   student_bias=None, teacher_bias=None, temperature=1.0, ignore_index=-100, **kwargs):
    """``reference.linear_distill_loss`` with the NaN of a counted token's undefined softmax restored.

    FINDING (this session): the oracle's ``_kl`` keeps the entries with ``log_p > -inf``, which is False
    for NaN: a student row whose log-softmax is NaN (a NaN or +inf logit from a NaN / inf hidden state)
    counts as "probability 0 everywhere" under reverse KL (and JSD's student half), and the loss comes
    out a finite number (0 for V = 1) where the op gives NaN.  Fix reported for
    ``reference/linear_distill_loss.py``: ``present = ~(log_p == -inf)`` (NaN stays in the sum)."""
    from rlhf_kernels.reference import linear_distill_loss as ref_distill

    loss = ref_distill.linear_distill_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=student_bias,
        teacher_bias=teacher_bias, temperature=temperature, ignore_index=ignore_index, **kwargs)
    undefined = torch.zeros(student_hidden.shape[:-1], dtype=torch.bool)
    for hidden, weight, bias in ((student_hidden, student_weight, student_bias),
                                 (teacher_hidden, teacher_weight, teacher_bias)):
        logits = hidden.detach().double() @ weight.detach().double().T
        if bias is not None:
            logits = logits + bias.detach().double()
        undefined |= torch.log_softmax(logits / temperature, dim=-1).isnan().any(-1)
    if labels is not None:
        undefined &= labels != ignore_index
    return torch.where(undefined.any(), torch.nan, loss)


def sampling_oracle(logits, labels, *, temperature=1.0, ignore_index=-100, **kwargs):
    """``reference.sampling_logprobs`` with the library's NaN rows (``_nan_rows``: a NaN or +inf logit, or
    only −inf) NaN in every output except at ignored positions.

    FINDING (this session): for a row holding +inf the oracle's outputs depend on the filters (a label
    outside the kept set gets −inf, the kept +inf entry inf − inf = NaN), while the op gives NaN for the
    whole row, as logprobs_from_logits does for a softmax that does not exist.  Fix reported for
    ``reference/sampling_logprobs.py``: ``row_nan`` to include rows holding +inf."""
    from rlhf_kernels.reference import sampling_logprobs as ref_sampling

    out = ref_sampling.sampling_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                         **kwargs)
    outputs = [out] if isinstance(out, torch.Tensor) else list(out)
    undefined = _nan_rows(logits, temperature) & (labels != ignore_index)
    return [torch.where(undefined, torch.nan, o) for o in outputs]
