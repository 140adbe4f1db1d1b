"""The preference losses against the real TRL 1.16 and OpenRLHF 0.11.2 code: values, metrics and gradients.

TRL 1.16 computes its losses inside trainer methods, not free functions, so each test calls the real
method unbound, with a ``SimpleNamespace`` standing in for the trainer that holds only the attributes the
method reads (documented per test), and a stand-in model whose per-token log-probs are a leaf tensor:

- ``DPOTrainer._compute_loss`` and ``KTOTrainer._compute_loss`` (the whole loss and its logged metrics;
  ``precompute_ref_log_probs=True``, so the reference log-probs come from the batch, as TRL supports);
  the stand-in model returns ``log_probs`` (zero outside the completion, as TRL's fused head gives for
  label −100) and the logging-only ``entropy``, ``mean_logits``, ``is_top1``.
- ``CPOTrainer.get_batch_loss_metrics`` / ``ORPOTrainer.get_batch_loss_metrics`` with the real
  ``cpo_loss`` / ``odds_ratio_loss`` bound to the stand-in, and ``concatenated_forward`` replaced by the
  real static ``get_batch_logps`` applied to random logits plus the NLL that the trainers compute with a
  nested ``cross_entropy_loss`` (unreachable from outside, so reproduced here with ``F.cross_entropy``).

OpenRLHF's ``DPOLoss`` is an ``nn.Module`` and is called as is (imported through the harness's
placeholders, after TRL).  Gradients are compared with respect to the per-token log-probs (DPO, KTO) or
the logits (CPO, ORPO), so the summing and length normalisation of both sides are part of the test.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from peers.cases import TOL, close, grad_close, leaf
from peers.conftest import trl_peer  # noqa: F401  (fixture: TRL imported first, without placeholders)
from peers.placeholders import import_peer

from rlhf_kernels.ops.preference_losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
)

B, T, V = 6, 12, 11  # pairs (KTO: responses), padded sequence length, vocabulary of the CPO/ORPO logits
GRAD_TOL = 1e-9  # fp64 on both sides


@pytest.fixture(scope="session")
def preference_peers(trl_peer):  # noqa: F811
    import importlib

    return types.SimpleNamespace(
        DPOTrainer=importlib.import_module("trl.trainer.dpo_trainer").DPOTrainer,
        KTOTrainer=importlib.import_module("trl.trainer.kto_trainer").KTOTrainer,
        CPOTrainer=importlib.import_module("trl.experimental.cpo.cpo_trainer").CPOTrainer,
        ORPOTrainer=importlib.import_module("trl.experimental.orpo.orpo_trainer").ORPOTrainer,
        DPOLoss=import_peer("openrlhf.models.loss").DPOLoss,
    )


def _completion_mask(rows: int, seq: int = T) -> torch.Tensor:
    """[rows, seq] 0/1: a prompt of 1–3 tokens, then a completion of ≥ 1 token, then padding."""
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for row in range(rows):
        start = int(torch.randint(1, 4, ()))
        length = int(torch.randint(1, seq - start + 1, ()))
        mask[row, start : start + length] = 1
    return mask


def _accelerator():
    identity = lambda x: x  # noqa: E731  (one process: gathering returns the local tensor)
    return types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity)


def _model(outputs_for):
    """A stand-in causal LM: ``outputs_for(input_ids)`` gives its outputs."""
    return lambda input_ids, **kwargs: outputs_for(input_ids)


def _outputs(log_probs: torch.Tensor) -> types.SimpleNamespace:
    zeros = torch.zeros_like(log_probs.detach())
    return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trainer_state(**attributes) -> types.SimpleNamespace:
    """The trainer attributes every ``_compute_loss`` reads for logging, plus ``attributes``."""
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        precompute_ref_logps=True, **attributes,
    )


# --------------------------------------------------------------------------------------------------
# DPO: DPOTrainer._compute_loss
# --------------------------------------------------------------------------------------------------
def _dpo_case(dtype):
    completion_mask = _completion_mask(2 * B)
    shift_mask = completion_mask[:, 1:]
    per_token = -4.0 * torch.rand(2 * B, T - 1, dtype=dtype)
    ref = (per_token * shift_mask).sum(1) + torch.randn(2 * B, dtype=dtype)
    return completion_mask, per_token, ref


def _trl_dpo(peers, completion_mask, per_token, ref, loss_types, weights, beta, eps, tau):
    """DPOTrainer._compute_loss reads, besides the logging state: beta, loss_types, loss_weights (set
    by DPOTrainer.__init__ to 1.0 each when not given), label_smoothing, args.discopop_tau, ld_alpha
    (None: plain sums), f_divergence_type ("reverse_kl": standard DPO), use_weighting (False)."""
    per_token = leaf(per_token)
    shift_mask = completion_mask[:, 1:]
    trainer = _trainer_state(
        beta=beta, loss_types=loss_types, loss_weights=weights or [1.0] * len(loss_types),
        label_smoothing=eps, args=types.SimpleNamespace(discopop_tau=tau), ld_alpha=None,
        f_divergence_type="reverse_kl", use_weighting=False,
    )
    inputs = {
        "input_ids": torch.randint(0, V, completion_mask.shape),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:],
    }
    model = _model(lambda ids: _outputs(per_token * shift_mask))
    loss = peers.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, per_token)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss, grad, metrics


def _ours_dpo(completion_mask, per_token, ref, loss_types, weights, beta, eps, tau, **options):
    per_token = leaf(per_token)
    logps = (per_token * completion_mask[:, 1:]).sum(1)
    lengths = completion_mask.sum(1)
    loss, metrics = dpo_loss(
        logps[:B], logps[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_types, loss_weights=weights,
        label_smoothing=eps, discopop_tau=tau, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        **options,
    )
    (grad,) = torch.autograd.grad(loss, per_token)
    return loss, grad, metrics


DPO_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected",
)


@pytest.mark.parametrize(
    "loss_types, weights",
    [([t], None) for t in DPO_LOSS_TYPES]
    + [(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]), (["ipo", "hinge"], [0.5, 2.0])],
    ids=[t for t in DPO_LOSS_TYPES] + ["mpo", "ipo+hinge"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dpo_matches_trl(preference_peers, loss_types, weights, dtype):
    torch.manual_seed(len(loss_types[0]) + len(loss_types))
    case = _dpo_case(dtype)
    hyper = dict(beta=1 / 3, eps=0.1, tau=0.7)
    want, want_grad, want_metrics = _trl_dpo(preference_peers, *case, loss_types, weights, **hyper)
    loss, grad, metrics = _ours_dpo(*case, loss_types, weights, **hyper)
    tol, grad_tol = (TOL[dtype], GRAD_TOL) if dtype == torch.float64 else (TOL[dtype], 1e-5)
    if "exo_pair" in loss_types:  # TRL's exo_pair takes log(ε), log(1 − ε) of an fp32 tensor of ε
        tol, grad_tol = max(tol, 1e-6), max(grad_tol, 1e-6)
    close(loss, want, tol, "loss")
    grad_close(grad, want_grad, grad_tol, "grad")
    for name in DPO_METRICS:
        close(metrics[name], torch.tensor(want_metrics[name], dtype=torch.float64), 1e-5, name)


# --------------------------------------------------------------------------------------------------
# OpenRLHF DPOLoss: convention="openrlhf"
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ipo", [False, True])
def test_dpo_matches_openrlhf(preference_peers, ipo):
    torch.manual_seed(3)
    c, r = -30 * torch.rand(B, dtype=torch.float64), -30 * torch.rand(B, dtype=torch.float64)
    rc, rr = c + torch.randn(B, dtype=torch.float64), r + torch.randn(B, dtype=torch.float64)
    beta, eps = 1 / 3, 0.1
    peer_c, peer_r = leaf(c), leaf(r)
    want, chosen_rewards, rejected_rewards = preference_peers.DPOLoss(beta, eps, ipo)(peer_c, peer_r, rc, rr)
    want_grads = torch.autograd.grad(want, (peer_c, peer_r))
    ours_c, ours_r = leaf(c), leaf(r)
    loss, metrics = dpo_loss(
        ours_c, ours_r, rc, rr, beta=beta, label_smoothing=eps, loss_type="ipo" if ipo else "sigmoid",
        convention="openrlhf",
    )
    close(loss, want, TOL[torch.float64], "loss")
    grads = torch.autograd.grad(loss, (ours_c, ours_r))
    for got, expected, name in zip(grads, want_grads, ("chosen", "rejected")):
        grad_close(got, expected, GRAD_TOL, f"grad {name}")
    close(metrics["rewards/chosen"], chosen_rewards.mean(), 1e-6, "rewards/chosen")
    close(metrics["rewards/rejected"], rejected_rewards.mean(), 1e-6, "rewards/rejected")
    if not ipo:  # by default (TRL's convention) sigmoid ignores label_smoothing: a different loss
        assert not torch.allclose(dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)[0], want)


# --------------------------------------------------------------------------------------------------
# CPO / SimPO and ORPO: get_batch_loss_metrics on real get_batch_logps
# --------------------------------------------------------------------------------------------------
def _labels(completion_mask: torch.Tensor) -> torch.Tensor:
    tokens = torch.randint(0, V, completion_mask.shape)
    return tokens.masked_fill(completion_mask == 0, -100), tokens


def _response_nll(logits, labels):
    """The trainers' nested ``cross_entropy_loss``: shifted token-mean cross-entropy, −100 ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


def _summed_and_lengths(trainer_cls, logits, labels):
    """What our functions take: summed log-probs (TRL's get_batch_logps) and response token counts."""
    summed = trainer_cls.get_batch_logps(logits, labels, average_log_prob=False)
    return summed, (labels[:, 1:] != -100).sum(1)


@pytest.mark.parametrize("alpha", [0.0, 0.25])
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_cpo_matches_trl(preference_peers, loss_type, alpha):
    """CPOTrainer.get_batch_loss_metrics reads concatenated_forward, cpo_loss, cpo_alpha,
    aux_loss_enabled, accelerator; cpo_loss reads alpha, beta, loss_type, simpo_gamma, label_smoothing."""
    torch.manual_seed(4)
    cpo = preference_peers.CPOTrainer
    labels, _ = _labels(_completion_mask(2 * B))
    logits = torch.randn(2 * B, T, V, dtype=torch.float64)
    hyper = dict(
        beta=1 / 3, label_smoothing=0.1 if loss_type in ("sigmoid", "simpo") else 0.0, simpo_gamma=0.7
    )
    cpo_alpha = 0.5

    peer_logits = leaf(logits)
    trainer = types.SimpleNamespace(
        alpha=alpha, loss_type=loss_type, cpo_alpha=cpo_alpha, aux_loss_enabled=False,
        accelerator=_accelerator(), **hyper,
    )
    trainer.cpo_loss = lambda c, r: cpo.cpo_loss(trainer, c, r)
    averaged = cpo.get_batch_logps(peer_logits, labels, average_log_prob=loss_type in ("ipo", "simpo"))
    nll = _response_nll(peer_logits[:B], labels[:B])
    trainer.concatenated_forward = lambda model, batch: (
        averaged[:B], averaged[B:], peer_logits[:B], peer_logits[B:], nll
    )
    want, want_metrics = cpo.get_batch_loss_metrics(trainer, None, {})
    (want_grad,) = torch.autograd.grad(want, peer_logits)

    our_logits = leaf(logits)
    summed, lengths = _summed_and_lengths(cpo, our_logits, labels)
    loss, metrics = cpo_loss(
        summed[:B], summed[B:], lengths[:B], lengths[B:], loss_type=loss_type, alpha=alpha,
        cpo_alpha=cpo_alpha, **hyper,
    )
    (grad,) = torch.autograd.grad(loss, our_logits)
    close(loss, want, TOL[torch.float64], "loss")
    grad_close(grad, want_grad, GRAD_TOL, "grad")
    for name in DPO_METRICS + ("nll_loss",):
        close(metrics[name], torch.tensor(want_metrics[name], dtype=torch.float64), 1e-5, name)


def test_orpo_matches_trl(preference_peers):
    """ORPOTrainer.get_batch_loss_metrics reads concatenated_forward, odds_ratio_loss, aux_loss_enabled,
    accelerator; odds_ratio_loss reads beta and accelerator.  TRL's NLL runs over the whole chosen
    sequence (prompt included), so it is passed to orpo_loss as ``nll_loss``."""
    torch.manual_seed(5)
    orpo = preference_peers.ORPOTrainer
    labels, tokens = _labels(_completion_mask(2 * B))
    logits = torch.randn(2 * B, T, V, dtype=torch.float64)
    beta = 1 / 3

    peer_logits = leaf(logits)
    trainer = types.SimpleNamespace(beta=beta, aux_loss_enabled=False, accelerator=_accelerator())
    trainer.odds_ratio_loss = lambda c, r: orpo.odds_ratio_loss(trainer, c, r)
    averaged = orpo.get_batch_logps(peer_logits, labels, average_log_prob=True)
    nll = _response_nll(peer_logits[:B], tokens[:B])  # every token is a label: prompt and response
    trainer.concatenated_forward = lambda model, batch: (
        averaged[:B], averaged[B:], peer_logits[:B], peer_logits[B:], nll
    )
    want, want_metrics = orpo.get_batch_loss_metrics(trainer, None, {})
    (want_grad,) = torch.autograd.grad(want, peer_logits)

    our_logits = leaf(logits)
    summed, lengths = _summed_and_lengths(orpo, our_logits, labels)
    our_nll = _response_nll(our_logits[:B], tokens[:B])
    loss, metrics = orpo_loss(summed[:B], summed[B:], lengths[:B], lengths[B:], beta=beta, nll_loss=our_nll)
    (grad,) = torch.autograd.grad(loss, our_logits)
    # TRL computes the odds ratio in fp32 (``.float()``) whatever the input dtype.
    close(loss, want, 1e-6, "loss")
    grad_close(grad, want_grad, 1e-5, "grad")
    for name in DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        close(metrics[name], torch.tensor(want_metrics[name], dtype=torch.float64), 1e-5, name)


# --------------------------------------------------------------------------------------------------
# KTO: KTOTrainer._compute_loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(preference_peers, loss_type):
    """KTOTrainer._compute_loss reads, besides the logging state: beta, loss_type, desirable_weight,
    undesirable_weight, calculate_KL (True for "kto", as TRL sets it) and its own _compute_kl_logps
    (the real method, bound to the stand-in trainer)."""
    torch.manual_seed(6)
    kto = preference_peers.KTOTrainer
    n, kl_seq = 2 * B, T - 2
    completion_mask, kl_mask = _completion_mask(n), _completion_mask(n, kl_seq)
    per_token = -4.0 * torch.rand(n, T - 1, dtype=torch.float64)
    kl_per_token = -4.0 * torch.rand(n, kl_seq - 1, dtype=torch.float64) * kl_mask[:, 1:]
    ref = (per_token * completion_mask[:, 1:]).sum(1) + torch.randn(n, dtype=torch.float64)
    ref_kl = kl_per_token.sum(1) - 1.0 + 0.5 * torch.randn(n, dtype=torch.float64)
    desirable = torch.rand(n) < 0.5
    desirable[:2] = torch.tensor([True, False])  # both groups present
    hyper = dict(beta=1 / 3, desirable_weight=1.0, undesirable_weight=4 / 3)

    peer_per_token = leaf(per_token)
    kl_ids = torch.randint(0, V, (n, kl_seq))
    trainer = _trainer_state(loss_type=loss_type, calculate_KL=loss_type == "kto", args=None, **hyper)
    trainer._compute_kl_logps = lambda model, batch: kto._compute_kl_logps(trainer, model, batch)
    main_outputs = _outputs(peer_per_token * completion_mask[:, 1:])
    model = _model(lambda ids: _outputs(kl_per_token) if ids is kl_ids else main_outputs)
    inputs = {
        "input_ids": torch.randint(0, V, (n, T)), "attention_mask": torch.ones(n, T, dtype=torch.long),
        "completion_mask": completion_mask, "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl,
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
    }
    want = kto._compute_loss(trainer, model, inputs, return_outputs=False)
    (want_grad,) = torch.autograd.grad(want, peer_per_token)
    want_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    our_per_token = leaf(per_token)
    logps = (our_per_token * completion_mask[:, 1:]).sum(1)
    loss, metrics = kto_loss(logps, ref, desirable, kl_per_token.sum(1), ref_kl, loss_type=loss_type, **hyper)
    (grad,) = torch.autograd.grad(loss, our_per_token)
    close(loss, want, TOL[torch.float64], "loss")
    grad_close(grad, want_grad, GRAD_TOL, "grad")
    for name in (
        "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"
    ):
        close(metrics[name], torch.tensor(want_metrics[name], dtype=torch.float64), 1e-5, name)
