"""Stage 3 from preferences directly: dpo (any ``--dpo_loss_type``), simpo, orpo, kto.

The data are the reward models' own comparisons (the same seeds as ``reward.train_reward_model``, one set
per ``--reward_models`` aspect): a pair gives (chosen, rejected), a K-way ranking gives its best against
each other valid response.  The policy starts from SFT; the reference (dpo, kto) is the frozen SFT
model.  Each step draws ``rollout_batch`` pairs (all processes together) and takes one AdamW step on

- ``dpo``: ``dpo_loss(c, r, ref_c, ref_r, beta=pref_beta, loss_type=dpo_loss_type)``;
- ``simpo``: ``simpo_loss(c, r, n_c, n_r, beta=20·pref_beta)`` (no reference);
- ``orpo``: ``orpo_loss(c, r, n_c, n_r, beta=pref_beta)`` (its NLL term included; no reference);
- ``kto``: ``kto_loss`` with the chosen responses desirable, the rejected undesirable, and the reference
  point from mismatched (prompt, chosen response of another prompt) pairs;

c, r = Σ_t log π over the response tokens (EOS included), n = their count.  No tokens are generated.
"""

from __future__ import annotations

import torch

import rlhf_kernels

from .config import parse_reward_models
from .critic_free import freeze_value_head
from .model import IGNORE_INDEX, response_labels
from .ppo import PPOTrainer
from .reward import RM_SEED, make_preferences
from .sft import global_batch_index, make_optimizer, optimizer_step


def preference_pairs(cfg, task) -> dict[str, torch.Tensor]:
    """Every (chosen, rejected) pair of the reward models' training comparisons, on the CPU:
    ids/mask [N, 2, P + R], labels [N, 2, R]."""
    parts = []
    for index, (aspect, _) in enumerate(parse_reward_models(cfg.reward_models)):
        seed = cfg.seed * 1009 + RM_SEED + 10 * index  # reward.train_reward_model's data
        for s in make_preferences(cfg, task, aspect, cfg.rm_items, seed, torch.device("cpu")):
            if s is None:
                continue
            R = s.labels.shape[-1]
            labels = response_labels(s.ids[..., -R:], s.mask[..., -R:])
            parts.append(tuple(_best_against_others(t, s.valid) for t in (s.ids, s.mask, labels)))
    ids, mask, labels = (torch.cat(t) for t in zip(*parts))
    return {"ids": ids, "mask": mask, "labels": labels}


def _best_against_others(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[n, K, ...] (best first) → [N, 2, ...]: the best response against each other valid one."""
    K = t.shape[1]
    best = torch.zeros(K - 1, dtype=torch.int64)
    return torch.stack([t[:, best], t[:, 1:]], 2)[valid[:, 1:]]


class PreferenceTrainer(PPOTrainer):
    POSTFIX = (("loss", "loss"), ("acc", "accuracy"))

    def __init__(self, rt, cfg, policy, ref, reward, task, log, save_checkpoint):
        trainable = freeze_value_head(policy)
        super().__init__(rt, cfg, policy, ref, reward, task, log, save_checkpoint)
        self.optimizer = make_optimizer(trainable, cfg.ppo_lr)
        self.pairs = {k: rt.to_device(v) for k, v in preference_pairs(cfg, task).items()}

    def sequence_logps(self, model, ids, mask, labels, grad: bool):
        with torch.set_grad_enabled(grad), self.rt.autocast():
            out = model(ids, mask, labels)
        valid = labels != IGNORE_INDEX
        return torch.where(valid, out.logprobs, 0.0).sum(-1), valid.sum(-1).float()

    def train_step(self, step: int):
        rt, cfg = self.rt, self.cfg
        n = self.pairs["ids"].shape[0]
        index = rt.to_device(global_batch_index(n, cfg.rollout_batch, self.batch_gen, rt))
        ids, mask, labels = (self.pairs[k][index] for k in ("ids", "mask", "labels"))
        B = ids.shape[0]
        flat = [t.transpose(0, 1).flatten(0, 1) for t in (ids, mask, labels)]  # chosen rows, then rejected
        self.policy.train()
        with rt.timed("ppo_update"):
            logps, lengths = self.sequence_logps(self.ddp, *flat, grad=True)
            c, r, n_c, n_r = logps[:B], logps[B:], lengths[:B], lengths[B:]
            loss, metrics = self.loss(flat, c, r, n_c, n_r, B)
            grad_norm = optimizer_step(self.optimizer, self.policy, loss, cfg.max_grad_norm)
        self.policy.eval()
        margin = (c / n_c - r / n_r).detach()
        out = {
            "loss": loss.detach(),
            "grad_norm": grad_norm,
            "accuracy": (margin > 0).float().mean(),
            "tokens": mask.sum().float(),  # processed (no generation): for tokens/s
            "gen_tokens": torch.zeros((), device=mask.device),
            "logps_chosen": c.detach().mean(),
            "logps_rejected": r.detach().mean(),
            **{k.replace("/", "_"): v.detach().float() for k, v in metrics.items() if v.dim() == 0},
        }
        return out, {"loss": loss.detach()}

    def loss(self, flat, c, r, n_c, n_r, B):
        cfg, algo = self.cfg, self.cfg.algo
        if algo == "simpo":
            return rlhf_kernels.simpo_loss(c, r, n_c, n_r, beta=20 * cfg.pref_beta)
        if algo == "orpo":
            return rlhf_kernels.orpo_loss(c, r, n_c, n_r, beta=cfg.pref_beta)
        ref, _ = self.sequence_logps(self.ref, *flat, grad=False)
        if algo == "dpo":
            return rlhf_kernels.dpo_loss(
                c,
                r,
                ref[:B],
                ref[B:],
                beta=cfg.pref_beta,
                loss_type=cfg.dpo_loss_type,
                chosen_lengths=n_c,
                rejected_lengths=n_r,
            )
        # kto: mismatched pairs (prompt b with the chosen response of prompt b + 1) set the reference point
        ids, mask, labels = flat
        P = ids.shape[1] - labels.shape[1]
        shift = torch.roll(torch.arange(B, device=ids.device), -1)
        kl_ids = torch.cat([ids[:B, :P], ids[shift, P:]], 1)
        kl_mask = torch.cat([mask[:B, :P], mask[shift, P:]], 1)
        kl, _ = self.sequence_logps(self.policy, kl_ids, kl_mask, labels[shift], grad=False)
        ref_kl, _ = self.sequence_logps(self.ref, kl_ids, kl_mask, labels[shift], grad=False)
        desirable = torch.arange(2 * B, device=ids.device) < B
        return rlhf_kernels.kto_loss(torch.cat([c, r]), ref, desirable, kl, ref_kl, beta=cfg.pref_beta)

    def after_step(self, record: dict) -> None:
        pass  # no KL controller: the preference losses hold the policy near the reference themselves
