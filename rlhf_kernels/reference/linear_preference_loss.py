"""Float64 oracle of the fused preference losses: the [S, T, V] logits materialised in float64, per-sequence
sums of the label log-probabilities, then the float64 sequence-level oracles of
:mod:`rlhf_kernels.reference.preference_losses` (layout: docs/linear_preference_loss.md)."""

from __future__ import annotations

import torch

from . import preference_losses as seq


def sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100):
    """([S] Σ_t log p(y_t) over the counted tokens, [S] number of counted tokens) in float64."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_p = torch.log_softmax(logits, dim=-1)
    counted = labels != ignore_index
    index = torch.where(counted, labels, 0).long().unsqueeze(-1)
    token = torch.where(counted, log_p.gather(-1, index).squeeze(-1), 0.0)
    return token.sum(dim=-1), counted.sum(dim=-1).double()


def linear_preference_loss(
    hidden, weight, labels, *, loss="dpo", bias=None, ref_logps=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, desirable=None, ignore_index=-100, **loss_kwargs,
):
    """(loss, metrics) in float64, differentiable with respect to hidden, weight and bias."""
    logps, lengths = sequence_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logps, _ = sequence_logps(ref_hidden, ref_weight, labels, bias=ref_bias,
                                          ignore_index=ignore_index)
    ref = None if ref_logps is None else ref_logps.double()
    if loss == "kto":
        return seq.kto_loss(logps, ref, desirable, **loss_kwargs)
    b = logps.shape[0] // 2
    chosen, rejected, n_chosen, n_rejected = logps[:b], logps[b:], lengths[:b], lengths[b:]
    if loss == "dpo":
        refs = (None, None) if ref is None else (ref[:b], ref[b:])
        return seq.dpo_loss(chosen, rejected, *refs, chosen_lengths=n_chosen, rejected_lengths=n_rejected,
                            **loss_kwargs)
    fn = {"simpo": seq.simpo_loss, "cpo": seq.cpo_loss, "orpo": seq.orpo_loss}[loss]
    return fn(chosen, rejected, n_chosen, n_rejected, **loss_kwargs)
