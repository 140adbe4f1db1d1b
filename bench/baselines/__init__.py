"""Peers' eager idioms, written from their published semantics: the ONE definition of what "eager verl /
TRL / OpenRLHF" means, imported by the benchmarks (``bench/bench_*.py``) and the tests alike.

Modules, by op family: ``masked`` (the frameworks' masked reductions), ``logprobs``, ``linear_logprobs``,
``kl``, ``advantages`` (re-exports of ``gae``, ``whiten``, ``token_rewards``), ``losses``,
``preference_losses``.  Each function is named after the framework function it re-implements
(``verl_compute_policy_loss``, ``OpenRLHFPolicyLoss``, ``trl_selective_log_softmax``, ...); generic
idioms that belong to no framework are named ``eager_*``.

Versions followed (names, signatures, defaults, dtype behaviour and edge cases)
--------------------------------------------------------------------------------
verl      verl-project/verl main, 2026: ``verl/utils/torch_functional.py`` (``masked_sum`` zeroes masked
          positions with ``torch.where`` then multiplies by the mask; ``masked_mean`` divides by Σm + 1e-8;
          ``masked_var`` raises on fewer than two valid elements) and ``verl/trainer/ppo/core_algos.py``
          (``agg_loss`` with ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` /
          ``loss_scale_factor``, "token-sum", the sequence modes leaving fully masked rows out and
          "seq-mean-token-sum-norm" dividing by rows·T; ``compute_policy_loss`` with the ±20 log-ratio
          clamp and dual clip; ``compute_value_loss``; ``kl_penalty`` with the "+" straight-through
          suffix).  ``logprobs_from_logits`` is the flash-attn path (fp32 output) that verl takes on GPUs.
TRL       huggingface/trl main: ``selective_log_softmax`` with an index of shape (...) or (..., K),
          ``entropy_from_logits(logits, chunk_size=128)``, ``RewardTrainer.compute_loss``'s loss.
OpenRLHF  OpenRLHF/OpenRLHF main (July 2026): ``models/loss.py`` (``aggregate_loss``, ``PolicyLoss`` with
          the ±20 log-ratio clamp, dual clip and the (loss, clip_ratio, ppo_kl, vllm_kl) output,
          ``ValueLoss``, ``PairWiseLoss``, ``LogExpLoss``), ``models/utils.py`` (``compute_approx_kl``
          clamped to ±10, ``log_probs_from_logits`` dividing the logits in place, ``masked_mean`` without
          epsilon, ``compute_entropy``) and ``trainer/ppo_utils/experience_maker.py``
          (``get_advantages_and_returns``, the batch advantage normalisation).
"""
