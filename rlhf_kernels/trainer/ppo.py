"""Stage 3: PPO on the shared policy/value backbone, plus the evaluations (gold score, best-of-N).

One PPO step (per rank; DistributedDataParallel averages the gradients):

1. rollout: ``rollout_batch`` prompts, one sampled response each (KV-cache generation);
2. score: the policy's log-probs and values, the frozen reference's log-probs (the SFT weights), the
   reward ensemble's score of each response;
3. advantages: ``token_level_rewards`` (score at the last token − β·KL per token, β from the fixed or
   adaptive KL controller), ``compute_gae``, ``masked_whiten``;
4. update: ``ppo_epochs`` passes over shuffled minibatches of
   loss = ppo_policy_loss + vf_coef · ppo_value_loss − ent_coef · entropy (+ kl_loss_coef · kl_loss),
   the value head reading the same backbone as the policy.

Every number in steps 2–4 comes from the library's ops (``rlhf_kernels.*``).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

import rlhf_kernels

from . import checkpoint
from .config import TrainConfig
from .model import PolicyValueModel, generate, response_labels
from .report import MetricsLog
from .reward import RewardEnsemble
from .runtime import Runtime, check_finite, fmt, progress
from .sft import make_optimizer
from .task import LabelerTask, Prompts, join

PPO_SEED = 3
EVAL_SEED = 4
GEN_CHUNK = 1024


def frozen_copy(model: PolicyValueModel) -> PolicyValueModel:
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def make_kl_controller(cfg: TrainConfig):
    if cfg.kl_ctl == "adaptive":
        return rlhf_kernels.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return rlhf_kernels.FixedKLController(cfg.kl_coef)


def kl_coef_of(controller) -> float:
    return float(controller.value)


@torch.no_grad()
def sample(
    rt: Runtime, cfg: TrainConfig, model: PolicyValueModel, prompts: Prompts, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for i in range(0, len(prompts), GEN_CHUNK):
        chunk = prompts.select(slice(i, i + GEN_CHUNK))
        with rt.autocast():
            out.append(
                generate(
                    model,
                    chunk.ids,
                    chunk.mask,
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    generator=gen,
                )
            )
    return torch.cat([r for r, _ in out]), torch.cat([m for _, m in out])


@torch.no_grad()
def policy_outputs(rt: Runtime, cfg: TrainConfig, model, ids, mask, labels, *, values: bool):
    with rt.autocast():
        out = model(ids, mask, labels, temperature=cfg.temperature, return_values=values)
    R = labels.shape[1]
    return out.logprobs, (out.values[:, -R - 1 : -1] if values else None)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per response Σ_t k1(log π − log π_ref) over its tokens: a sample of KL(π‖π_ref) in nats."""
    return (rlhf_kernels.kl_penalty(logprobs, ref_logprobs, "k1") * mask).sum(-1)


class PPOTrainer:
    def __init__(
        self,
        rt: Runtime,
        cfg: TrainConfig,
        policy: PolicyValueModel,
        ref: PolicyValueModel,
        reward: RewardEnsemble,
        task: LabelerTask,
        log: MetricsLog,
        ckpt_path,
    ):
        self.rt, self.cfg, self.task, self.log = rt, cfg, task, log
        self.policy, self.ref, self.reward = policy, ref, reward
        self.ckpt_path = ckpt_path
        self.last_checkpoint: str | None = None
        self.ddp = rt.wrap(policy)
        self.optimizer = make_optimizer(policy, cfg.ppo_lr)
        self.kl_ctl = make_kl_controller(cfg)
        seed = cfg.seed * 1009 + PPO_SEED
        self.sample_gen = torch.Generator(device=rt.device).manual_seed(seed + 7919 * rt.rank)
        self.batch_gen = torch.Generator().manual_seed(seed + 1 + 7919 * rt.rank)
        self.tokens = 0
        self.start_step = 0

    # --- checkpoints ----------------------------------------------------------------------------------
    def generators(self) -> dict[str, torch.Generator]:
        return {"sample": self.sample_gen, "batch": self.batch_gen}

    def save(self, step: int) -> None:
        rng = checkpoint.rng_state(self.generators())
        if self.rt.distributed:
            every = [None] * self.rt.world
            dist.all_gather_object(every, rng)
        else:
            every = [rng]
        if self.rt.is_main:
            state = {
                "stage": "ppo",
                "step": step,
                "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "kl_ctl": checkpoint.kl_controller_state(self.kl_ctl),
                "rng": every,
                "tokens": self.tokens,
                "world": self.rt.world,
            }
            checkpoint.save_atomic(state, self.ckpt_path)
        self.rt.barrier()
        self.last_checkpoint = str(self.ckpt_path)

    def load(self, state: dict) -> None:
        if state["world"] != self.rt.world:
            raise RuntimeError(
                f"the PPO checkpoint was written by {state['world']} processes; this run has "
                f"{self.rt.world} (resume with the same --nproc_per_node)"
            )
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        checkpoint.restore_kl_controller(self.kl_ctl, state["kl_ctl"])
        checkpoint.restore_rng_state(state["rng"][self.rt.rank], self.generators())
        self.tokens = state["tokens"]
        self.start_step = state["step"] + 1
        self.last_checkpoint = str(self.ckpt_path)

    # --- one step -------------------------------------------------------------------------------------
    def prompts_for(self, step: int) -> Prompts:
        gen = torch.Generator().manual_seed(
            (self.cfg.seed * 1009 + PPO_SEED) * 100003 + step * 101 + self.rt.rank
        )
        return self.task.sample_prompts(self.cfg.rollout_batch, gen).to(self.rt.device)

    @torch.no_grad()
    def rollout(self, step: int) -> dict:
        rt, cfg = self.rt, self.cfg
        with rt.timed("ppo_generate"):
            prompts = self.prompts_for(step)
            self.policy.eval()
            responses, response_mask = sample(rt, cfg, self.policy, prompts, self.sample_gen)
        with rt.timed("ppo_score"):
            ids, mask = join(prompts, responses, response_mask)
            labels = response_labels(responses, response_mask)
            old_logprobs, old_values = policy_outputs(rt, cfg, self.policy, ids, mask, labels, values=True)
            ref_logprobs, _ = policy_outputs(rt, cfg, self.ref, ids, mask, labels, values=False)
            scores = self.reward(ids, mask, rt)
            gold = self.task.gold(prompts.topic, responses, response_mask)
        if step == cfg.inject_nan_at_step:  # test hook: a poisoned reward must stop the run
            scores = scores + float("nan")
        with rt.timed("ppo_advantages"):
            rewards, kl_mean = rlhf_kernels.token_level_rewards(
                scores,
                old_logprobs,
                ref_logprobs,
                response_mask,
                kl_coef=kl_coef_of(self.kl_ctl),
                estimator=cfg.kl_estimator,
                score_clip=cfg.score_clip if cfg.score_clip > 0 else None,
            )
            advantages, returns = rlhf_kernels.compute_gae(
                rewards, old_values, response_mask, cfg.gamma, cfg.lam
            )
            if cfg.whiten_advantages:
                advantages = rlhf_kernels.masked_whiten(advantages, response_mask)
            seq_kl = sequence_kl(old_logprobs, ref_logprobs, response_mask)
        return dict(
            ids=ids,
            mask=mask,
            labels=labels,
            response_mask=response_mask,
            old_logprobs=old_logprobs,
            old_values=old_values,
            ref_logprobs=ref_logprobs,
            advantages=advantages,
            returns=returns,
            rewards=rewards,
            scores=scores,
            gold=gold,
            kl_mean=kl_mean,
            seq_kl=seq_kl,
        )

    def update(self, batch: dict) -> dict:
        rt, cfg = self.rt, self.cfg
        self.policy.train()
        B, R = batch["labels"].shape
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.batch_gen).to(rt.device)
            for index in order.split(cfg.minibatch):
                m = batch["response_mask"][index]
                with rt.autocast():
                    out = self.ddp(
                        batch["ids"][index],
                        batch["mask"][index],
                        batch["labels"][index],
                        temperature=cfg.temperature,
                        return_entropy=True,
                        return_values=True,
                    )
                values = out.values[:, -R - 1 : -1]
                pg_loss, pg = rlhf_kernels.ppo_policy_loss(
                    out.logprobs,
                    batch["old_logprobs"][index],
                    batch["advantages"][index],
                    m,
                    clip_low=cfg.clip,
                    clip_high=cfg.clip_high if cfg.clip_high > 0 else None,
                    dual_clip=cfg.dual_clip if cfg.dual_clip > 0 else None,
                    loss_agg=cfg.loss_agg,
                )
                vf_loss, vf = rlhf_kernels.ppo_value_loss(
                    values,
                    batch["old_values"][index],
                    batch["returns"][index],
                    m,
                    clip=cfg.vf_clip if cfg.vf_clip > 0 else None,
                    loss_agg=cfg.loss_agg,
                )
                entropy = rlhf_kernels.agg_loss(out.entropy, m, cfg.loss_agg)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if cfg.ent_coef != 0:
                    loss = loss - cfg.ent_coef * entropy
                metrics = {
                    "pg_loss": pg_loss,
                    "vf_loss": vf_loss,
                    "entropy": entropy,
                    "clipfrac": pg["clipfrac"],
                    "approx_kl": pg["approx_kl"],
                    "vf_clipfrac": vf["clipfrac"],
                }
                if cfg.kl_loss_coef > 0:
                    kl_term = rlhf_kernels.kl_loss(
                        out.logprobs,
                        batch["ref_logprobs"][index],
                        m,
                        estimator=cfg.kl_loss_estimator,
                        loss_agg=cfg.loss_agg,
                    )
                    loss = loss + cfg.kl_loss_coef * kl_term
                    metrics["kl_loss"] = kl_term
                metrics["loss"] = loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                    self.policy.parameters(), cfg.max_grad_norm
                )
                self.optimizer.step()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                n += 1
        self.policy.eval()
        return {key: value / n for key, value in sums.items()}

    def run(self) -> None:
        rt, cfg = self.rt, self.cfg
        bar = progress(cfg.ppo_steps, "PPO", cfg.progress and rt.is_main)
        bar.update(self.start_step)
        global_batch = cfg.rollout_batch * rt.world
        for step in range(self.start_step, cfg.ppo_steps):
            t0 = time.perf_counter()
            batch = self.rollout(step)
            with rt.timed("ppo_update"):
                stats = self.update(batch)
            m = batch["response_mask"]
            check_finite(
                rt,
                "ppo",
                step,
                self.last_checkpoint,
                score=batch["scores"],
                rewards=batch["rewards"],
                advantages=batch["advantages"],
                returns=batch["returns"],
                loss=stats["loss"],
            )
            # One host sync per step, here where it logs: every metric in one transfer.
            names = ["score", "gold", "kl", "seq_kl", "response_len", "tokens", *stats]
            values = torch.stack(
                [
                    batch["scores"].mean(),
                    batch["gold"].mean(),
                    batch["kl_mean"],
                    batch["seq_kl"].mean(),
                    m.sum(-1).float().mean(),
                    batch["mask"].sum().float(),
                    *stats.values(),
                ]
            )
            values = rt.all_reduce_mean(values.float()).tolist()
            record = {"stage": "ppo", "step": step, **dict(zip(names, values))}
            record["tokens"] = record["tokens"] * rt.world
            self.tokens += int(record["tokens"])
            record["kl_coef"] = kl_coef_of(self.kl_ctl)
            # The controller sees the global batch's mean KL per response (nats), like Ziegler et al.
            self.kl_ctl.update(record["seq_kl"], global_batch)
            record["step_s"] = time.perf_counter() - t0
            if rt.is_main and (step % cfg.log_every == 0 or step == cfg.ppo_steps - 1):
                self.log.log(record)
            bar.update(1)
            bar.set_postfix(
                {
                    "score": fmt(record["score"]),
                    "gold": fmt(record["gold"]),
                    "kl": fmt(record["seq_kl"]),
                    "β": fmt(record["kl_coef"]),
                }
            )
            if (step + 1) % cfg.ckpt_every == 0 or step == cfg.ppo_steps - 1:
                with rt.timed("checkpoint"):
                    self.save(step)
            if step == cfg.halt_after_step:  # test hook: stop as if the process had been killed
                bar.close()
                raise SystemExit(f"halted after PPO step {step} (halt_after_step)")
        bar.close()


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def eval_prompts(rt: Runtime, cfg: TrainConfig, task: LabelerTask) -> Prompts:
    """This rank's share of the fixed evaluation prompts."""
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + EVAL_SEED)
    prompts = task.sample_prompts(cfg.eval_prompts, gen)
    return prompts.select(slice(rt.rank, None, rt.world)).to(rt.device)


@torch.no_grad()
def evaluate_policy(
    rt: Runtime,
    cfg: TrainConfig,
    task: LabelerTask,
    policy: PolicyValueModel,
    ref: PolicyValueModel,
    reward: RewardEnsemble,
    seed_offset: int,
) -> dict:
    """Mean gold score, reward score, per-response KL to the reference and length of sampled responses."""
    prompts = eval_prompts(rt, cfg, task)
    gen = torch.Generator(device=rt.device).manual_seed(
        cfg.seed * 1009 + EVAL_SEED + seed_offset + 7919 * rt.rank
    )
    responses, response_mask = sample(rt, cfg, policy, prompts, gen)
    ids, mask = join(prompts, responses, response_mask)
    labels = response_labels(responses, response_mask)
    logprobs, _ = policy_outputs(rt, cfg, policy, ids, mask, labels, values=False)
    ref_logprobs, _ = policy_outputs(rt, cfg, ref, ids, mask, labels, values=False)
    parts = task.scores(prompts.topic, responses, response_mask)
    sums = torch.stack(
        [
            parts["overall"].sum(),
            parts["helpful"].sum(),
            parts["harmless"].sum(),
            reward(ids, mask, rt).sum(),
            sequence_kl(logprobs, ref_logprobs, response_mask).sum(),
            response_mask.sum().float(),
            torch.tensor(float(len(prompts)), device=rt.device),
        ]
    )
    gold, helpful, harmless, score, kl, length, count = rt.all_reduce_sum(sums).tolist()  # host sync
    return {
        "gold": gold / count,
        "helpful": helpful / count,
        "harmless": harmless / count,
        "score": score / count,
        "kl": kl / count,
        "response_len": length / count,
    }


@torch.no_grad()
def best_of_n(
    rt: Runtime, cfg: TrainConfig, task: LabelerTask, policy: PolicyValueModel, reward: RewardEnsemble
) -> dict:
    """Rejection sampling: N samples per prompt from ``policy``, keep the reward ensemble's favourite."""
    prompts = eval_prompts(rt, cfg, task)
    N = cfg.best_of_n
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed * 1009 + EVAL_SEED + 17 + 7919 * rt.rank)
    many = prompts.repeat_interleave(N)
    responses, response_mask = sample(rt, cfg, policy, many, gen)
    ids, mask = join(many, responses, response_mask)
    scores = torch.cat(
        [
            reward(ids[i : i + GEN_CHUNK], mask[i : i + GEN_CHUNK], rt)
            for i in range(0, ids.shape[0], GEN_CHUNK)
        ]
    )
    gold = task.gold(many.topic, responses, response_mask)
    best = scores.view(-1, N).argmax(1)
    chosen = gold.view(-1, N).gather(1, best[:, None]).squeeze(1)
    oracle = gold.view(-1, N).amax(1)  # what a perfect reward model would pick
    sums = torch.stack([chosen.sum(), oracle.sum(), torch.tensor(float(len(prompts)), device=rt.device)])
    chosen_sum, oracle_sum, count = rt.all_reduce_sum(sums).tolist()  # host sync
    return {"best_of_n_gold": chosen_sum / count, "best_of_n_oracle_gold": oracle_sum / count}
