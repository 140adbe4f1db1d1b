"""vLLM's sort-based sampling mask, written from its published semantics (vLLM v1,
``vllm/v1/sample/ops/topk_topp_sampler.py``: ``apply_top_k_top_p_pytorch`` and the
``processed_logprobs`` mode): the idiom ``rlhf_kernels.sampling_logprobs`` is measured against, and the
definition the tests check its kept set against on logits without ties.

vLLM divides the fp32 logits by the temperature, sorts each row ascending, masks the values below the
k-th largest (ties at it kept), then takes the softmax of the sorted survivors, their cumulative sum, and
masks the positions whose cumulative sum is ≤ 1 − p, always keeping the last (largest) one; the masked
logits are scattered back and ``log_softmax`` gives the processed log-probs.  Among tied values the sort
order decides which survive top-p (``rlhf_kernels`` keeps every tied copy).
"""

from __future__ import annotations

import torch


def vllm_masked_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp32 [N, V] logits / τ with −inf outside vLLM's top-k / top-p kept set (top_k 0: off)."""
    x = logits.float() / temperature
    ascending, order = x.sort(dim=-1)
    if 0 < top_k < x.shape[-1]:
        kth = ascending[:, x.shape[-1] - top_k].unsqueeze(-1)
        ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    if top_p < 1.0:
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        dropped = cumulative <= 1 - top_p
        dropped[:, -1] = False
        ascending = ascending.masked_fill(dropped, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, ascending)


def vllm_sampling_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The renormalised log-probs of ``labels`` [N] (vLLM's ``processed_logprobs``, gathered)."""
    log_q = vllm_masked_logits(logits, temperature, top_k, top_p).log_softmax(dim=-1)
    return log_q.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
