"""Stage 3: PPO on the shared policy/value backbone, plus the evaluations (gold score, best-of-N).

One PPO step (per rank; DistributedDataParallel averages the gradients):

1. rollout: ``rollout_batch`` prompts, one sampled response each (KV-cache generation);
2. score: the policy's log-probs and values, the frozen reference's log-probs (the SFT weights), the
   reward ensemble's score of each response;
3. advantages: ``token_level_rewards`` (score at the last token − β·KL per token, β from the fixed or
   adaptive KL controller), ``compute_gae``, ``masked_whiten``;
4. update: ``ppo_epochs`` passes over shuffled minibatches, each one's loss assembled by :func:`ppo_loss`
   (ppo_policy_loss + vf_coef · ppo_value_loss − ent_coef · entropy (+ kl_loss_coef · kl_loss)), the
   value head reading the same backbone as the policy;
5. metrics: :func:`step_metrics` gathers them as 0-dim tensors; ``runtime.read_step`` reads them and the
   NaN guard's flags in the step's one host transfer; the KL controller then takes the step's KL.

Every number in steps 2–4 comes from the library's ops (``rlhf_kernels.*``).  Host syncs: the step's one
transfer, generation's one per token, and a checkpoint when one is written (each marked ``host sync``).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import rlhf_kernels

from . import checkpoint
from .config import TrainConfig
from .model import ModelOutput, PolicyValueModel, generate, response_labels
from .report import MetricsLog
from .reward import RewardEnsemble
from .runtime import Runtime, fmt, full_state, load_full_state, progress, read_step
from .sft import make_optimizer, optimizer_step
from .task import LabelerTask, Prompts, join

PPO_SEED = 3
EVAL_SEED = 4
GEN_CHUNK = 1024
# What a PPO minibatch takes from the rollout.
MINIBATCH_KEYS = ("ids", "mask", "labels", "response_mask", "old_logprobs", "old_values", "ref_logprobs")
MINIBATCH_KEYS += ("advantages", "returns", "rollout_logprobs", "is_weights", "loss_mask")
# The rollout-correction diagnostics logged every step (training forward vs generation, both of the policy
# that sampled): rlhf_kernels.rollout_correction's metrics, prefixed "rc_".
ROLLOUT_CORRECTION_METRICS = ("kl", "k3_kl", "log_ppl_abs_diff", "chi2_token", "chi2_seq")
ROLLOUT_CORRECTION_METRICS += ("rollout_is_mean", "rollout_is_eff_sample_size")
ROLLOUT_CORRECTION_METRICS += ("rollout_rs_masked_fraction", "rollout_rs_seq_masked_fraction")  # --rollout_rs


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
    rt: Runtime,
    cfg: TrainConfig,
    model: PolicyValueModel,
    prompts: Prompts,
    gen: torch.Generator,
    *,
    return_logprobs: bool = False,
    temperature: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """(responses, response_mask[, the rollout engine's log-probs]) of ``prompts``, in chunks."""
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
                    temperature=cfg.temperature if temperature is None else temperature,
                    top_k=cfg.top_k,
                    generator=gen,
                    return_logprobs=return_logprobs,
                )
            )
    return tuple(torch.cat(parts) for parts in zip(*out))


@torch.no_grad()
def policy_outputs(rt: Runtime, cfg: TrainConfig, model, ids, mask, labels, *, values: bool):
    with rt.autocast():
        out = model(ids, mask, labels, temperature=logprob_temperature(cfg), return_values=values)
    R = labels.shape[1]
    return out.logprobs, (out.values[:, -R - 1 : -1] if values else None)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per response Σ_t k1(log π − log π_ref) over its tokens: a sample of KL(π‖π_ref) in nats."""
    return (rlhf_kernels.kl_penalty(logprobs, ref_logprobs, "k1") * mask).sum(-1)


def logprob_temperature(cfg: TrainConfig) -> float:
    """The temperature of the log-probs PPO optimises: the sampling one, or 1 with greedy decoding (0)."""
    return cfg.temperature if cfg.temperature > 0 else 1.0


def policy_term(
    cfg: TrainConfig, logprobs: torch.Tensor, mb: dict[str, torch.Tensor], default: str = "ppo"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss of ``--policy_loss`` (``auto``: ``default``, "ppo" = ppo_policy_loss, else
    a POLICY_LOSSES name) with the rollout-correction weights ``mb["is_weights"]`` when set; ``bypass_mode``
    takes the generation's log-probs as the old ones and computes its own weights."""
    mask = mb["response_mask"]
    clips = clip_params(cfg)
    name = loss_name(cfg, default)
    if name == "ppo":
        return rlhf_kernels.ppo_policy_loss(
            logprobs,
            mb["old_logprobs"],
            mb["advantages"],
            mask,
            **clips,
            loss_agg=cfg.loss_agg,
            is_weights=mb.get("is_weights"),
        )
    if name == "bypass_mode":
        return rlhf_kernels.bypass_mode_policy_loss(
            logprobs,
            mb["rollout_logprobs"],
            mb["advantages"],
            mask,
            level=None if cfg.rollout_is == "none" else cfg.rollout_is,
            threshold=cfg.rollout_is_threshold,
            **clips,
            loss_agg=cfg.loss_agg,
        )
    offered = dict(**clips, is_weights=mb.get("is_weights"))
    fn = rlhf_kernels.get_policy_loss(name)
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in offered.items() if k in accepted}
    if "loss_agg" in accepted and name != "geo_mean":  # geo_mean ignores loss_agg (verl's rule)
        kwargs["loss_agg"] = cfg.loss_agg
    return fn(logprobs, mb["old_logprobs"], mb["advantages"], mask, **kwargs)


def clip_params(cfg: TrainConfig) -> dict:
    """The policy losses' clip keywords of the flags (clip_high, dual_clip: 0 is off)."""
    return dict(
        clip_low=cfg.clip,
        clip_high=cfg.clip_high if cfg.clip_high > 0 else None,
        dual_clip=cfg.dual_clip if cfg.dual_clip > 0 else None,
    )


def loss_name(cfg: TrainConfig, default: str) -> str:
    """The policy loss ``--policy_loss`` means (``auto``: ``default``)."""
    return default if cfg.policy_loss == "auto" else cfg.policy_loss


def fused_loss_kwargs(cfg: TrainConfig, mb: dict[str, torch.Tensor], default: str = "ppo") -> dict:
    """``--fused_loss``: the keywords of ``rlhf_kernels.linear_policy_loss`` for the minibatch ``mb`` that
    give :func:`policy_term`'s loss (``ppo`` is its ``vanilla``), the entropy bonus and the kl_loss term
    (``config.fused_loss_problems`` refused every loss it cannot fuse before any work)."""
    name = loss_name(cfg, default)
    name = "vanilla" if name == "ppo" else name
    accepted = inspect.signature(rlhf_kernels.get_policy_loss(name)).parameters
    kwargs = dict(
        old_logprobs=mb["old_logprobs"],
        advantages=mb["advantages"],
        mask=mb["response_mask"],
        loss=name,
        loss_params={k: v for k, v in clip_params(cfg).items() if k in accepted},
        is_weights=mb.get("is_weights"),
        entropy_coef=cfg.ent_coef,
        loss_agg=cfg.loss_agg,
    )
    if cfg.kl_loss_coef > 0:
        kwargs.update(
            ref_logprobs=mb["ref_logprobs"], kl_coef=cfg.kl_loss_coef, kl_estimator=cfg.kl_loss_estimator
        )
    return kwargs


def rollout_mismatch(
    cfg: TrainConfig, logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """``rollout_correction`` of the training forward's log-probs against the generation's (KV cache):
    the importance weights of ``--rollout_is`` (None when off), the mask of the tokens ``--rollout_rs``
    keeps (None when off) and the mismatch metrics of every step."""
    rs = cfg.rollout_rs != "none"
    weights, keep, metrics = rlhf_kernels.rollout_correction(
        logprobs,
        rollout_logprobs,
        mask,
        level=None if cfg.rollout_is == "none" else cfg.rollout_is,
        threshold=cfg.rollout_is_threshold,
        rejection={cfg.rollout_rs: cfg.rollout_rs_threshold} if rs else None,
    )
    metrics = {f"rc_{k}": metrics[k].float() for k in ROLLOUT_CORRECTION_METRICS if k in metrics}
    return weights, keep if rs else None, metrics


def ppo_loss(
    cfg: TrainConfig, out: ModelOutput, mb: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The minibatch loss, from the library's ops:

        ppo_policy_loss + vf_coef · ppo_value_loss − ent_coef · entropy (+ kl_loss_coef · kl_loss)

    ``out`` is the policy/value forward of the minibatch ``mb`` (a slice of the rollout); with
    ``--fused_loss`` it carries ``linear_policy_loss``'s (policy − ent_coef · entropy + kl_loss_coef ·
    kl_loss, metrics) and the value loss is added to it.  Returns the loss and its terms (0-dim tensors,
    nothing read on the host)."""
    mask = mb["response_mask"]
    values = out.values[:, -mask.shape[1] - 1 : -1]  # the value of the state before each response token
    vf_loss, vf = rlhf_kernels.ppo_value_loss(
        values,
        mb["old_values"],
        mb["returns"],
        mask,
        clip=cfg.vf_clip if cfg.vf_clip > 0 else None,
        loss_agg=cfg.loss_agg,
    )
    if out.policy_loss is not None:
        fused, metrics = out.policy_loss
        terms = {"pg_loss": metrics["pg_loss"], "vf_loss": vf_loss}
        if "entropy" in metrics:  # computed only with an entropy bonus
            terms["entropy"] = metrics["entropy"]
        terms.update({key: metrics[key] for key in ("clipfrac", "approx_kl") if key in metrics})
        terms["vf_clipfrac"] = vf["clipfrac"]
        if "kl_loss" in metrics:
            terms["kl_loss"] = metrics["kl_loss"]
        return fused + cfg.vf_coef * vf_loss, terms
    pg_loss, pg = policy_term(cfg, out.logprobs, mb)
    entropy = rlhf_kernels.agg_loss(out.entropy, mask, cfg.loss_agg)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if cfg.ent_coef != 0:
        loss = loss - cfg.ent_coef * entropy
    terms = {
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "entropy": entropy,
        **{key: pg[key] for key in ("clipfrac", "approx_kl") if key in pg},
        "vf_clipfrac": vf["clipfrac"],
    }
    if cfg.kl_loss_coef > 0:
        terms["kl_loss"] = rlhf_kernels.kl_loss(
            out.logprobs, mb["ref_logprobs"], mask, estimator=cfg.kl_loss_estimator, loss_agg=cfg.loss_agg
        )
        loss = loss + cfg.kl_loss_coef * terms["kl_loss"]
    return loss, terms


def step_metrics(batch: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PPO step's metrics as 0-dim tensors: the rollout's (this rank's means) and the update's (means
    over its minibatches)."""
    return {
        "score": batch["scores"].mean(),
        "gold": batch["gold"].mean(),
        "kl": batch["kl_mean"],
        "seq_kl": batch["seq_kl"].mean(),
        "response_len": batch["response_mask"].sum(-1).float().mean(),
        "tokens": batch["mask"].sum().float(),
        "gen_tokens": batch["response_mask"].sum().float() + batch.get("extra_gen_tokens", 0.0),
        **batch.get("mismatch", {}),
        **({"baseline": batch["baseline"]} if "baseline" in batch else {}),
        **update,
    }


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
        save_checkpoint: Callable[[dict], str],
    ):
        self.rt, self.cfg, self.task, self.log = rt, cfg, task, log
        self.policy, self.ref, self.reward = policy, ref, reward
        self.save_checkpoint = save_checkpoint  # writes ppo.pt (rank 0), returns its path
        self.last_checkpoint: str | None = None
        self.ddp = rt.wrap(policy)
        self.optimizer = make_optimizer(policy, cfg.ppo_lr)
        self.kl_ctl = make_kl_controller(cfg)
        seed = cfg.seed * 1009 + PPO_SEED
        self.sample_gen = torch.Generator(device=rt.device).manual_seed(seed + 7919 * rt.rank)
        self.batch_gen = torch.Generator().manual_seed(seed + 1 + 7919 * rt.rank)
        self.tokens = 0
        self.gen_tokens = 0  # response tokens generated in stage 3 (the compare budget's unit)
        self.start_step = 0

    # --- checkpoints ----------------------------------------------------------------------------------
    def generators(self) -> dict[str, torch.Generator]:
        return {"sample": self.sample_gen, "batch": self.batch_gen}

    def save(self, step: int) -> None:
        rng = checkpoint.rng_state(self.generators())
        if self.rt.distributed:
            every = [None] * self.rt.world
            dist.all_gather_object(every, rng)  # host sync: every rank's RNG state goes to rank 0
        else:
            every = [rng]
        # full tensors; a collective under --fsdp, so every rank calls it
        policy_state, optim_state = full_state(self.policy, self.optimizer)
        if self.rt.is_main:
            state = {
                "step": step,
                "policy": policy_state,
                "optimizer": optim_state,
                "kl_ctl": checkpoint.kl_controller_state(self.kl_ctl),
                "rng": every,
                "tokens": self.tokens,
                "gen_tokens": self.gen_tokens,
                "world": self.rt.world,
                **self.extra_state(),
            }
            self.last_checkpoint = self.save_checkpoint(state)
        self.rt.barrier()

    def load(self, state: dict, path: str) -> None:
        load_full_state(self.policy, state["policy"], self.optimizer, state["optimizer"])
        checkpoint.restore_kl_controller(self.kl_ctl, state["kl_ctl"])
        checkpoint.restore_rng_state(state["rng"][self.rt.rank], self.generators())
        self.tokens = state["tokens"]
        self.gen_tokens = state.get("gen_tokens", 0)
        self.start_step = state["step"] + 1
        self.last_checkpoint = path
        self.load_extra_state(state)

    def extra_state(self) -> dict:
        """What an algorithm keeps besides the policy, optimizer, KL controller and RNG (none for PPO)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # --- one step -------------------------------------------------------------------------------------
    def prompts_for(self, step: int) -> Prompts:
        gen = torch.Generator().manual_seed(
            (self.cfg.seed * 1009 + PPO_SEED) * 100003 + step * 101 + self.rt.rank
        )
        return self.task.sample_prompts(self.cfg.rollout_batch, gen).to(self.rt.device)

    @torch.no_grad()
    def generate_rollout(self, step: int) -> tuple[Prompts, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompts, responses, response_mask, the generation's log-probs) of step ``step``."""
        with self.rt.timed("ppo_generate"):
            prompts = self.prompts_for(step)
            self.policy.eval()
            return (
                prompts,
                *sample(self.rt, self.cfg, self.policy, prompts, self.sample_gen, return_logprobs=True),
            )

    def token_rewards(
        self, scores, logprobs, ref_logprobs, response_mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_level_rewards``: the score at the last token, −β·KL on every token (β: the controller)."""
        cfg = self.cfg
        return rlhf_kernels.token_level_rewards(
            scores,
            logprobs,
            ref_logprobs,
            response_mask,
            kl_coef=kl_coef_of(self.kl_ctl),
            estimator=cfg.kl_estimator,
            score_clip=cfg.score_clip if math.isfinite(cfg.score_clip) else None,
        )

    @torch.no_grad()
    def rollout(self, step: int) -> dict:
        rt, cfg = self.rt, self.cfg
        prompts, responses, response_mask, rollout_logprobs = self.generate_rollout(step)
        with rt.timed("ppo_score"):
            ids, mask = join(prompts, responses, response_mask)
            labels = response_labels(responses, response_mask)
            old_logprobs, old_values = policy_outputs(rt, cfg, self.policy, ids, mask, labels, values=True)
            is_weights, loss_mask, mismatch = rollout_mismatch(
                cfg, old_logprobs, rollout_logprobs, response_mask
            )
            ref_logprobs, _ = policy_outputs(rt, cfg, self.ref, ids, mask, labels, values=False)
            scores = self.reward(ids, mask, rt)
            gold = self.task.gold(prompts.topic, responses, response_mask)
        if step == cfg.inject_nan_at_step:  # test hook: a poisoned reward must stop the run
            scores = scores + float("nan")
        with rt.timed("ppo_advantages"):
            rewards, kl_mean = self.token_rewards(scores, old_logprobs, ref_logprobs, response_mask)
            advantages, returns = rlhf_kernels.compute_gae(
                rewards, old_values, response_mask, cfg.gamma, cfg.lam
            )
            if cfg.whiten_advantages:
                # over the global batch under DDP: one all_reduce of the per-rank statistics
                advantages = rlhf_kernels.masked_whiten(
                    advantages, response_mask, process_group=rt.process_group
                )
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
            rollout_logprobs=rollout_logprobs,
            is_weights=is_weights,
            loss_mask=loss_mask,
            mismatch=mismatch,
        )

    MINIBATCH_KEYS = MINIBATCH_KEYS  # what a minibatch takes from the batch (indexed on its first dim)

    def minibatch_size(self) -> int:
        return self.cfg.minibatch

    default_loss = "ppo"  # what --policy_loss auto means

    def forward(self, mb: dict[str, torch.Tensor], *, values: bool) -> ModelOutput:
        """The training forward of a minibatch: log-probs and entropy (and the values); with
        ``--fused_loss`` the policy loss from the hidden states instead of the log-probs and entropy."""
        fused = fused_loss_kwargs(self.cfg, mb, self.default_loss) if self.cfg.fused_loss else None
        with self.rt.autocast():
            return self.ddp(
                mb["ids"],
                mb["mask"],
                mb["labels"],
                temperature=logprob_temperature(self.cfg),
                return_entropy=fused is None,
                return_values=values,
                policy_loss=fused,
            )

    def minibatch_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one minibatch and its terms (0-dim tensors): PPO's, policy and value together."""
        return ppo_loss(self.cfg, self.forward(mb, values=True), mb)

    def update(self, batch: dict) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes over shuffled minibatches of the rollout (of ``batch["labels"]``'s first
        dimension); returns the mean over the minibatches of the loss, its terms and the gradient norm
        (0-dim tensors: no host sync)."""
        rt, cfg = self.rt, self.cfg
        self.policy.train()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = rt.to_device(torch.randperm(len(batch["labels"]), generator=self.batch_gen))
            for index in order.split(self.minibatch_size()):
                mb = {key: batch[key][index] for key in self.MINIBATCH_KEYS if batch.get(key) is not None}
                if "loss_mask" in mb:  # --rollout_rs: the rejected tokens leave every term of the loss
                    mb["response_mask"] = mb.pop("loss_mask")
                loss, terms = self.minibatch_loss(mb)
                grad_norm = optimizer_step(self.optimizer, self.policy, loss, cfg.max_grad_norm)
                for key, value in {**terms, "loss": loss, "grad_norm": grad_norm}.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                n += 1
        self.policy.eval()
        return {key: value / n for key, value in sums.items()}

    def train_step(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One step of stage 3: (its metrics, what the NaN guard checks), 0-dim or batch tensors."""
        batch = self.rollout(step)
        checkpoint.crash_point(f"ppo step {step} rolled out")
        with self.rt.timed("ppo_update"):
            update = self.update(batch)
        # The NaN guard checks what a checkpoint must never take in.
        guard = {
            "score": batch["scores"],
            "rewards": batch["rewards"],
            "advantages": batch["advantages"],
            "returns": batch["returns"],
            "loss": update["loss"],
        }
        return step_metrics(batch, update), guard

    def after_step(self, record: dict) -> None:
        """Host-side bookkeeping once the step's metrics are read: the KL controller."""
        record["kl_coef"] = kl_coef_of(self.kl_ctl)
        # The controller sees the global batch's mean KL per response (nats), like Ziegler et al.
        self.kl_ctl.update(record["seq_kl"], self.cfg.rollout_batch * self.rt.world)

    def budget_spent(self) -> bool:
        """``--gen_token_budget`` response tokens generated (every rank counts the global total)."""
        return 0 < self.cfg.gen_token_budget <= self.gen_tokens

    POSTFIX = (("score", "score"), ("gold", "gold"), ("kl", "seq_kl"), ("β", "kl_coef"))

    def run(self) -> None:
        rt, cfg = self.rt, self.cfg
        bar = progress(cfg.ppo_steps, cfg.algo.upper(), cfg.progress and rt.is_main)
        bar.update(self.start_step)
        for step in range(self.start_step, cfg.ppo_steps):
            if self.budget_spent():
                break
            rt.at(cfg.algo.upper(), step, cfg.ppo_steps)
            t0 = time.perf_counter()
            metrics, guard = self.train_step(step)
            record = {
                "stage": "ppo",
                "step": step,
                **read_step(rt, "ppo", step, metrics, guard, self.last_checkpoint),
            }
            if "tokens" in record:
                record["tokens"] = record["tokens"] * rt.world
                record["gen_tokens"] = record["gen_tokens"] * rt.world
                self.tokens += int(record["tokens"])
                self.gen_tokens += int(record["gen_tokens"])
            record["total_gen_tokens"] = self.gen_tokens
            self.after_step(record)
            record["step_s"] = time.perf_counter() - t0
            if rt.is_main and (step % cfg.log_every == 0 or step == cfg.ppo_steps - 1 or self.budget_spent()):
                self.log.log(record)
            bar.update(1)
            bar.set_postfix({label: fmt(record[key]) for label, key in self.POSTFIX if key in record})
            if (step + 1) % cfg.ckpt_every == 0 or step == cfg.ppo_steps - 1 or self.budget_spent():
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
            torch.full((), float(len(prompts)), device=rt.device),  # a fill, not a host → device copy
        ]
    )
    # host sync: the evaluation's one transfer
    gold, helpful, harmless, score, kl, length, count = rt.all_reduce_sum(sums).tolist()
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
    count = torch.full((), float(len(prompts)), device=rt.device)
    sums = torch.stack([chosen.sum(), oracle.sum(), scores.view(-1, N).amax(1).sum(), count])
    sums = torch.cat([sums, response_mask.sum()[None].float()])
    # host sync: the evaluation's one transfer
    chosen_sum, oracle_sum, score_sum, count, generated = rt.all_reduce_sum(sums).tolist()
    return {
        "best_of_n_gold": chosen_sum / count,
        "best_of_n_oracle_gold": oracle_sum / count,
        "best_of_n_score": score_sum / count,
        "best_of_n_gen_tokens": int(generated),
    }
