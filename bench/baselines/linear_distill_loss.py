"""Eager distillation-from-hidden-states idioms: both models' [N, V] logits materialised and TRL 1.16's own
``GKDTrainer.generalized_jsd_loss`` on them (imported from TRL: the peer function itself), and Liger's fused
linear JSD when it is installed (CUDA only)."""

from __future__ import annotations

import functools
import importlib
import warnings

import torch


@functools.lru_cache(maxsize=1)
def trl_generalized_jsd_loss():
    """TRL 1.16's static ``GKDTrainer.generalized_jsd_loss`` (importing trl's GKD trainer takes seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's experimental-API notice
        return importlib.import_module("trl.experimental.gkd.gkd_trainer").GKDTrainer.generalized_jsd_loss


def eager_trl_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta=0.5,
                  temperature=1.0):
    """GKD's idiom: the student's logits with autograd, the teacher's without, TRL's loss on both."""
    student_logits = torch.nn.functional.linear(student_hidden, student_weight)
    with torch.no_grad():
        teacher_logits = torch.nn.functional.linear(teacher_hidden, teacher_weight)
    return trl_generalized_jsd_loss()(student_logits, teacher_logits, labels=labels, beta=beta,
                                      temperature=temperature)


def liger_fused_linear_jsd(beta=0.5, temperature=1.0):
    """(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) -> loss through Liger's
    fused linear JSD, or None when liger-kernel is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)

    def run(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        return loss(flat(student_hidden), student_weight, flat(teacher_hidden), teacher_weight,
                    labels.reshape(-1))

    return run
