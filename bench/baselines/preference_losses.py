"""TRL 1.16's eager preference-loss idioms: its per-loss-type lines (``DPOTrainer._compute_loss``,
``KTOTrainer._compute_loss``) lifted out of the trainers so they run without a model, at β = BETA.  The tests
compare ours with the real trainer code (tests/test_preference_losses_peers.py); the benchmark times these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BETA = 0.1


def trl_dpo_sigmoid(chosen, rejected, ref_chosen, ref_rejected):
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(BETA * delta).mean()


def trl_mpo(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths):
    """TRL's MPO combination: sigmoid 0.8, bco_pair 0.2, sft 1.0 (the sft term from summed log-probs)."""
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    sigmoid = -F.logsigmoid(BETA * (chosen_logratios - rejected_logratios))
    bco = -F.logsigmoid(BETA * chosen_logratios) - F.logsigmoid(-BETA * rejected_logratios)
    sft = -chosen.sum() / chosen_lengths.sum()
    return 0.8 * sigmoid.mean() + 0.2 * bco.mean() + sft


def trl_kto(policy, ref, desirable, kl_policy, kl_ref):
    kl = (kl_policy - kl_ref).mean().detach().clamp(min=0)
    logratios = policy - ref
    chosen_losses = 1 - torch.sigmoid(BETA * (logratios[desirable] - kl))
    rejected_losses = 1 - torch.sigmoid(BETA * (kl - logratios[~desirable]))
    return torch.cat((chosen_losses, rejected_losses)).nanmean()
