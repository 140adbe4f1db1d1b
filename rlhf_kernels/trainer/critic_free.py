"""Stage 3 without a critic: grpo (Dr. GRPO through ``--norm_adv_by_std false``), rloo, remax,
reinforce_plus_plus and plain reinforce, sharing one loop.

One step (per rank):

1. rollout: ``rollout_batch / group_size`` prompts, ``group_size`` samples each (``reinforce``: one each);
   ``remax`` also decodes each prompt greedily, its baseline;
2. score (no grad): the policy's log-probs (no value head; with Σπ² per token from the same pass for the
   optimal-token-baseline estimators), the reference's, the reward ensemble's score (gdpo: each reward
   model's too); ``token_level_rewards`` puts −β·KL on every token and the score on the last, as in PPO;
   ``--rollout_rs`` rejects tokens from the loss (``rollout_correction``'s rejection);
3. advantages: ``rlhf_kernels.compute_advantages(<estimator>, ...)`` over the prompts' uid index
   (``--adv_estimator``, default the algorithm's own); ``reinforce``: A = s − b, s = Σ_t r, b a moving
   average of the batch mean of s (``--baseline_decay``), broadcast to the tokens;
4. update: ``ppo_epochs`` passes over minibatches, loss = ``--policy_loss`` (auto: ``vanilla``, the clipped
   ratio; ``gpg``, −A·log π, for reinforce) with the rollout-correction weights of ``--rollout_is``,
   − ent_coef · entropy (+ kl_loss_coef · kl_loss); ``--fused_loss``: all three from
   ``rlhf_kernels.linear_policy_loss`` on the hidden states.

The value head is frozen and left out of the optimizer: no value optimiser state exists.
"""

from __future__ import annotations

import inspect

import torch

import rlhf_kernels

from .algos import SUM_PI_SQUARED_ESTIMATORS, estimator_of, samples_per_prompt
from .model import PolicyValueModel, response_labels
from .ppo import (
    PPO_SEED,
    PPOTrainer,
    logprob_temperature,
    policy_outputs,
    policy_term,
    rollout_mismatch,
    sample,
    sequence_kl,
)
from .sft import make_optimizer
from .task import Prompts, join


def freeze_value_head(policy: PolicyValueModel) -> list[torch.nn.Parameter]:
    """Turns the value head's gradients off; returns the parameters an optimizer should hold."""
    for p in policy.value_head.parameters():
        p.requires_grad_(False)
    return [p for p in policy.parameters() if p.requires_grad]


class CriticFreeTrainer(PPOTrainer):
    def __init__(self, rt, cfg, policy, ref, reward, task, log, save_checkpoint):
        trainable = freeze_value_head(policy)
        super().__init__(rt, cfg, policy, ref, reward, task, log, save_checkpoint)
        self.optimizer = make_optimizer(trainable, cfg.ppo_lr)  # the value head has no optimiser state
        self.estimator = estimator_of(cfg)
        self.group = samples_per_prompt(cfg)
        self.default_loss = "gpg" if cfg.algo == "reinforce" else "vanilla"
        self.baseline = torch.zeros((), device=rt.device)  # reinforce's moving average (a tensor: no sync)
        self.baseline_started = False

    def extra_state(self) -> dict:
        return {"baseline": self.baseline, "baseline_started": self.baseline_started}

    def load_extra_state(self, state: dict) -> None:
        self.baseline = state["baseline"].to(self.rt.device)
        self.baseline_started = state["baseline_started"]

    def prompts_for(self, step: int) -> Prompts:
        """``rollout_batch / group_size`` prompts (a function of seed, step and rank), each repeated."""
        gen = torch.Generator().manual_seed(
            (self.cfg.seed * 1009 + PPO_SEED) * 100003 + step * 101 + self.rt.rank
        )
        prompts = self.task.sample_prompts(self.cfg.rollout_batch // self.group, gen)
        return prompts.repeat_interleave(self.group).to(self.rt.device)

    def rewards_of(self, prompts, responses, response_mask, rollout_logprobs=None) -> dict:
        """Log-probs (policy, reference), score, token rewards and mismatch metrics of sampled responses."""
        rt, cfg = self.rt, self.cfg
        ids, mask = join(prompts, responses, response_mask)
        labels = response_labels(responses, response_mask)
        out = dict(ids=ids, mask=mask, labels=labels)
        if self.estimator in SUM_PI_SQUARED_ESTIMATORS:  # Σπ² from the same pass as the old log-probs
            with rt.autocast():
                policy = self.policy(
                    ids, mask, labels, temperature=logprob_temperature(cfg), return_sum_sq_probs=True
                )
            old_logprobs, out["sum_pi_squared"] = policy.logprobs, policy.sum_sq_probs
        else:
            old_logprobs, _ = policy_outputs(rt, cfg, self.policy, ids, mask, labels, values=False)
        ref_logprobs, _ = policy_outputs(rt, cfg, self.ref, ids, mask, labels, values=False)
        if self.estimator == "gdpo" and hasattr(self.reward, "raw_scores"):  # one score per reward model
            raw = self.reward.raw_scores(ids, mask, rt)
            scores, out["reward_scores"] = self.reward.combine(raw), self.reward.standardised(raw)
        else:
            scores = self.reward(ids, mask, rt)
        out.update(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
        if rollout_logprobs is not None:
            out["is_weights"], out["loss_mask"], out["mismatch"] = rollout_mismatch(
                cfg, old_logprobs, rollout_logprobs, response_mask
            )
        return {**out, "scores": scores}

    @torch.no_grad()
    def rollout(self, step: int) -> dict:
        rt, cfg = self.rt, self.cfg
        prompts, responses, response_mask, rollout_logprobs = self.generate_rollout(step)
        with rt.timed("ppo_score"):
            batch = self.rewards_of(prompts, responses, response_mask, rollout_logprobs)
            batch["gold"] = self.task.gold(prompts.topic, responses, response_mask)
        if step == cfg.inject_nan_at_step:  # test hook: a poisoned reward must stop the run
            batch["scores"] = batch["scores"] + float("nan")
        with rt.timed("ppo_advantages"):
            rewards, kl_mean = self.token_rewards(
                batch["scores"], batch["old_logprobs"], batch["ref_logprobs"], response_mask
            )
            advantages, returns, extra = self.advantages(step, prompts, rewards, response_mask, batch)
        return dict(
            batch,
            response_mask=response_mask,
            rollout_logprobs=rollout_logprobs,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            kl_mean=kl_mean,
            seq_kl=sequence_kl(batch["old_logprobs"], batch["ref_logprobs"], response_mask),
            **extra,
        )

    def advantages(self, step: int, prompts: Prompts, rewards, response_mask, batch: dict):
        """(advantages, returns, extra batch entries) of the estimator; ``batch``: the scored rollout
        (Σπ², the reward components, the rollout-correction weights some estimators read)."""
        cfg, name = self.cfg, self.estimator
        if name is None:  # reinforce: s − b, b the moving average of the batch mean score
            seq = rewards.sum(-1)
            mean = self.rt.all_reduce_sum(seq.mean()[None])[0] / self.rt.world
            base = self.baseline if self.baseline_started else mean
            advantages = rlhf_kernels.broadcast_to_tokens(seq - base, response_mask)
            self.baseline = cfg.baseline_decay * base + (1 - cfg.baseline_decay) * mean
            self.baseline_started = True
            return advantages, advantages, {"baseline": base}
        index = torch.arange(len(prompts), device=rewards.device) // self.group
        if name == "remax":
            baselines, extra = self.greedy_baseline(step, prompts)
            advantages, returns = rlhf_kernels.compute_advantages(name, rewards, baselines, response_mask)
            return advantages, returns, extra
        kwargs = {}
        if name in ("grpo", "grpo_vectorized", "grpo_passk", "gdpo"):
            kwargs["norm_adv_by_std_in_grpo"] = cfg.norm_adv_by_std
        if name == "reinforce_plus_plus":  # whitened over the global batch, as PPO's advantages
            advantages, returns = rlhf_kernels.compute_advantages(
                name, rewards, response_mask, gamma=cfg.gamma, process_group=self.rt.process_group
            )
            return advantages, returns, {}
        if name in SUM_PI_SQUARED_ESTIMATORS:  # verl's inputs: the old log-probs, Σπ², the IS weights
            kwargs = dict(
                old_log_probs=batch["old_logprobs"],
                sum_pi_squared=batch["sum_pi_squared"],
                rollout_is_weights=batch.get("is_weights"),
            )
        if name == "gdpo" and "reward_scores" in batch:
            kwargs.update(reward_scores=batch["reward_scores"], reward_weights=self.reward.weights)
        if "index" not in _estimator_params(name):
            return (*rlhf_kernels.compute_advantages(name, rewards, response_mask), {})
        return (*rlhf_kernels.compute_advantages(name, rewards, response_mask, index, **kwargs), {})

    def greedy_baseline(self, step: int, prompts: Prompts) -> tuple[torch.Tensor, dict]:
        """ReMax's baseline: the reward (score − β·KL) of each prompt's greedy response, for its samples."""
        first = prompts.select(slice(0, None, self.group))
        greedy, greedy_mask = sample(self.rt, self.cfg, self.policy, first, self.sample_gen, temperature=0.0)
        g = self.rewards_of(first, greedy, greedy_mask)
        rewards, _ = self.token_rewards(g["scores"], g["old_logprobs"], g["ref_logprobs"], greedy_mask)
        baseline = rewards.sum(-1).repeat_interleave(self.group)
        return baseline, {"extra_gen_tokens": greedy_mask.sum().float(), "baseline": baseline.mean()}

    def minibatch_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.forward(mb, values=False)
        if out.policy_loss is not None:
            return fused_critic_free_loss(self.cfg, out, mb, self.default_loss)
        return critic_free_loss(self.cfg, out.logprobs, out.entropy, mb, self.default_loss)


def fused_critic_free_loss(cfg, out, mb, default_loss: str):
    """``--fused_loss``: ``linear_policy_loss``'s loss and metrics (``out.policy_loss``) as the terms of
    :func:`critic_free_loss`; the policy loss's metrics the fused op does not report (``vanilla``'s
    ``ratio_mean`` / ``ratio_max``) come from ``policy_term`` on its detached log-probs (O(B·T), no
    lm_head work).  ``entropy`` is logged only with an entropy bonus (the op skips it otherwise)."""
    loss, metrics = out.policy_loss
    with torch.no_grad():
        _, pg = policy_term(cfg, out.logprobs, mb, default=default_loss)
    terms = {"pg_loss": metrics["pg_loss"]}
    if "entropy" in metrics:
        terms["entropy"] = metrics["entropy"]
    terms.update({k: metrics.get(k, v).float() for k, v in pg.items() if v.dim() == 0})
    if "kl_loss" in metrics:
        terms["kl_loss"] = metrics["kl_loss"]
    return loss, terms


def critic_free_loss(cfg, logprobs, entropy, mb, default_loss: str):
    """policy loss (``--policy_loss``) − ent_coef · entropy (+ kl_loss_coef · kl_loss); returns (loss,
    its terms as 0-dim tensors)."""
    mask = mb["response_mask"]
    pg_loss, pg = policy_term(cfg, logprobs, mb, default=default_loss)
    entropy = rlhf_kernels.agg_loss(entropy, mask, cfg.loss_agg)
    loss = pg_loss - cfg.ent_coef * entropy if cfg.ent_coef != 0 else pg_loss
    terms = {"pg_loss": pg_loss, "entropy": entropy, **{k: v.float() for k, v in pg.items() if v.dim() == 0}}
    if cfg.kl_loss_coef > 0:
        terms["kl_loss"] = rlhf_kernels.kl_loss(
            logprobs, mb["ref_logprobs"], mask, estimator=cfg.kl_loss_estimator, loss_agg=cfg.loss_agg
        )
        loss = loss + cfg.kl_loss_coef * terms["kl_loss"]
    return loss, terms


def _estimator_params(name: str):
    return inspect.signature(rlhf_kernels.ADVANTAGE_ESTIMATORS[name]).parameters
