"""Stage 3, RRHF (Yuan et al. 2023): rank responses by the reward models, align the policy's
length-normalised log-probs with that ranking.

One step (per rank): ``rollout_batch / group_size`` prompts; for each, ``group_size`` samples of the current
policy plus the SFT demonstration of the prompt (the demonstrator of task.py), K = group_size + 1
responses, scored by the reward ensemble (no grad) and sorted best → worst.  Then ``ppo_epochs`` passes over
minibatches of prompts, loss per minibatch:

    ranking_hinge_loss(p[B, K]) + rrhf_nll_coef · NLL(best response)     p = Σ_t log π / length

One model besides the reward models: no reference, no critic (the value head is frozen).
"""

from __future__ import annotations

import torch

import rlhf_kernels

from .critic_free import CriticFreeTrainer
from .model import IGNORE_INDEX, response_labels
from .ppo import logprob_temperature, sample
from .task import join


class RRHFTrainer(CriticFreeTrainer):
    POSTFIX = (("score", "score"), ("gold", "gold"), ("loss", "loss"))

    @torch.no_grad()
    def rollout(self, step: int) -> dict:
        rt, cfg, G = self.rt, self.cfg, self.group
        with rt.timed("ppo_generate"):
            prompts = self.prompts_for(step)
            self.policy.eval()
            responses, response_mask = sample(rt, cfg, self.policy, prompts, self.sample_gen)
            unique = prompts.select(slice(0, None, G))
            gen = torch.Generator().manual_seed((cfg.seed * 1009 + 11) * 100003 + step * 101 + rt.rank)
            demos, demo_mask = self.task.demonstrations(unique.to("cpu"), gen)
        with rt.timed("ppo_score"):
            n, R = len(unique), responses.shape[1]
            every = torch.cat([responses.view(n, G, R), rt.to_device(demos)[:, None]], 1)  # [n, K, R]
            every_mask = torch.cat([response_mask.view(n, G, R), rt.to_device(demo_mask)[:, None]], 1)
            K = G + 1
            many = unique.repeat_interleave(K)
            flat, flat_mask = every.view(n * K, R), every_mask.view(n * K, R)
            ids, mask = join(many, flat, flat_mask)
            scores = self.reward(ids, mask, rt)
            if step == cfg.inject_nan_at_step:  # test hook: a poisoned reward must stop the run
                scores = scores + float("nan")
            order = scores.view(n, K).argsort(dim=1, descending=True, stable=True)
            rows = (order + torch.arange(n, device=order.device)[:, None] * K).reshape(-1)
            gold = self.task.gold(prompts.topic, responses, response_mask)
        return dict(
            ids=ids[rows].view(n, K, -1),
            mask=mask[rows].view(n, K, -1),
            labels=response_labels(flat, flat_mask)[rows].view(n, K, R),
            scores=scores,
            sorted_scores=scores[rows].view(n, K),
            gold=gold,
            response_mask=response_mask,
            tokens=mask.sum().float(),
        )

    MINIBATCH_KEYS = ("ids", "mask", "labels")  # [n_prompts, K, ...]: a minibatch is a set of prompts

    def minibatch_size(self) -> int:
        return max(1, self.cfg.minibatch // (self.group + 1))

    def minibatch_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, K, _ = mb["ids"].shape
        ids, mask, labels = (mb[key].flatten(0, 1) for key in ("ids", "mask", "labels"))
        with self.rt.autocast():
            out = self.ddp(ids, mask, labels, temperature=logprob_temperature(self.cfg))
        return rrhf_loss(self.cfg, out.logprobs, labels, n, K)

    def train_step(self, step: int):
        batch = self.rollout(step)
        with self.rt.timed("ppo_update"):
            update = self.update(batch)
        metrics = {
            "score": batch["scores"].mean(),
            "gold": batch["gold"].mean(),
            "best_score": batch["sorted_scores"][:, 0].mean(),
            "response_len": batch["response_mask"].sum(-1).float().mean(),
            "tokens": batch["tokens"],
            "gen_tokens": batch["response_mask"].sum().float(),
            **update,
        }
        return metrics, {"score": batch["scores"], "loss": update["loss"]}

    def after_step(self, record: dict) -> None:
        pass  # no KL controller: RRHF has no reference


def rrhf_loss(cfg, logprobs: torch.Tensor, labels: torch.Tensor, n: int, K: int):
    """ranking_hinge_loss over length-normalised sequence log-probs [n, K] (rows best → worst) + the
    best response's token-mean NLL, weighted by ``rrhf_nll_coef``."""
    valid = labels != IGNORE_INDEX
    lengths = valid.sum(-1).clamp(min=1)
    seq = (torch.where(valid, logprobs, 0.0).sum(-1) / lengths).view(n, K)
    rank = rlhf_kernels.ranking_hinge_loss(seq)
    best = valid.view(n, K, -1)[:, 0]
    nll = -rlhf_kernels.agg_loss(logprobs.view(n, K, -1)[:, 0], best)
    return rank + cfg.rrhf_nll_coef * nll, {"rank_loss": rank, "nll": nll}
