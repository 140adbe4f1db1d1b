"""Stage 2: reward models initialised from the SFT weights, trained on the labelers' preferences.

Each reward model is a :class:`PolicyValueModel` copied from the SFT policy whose scalar head reads the
score at the response's last real token (EOS, or the cut).  Its loss, per batch of comparisons:

    rm_pair_frac · pairwise_reward_loss(s_chosen, s_rejected)        (rlhf_kernels, −log σ(s_c − s_r))
  + (1 − rm_pair_frac) · ranking_reward_loss(s[B, K], mask=valid)    (rlhf_kernels, InstructGPT's K-way)
  + rm_lm_coef · NLL of the preferred response under the RM's lm_head (against reward over-fitting)

With ``rm_labels = "elo"`` the first two terms are replaced by pointwise_reward_loss(s, elo) on every
valid response: per prompt, an Elo scan (rlhf_kernels.ops.ratings) over all pairs of its ranked
responses in a random order turns the ranking into scalar labels (see :func:`elo_labels`).

Several reward models (``reward_models = "helpful:1,harmless:1"``: one per labeler aspect) are combined
by :class:`RewardEnsemble` as Σ wᵢ · (sᵢ − μᵢ) / σᵢ, with μᵢ, σᵢ the score statistics on held-out
responses, so the weights compare like with like.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import rlhf_kernels
from rlhf_kernels.ops.ratings import ELO_CENTER, ELO_SCALE, elo_ratings

from .checkpoint import crash_point
from .config import TrainConfig, parse_reward_models, rm_batch_split, rm_item_split
from .model import IGNORE_INDEX, PolicyValueModel, last_token_values, response_labels
from .report import MetricsLog
from .runtime import Runtime, fmt, progress, read_step
from .sft import global_batch_index, lr_at, make_optimizer, optimizer_step
from .task import Comparisons, LabelerTask

RM_SEED = 2
EVAL_CHUNK = 2048


@dataclass
class PreferenceSet:
    """Comparisons flattened for the model: [n, K, P + R] sequences, best first."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor  # [n, K, R]: the response tokens of the preferred one, IGNORE_INDEX elsewhere
    valid: torch.Tensor  # [n, K]
    gold: torch.Tensor  # [n, K]

    def __len__(self) -> int:
        return self.ids.shape[0]


def to_preference_set(comp: Comparisons, device: torch.device) -> PreferenceSet:
    n, K, R = comp.responses.shape
    prompt_ids = comp.prompts.ids[:, None].expand(n, K, -1)
    prompt_mask = comp.prompts.mask[:, None].expand(n, K, -1)
    ids = torch.cat([prompt_ids, comp.responses], 2)
    mask = torch.cat([prompt_mask, comp.response_mask & comp.valid[..., None]], 2)
    labels = response_labels(comp.responses, comp.response_mask)
    labels[:, 1:] = IGNORE_INDEX
    # non_blocking: a host → GPU copy of pageable memory need not wait for the GPU.
    tensors = (ids, mask, labels, comp.valid, comp.gold)
    return PreferenceSet(*(t.to(device, non_blocking=True) for t in tensors))


def make_preferences(
    cfg: TrainConfig, task: LabelerTask, aspect: str, n: int, seed: int, device: torch.device
) -> tuple[PreferenceSet, PreferenceSet | None]:
    """(pairs, K-way rankings) for one labeler aspect."""
    gen = torch.Generator().manual_seed(seed)
    n_pairs, n_ranked = rm_item_split(cfg, n)
    pairs = task.comparisons(n_pairs, aspect, gen, k_min=2, k_max=2)
    ranked = task.comparisons(n_ranked, aspect, gen, k_min=3, k_max=cfg.rm_max_k) if n_ranked else None
    return to_preference_set(pairs, device), (to_preference_set(ranked, device) if ranked else None)


RM_ELO_K = 32.0


def elo_labels(prefs: PreferenceSet, seed: int) -> torch.Tensor:
    """[n, K] scalar labels: each prompt is a league whose valid responses play every pair (i, j), i < j,
    the better-ranked one winning, in a random order; Elo ratings (k = RM_ELO_K) on the Bradley–Terry
    scale (R − 1000)·ln 10/400, the scale of the pairwise loss's σ(s_i − s_j).  Invalid responses: 0."""
    n, K = prefs.valid.shape
    device = prefs.valid.device
    first, second = torch.triu_indices(K, K, offset=1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(n, first.numel(), generator=gen).argsort(1).to(device)
    winners, losers = first.to(device)[order], second.to(device)[order]
    losers = torch.where(prefs.valid.gather(1, losers), losers, -1)  # -1: skipped by the scan
    ratings = elo_ratings(winners, losers, K, k=RM_ELO_K)
    return torch.where(prefs.valid, (ratings - ELO_CENTER) * ELO_SCALE, 0.0)


def elo_reward_loss(scores: torch.Tensor, parts: list, targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean (s − label)² over the valid responses of the batch's comparisons (invalid ones contribute
    0 without a host sync: their prediction is set to their label)."""
    valid = torch.cat([s.valid[i].flatten() for s, i in parts])
    target = torch.cat([t[i].flatten() for t, (_, i) in zip(targets, parts)]).to(scores.dtype)
    loss = rlhf_kernels.pointwise_reward_loss(torch.where(valid, scores, target), target)
    return loss * valid.numel() / valid.sum().clamp(min=1)


def sequence_scores(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rt: Runtime, labels: torch.Tensor | None = None
):
    """Scores [N] at each sequence's last real token (and the log-probs of ``labels`` when given)."""
    with rt.autocast():
        out = model(ids, mask, labels, return_values=True)
    return last_token_values(out.values, mask), out.logprobs


@torch.no_grad()
def score_all(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rt: Runtime) -> torch.Tensor:
    model = getattr(model, "module", model)
    flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    chunks = [
        sequence_scores(model, flat_ids[i : i + EVAL_CHUNK], flat_mask[i : i + EVAL_CHUNK], rt)[0]
        for i in range(0, flat_ids.shape[0], EVAL_CHUNK)
    ]
    return torch.cat(chunks).view(ids.shape[:-1])


def pairwise_accuracy(scores: torch.Tensor, valid: torch.Tensor, gold: torch.Tensor) -> dict:
    """Over every pair i < j of valid responses of a prompt: agreement of the scores with the true
    (gold) order, on pairs whose gold scores differ, and with the noisy labelers' order."""
    K = scores.shape[1]
    i, j = torch.triu_indices(K, K, offset=1, device=scores.device)
    both = valid[:, i] & valid[:, j]
    ds, dg = scores[:, i] - scores[:, j], gold[:, i] - gold[:, j]
    decided = both & (dg.abs() > 1e-6)
    vs_gold = ((ds * dg > 0) & decided).sum() / decided.sum().clamp(min=1)
    vs_labels = ((ds > 0) & both).sum() / both.sum().clamp(min=1)
    # host sync: the evaluation's one transfer
    accuracy, label_accuracy, pairs = torch.stack([vs_gold, vs_labels, decided.sum().float()]).tolist()
    return {"accuracy": accuracy, "label_accuracy": label_accuracy, "pairs": int(pairs)}


def accuracy_on(model: nn.Module, sets: list[PreferenceSet | None], rt: Runtime, scorer=None) -> dict:
    scores, valid, gold = [], [], []
    for s in sets:
        if s is None:
            continue
        scores.append(scorer(s.ids, s.mask) if scorer else score_all(model, s.ids, s.mask, rt))
        valid.append(s.valid)
        gold.append(s.gold)
    max_k = max(t.shape[1] for t in scores)
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, max_k - t.shape[1]), value=fill)  # noqa: E731
    return pairwise_accuracy(
        torch.cat([pad(t, 0.0) for t in scores]),
        torch.cat([pad(t, False) for t in valid]),
        torch.cat([pad(t, 0.0) for t in gold]),
    )


def train_reward_model(
    rt: Runtime,
    cfg: TrainConfig,
    sft_model: PolicyValueModel,
    task: LabelerTask,
    aspect: str,
    index: int,
    log: MetricsLog,
) -> tuple[PolicyValueModel, dict]:
    model = copy.deepcopy(sft_model)
    nn.init.zeros_(model.value_head.weight)
    nn.init.zeros_(model.value_head.bias)
    seed = cfg.seed * 1009 + RM_SEED + 10 * index
    pairs, ranked = make_preferences(cfg, task, aspect, cfg.rm_items, seed, rt.device)
    held_pairs, held_ranked = make_preferences(cfg, task, aspect, cfg.rm_heldout, seed + 5, rt.device)
    frac = 1.0 if ranked is None else cfg.rm_pair_frac
    elo = cfg.rm_labels == "elo"
    elo_targets = [elo_labels(s, seed + 2) for s in (pairs, ranked) if s is not None] if elo else []
    pair_batch, ranked_batch = rm_batch_split(cfg, ranked is not None, rt.world)

    ddp_model = rt.wrap(model, find_unused=True)
    optimizer = make_optimizer(model, cfg.rm_lr)
    batch_gen = torch.Generator().manual_seed(seed + 1)
    log_every = max(1, cfg.rm_steps // 50)
    bar = progress(cfg.rm_steps, f"reward model {index + 1} ({aspect})", cfg.progress and rt.is_main)
    center = cfg.rm_center_coef if cfg.rm_center_coef > 0 else None
    model.train()
    with rt.timed("reward_model"):
        for step in range(cfg.rm_steps):
            rt.at(f"reward model {index + 1} ({aspect})", step, cfg.rm_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.rm_steps, cfg.rm_lr)
            pi = rt.to_device(global_batch_index(len(pairs), pair_batch, batch_gen, rt))
            parts = [(pairs, pi)]
            if ranked is not None:
                ri = rt.to_device(global_batch_index(len(ranked), ranked_batch, batch_gen, rt))
                parts.append((ranked, ri))
            ids = torch.cat([s.ids[i].flatten(0, 1) for s, i in parts])
            mask = torch.cat([s.mask[i].flatten(0, 1) for s, i in parts])
            labels = torch.cat([s.labels[i].flatten(0, 1) for s, i in parts]) if cfg.rm_lm_coef > 0 else None
            scores, logprobs = sequence_scores(ddp_model, ids, mask, rt, labels)
            n_pair = pi.numel() * 2
            pair_scores = scores[:n_pair].view(-1, 2)
            loss_pair, metrics = rlhf_kernels.pairwise_reward_loss(
                pair_scores[:, 0], pair_scores[:, 1], center_coef=center
            )
            loss = frac * loss_pair
            accuracy = metrics["accuracy"]
            if ranked is not None:
                ranked_scores = scores[n_pair:].view(ri.numel(), -1)
                loss_rank, rank_metrics = rlhf_kernels.ranking_reward_loss(
                    ranked_scores, mask=ranked.valid[ri]
                )
                loss = loss + (1 - frac) * loss_rank
            if elo:  # the pairwise loss above then only gives the logged training accuracy
                loss = elo_reward_loss(scores, parts, elo_targets)
            if labels is not None:
                loss = loss - cfg.rm_lm_coef * rlhf_kernels.agg_loss(logprobs, labels != IGNORE_INDEX)
            optimizer_step(optimizer, model, loss, cfg.max_grad_norm)
            bar.update(1)
            crash_point(f"rm_{aspect} step {step} done")
            if step % log_every == 0 or step == cfg.rm_steps - 1:
                metrics = {"loss": loss, "acc": accuracy}
                read = read_step(rt, f"reward model {aspect!r}", step, metrics, {"loss": loss})
                loss_v, acc_v = read["loss"], read["acc"]
                bar.set_postfix({"loss": fmt(loss_v), "acc": fmt(acc_v)})
                if rt.is_main:
                    log.log({"stage": f"rm_{aspect}", "step": step, "loss": loss_v, "train_accuracy": acc_v})
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rt.at(f"reward model {index + 1} ({aspect}) evaluation")
    with rt.timed("reward_model_eval"):
        held = accuracy_on(model, [held_pairs, held_ranked], rt)
        all_scores = torch.cat(
            [
                score_all(model, s.ids, s.mask, rt)[s.valid]  # host sync: a boolean index sizes its output
                for s in (held_pairs, held_ranked)
                if s is not None
            ]
        )
        # host sync: the score statistics the ensemble normalises with
        mean, std = torch.stack([all_scores.mean(), all_scores.std().clamp(min=1e-3)]).tolist()
    stats = {
        "aspect": aspect,
        "labels": cfg.rm_labels,
        "heldout_accuracy": held["accuracy"],
        "heldout_label_accuracy": held["label_accuracy"],
        "heldout_pairs": held["pairs"],
        "score_mean": mean,
        "score_std": std,
    }
    crash_point(f"rm_{aspect} evaluated")
    return model, stats


class RewardEnsemble:
    """Σ wᵢ · (sᵢ − μᵢ) / σᵢ over frozen reward models."""

    def __init__(
        self,
        models: list[PolicyValueModel],
        names: list[str],
        weights: list[float],
        means: list[float],
        stds: list[float],
    ):
        self.models, self.names, self.weights, self.means, self.stds = models, names, weights, means, stds

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, rt: Runtime) -> torch.Tensor:
        return self.combine(self.raw_scores(ids, mask, rt))

    @torch.no_grad()
    def raw_scores(self, ids: torch.Tensor, mask: torch.Tensor, rt: Runtime) -> torch.Tensor:
        """[B, K]: each reward model's score sᵢ."""
        return torch.stack([sequence_scores(model, ids, mask, rt)[0].float() for model in self.models], -1)

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Σ wᵢ · (sᵢ − μᵢ) / σᵢ of :meth:`raw_scores` ([B, K] → [B]), summed in the models' order."""
        total = torch.zeros(raw.shape[0], device=raw.device)
        for s, w, mu, sd in zip(raw.unbind(-1), self.weights, self.means, self.stds):
            total = total + w * (s - mu) / sd
        return total

    def standardised(self, raw: torch.Tensor) -> torch.Tensor:
        """[B, K]: (sᵢ − μᵢ) / σᵢ, gdpo's reward components (weighted by ``weights`` after its group
        normalisation)."""
        means, stds = (torch.tensor(v, device=raw.device) for v in (self.means, self.stds))
        return (raw - means) / stds

    def scorer(self, rt: Runtime):
        def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
            chunks = [
                self(flat_ids[i : i + EVAL_CHUNK], flat_mask[i : i + EVAL_CHUNK], rt)
                for i in range(0, flat_ids.shape[0], EVAL_CHUNK)
            ]
            return torch.cat(chunks).view(ids.shape[:-1])

        return score


def train_reward_models(
    rt: Runtime, cfg: TrainConfig, sft_model: PolicyValueModel, task: LabelerTask, log: MetricsLog
) -> tuple[RewardEnsemble, dict]:
    models, stats = [], []
    spec = parse_reward_models(cfg.reward_models)
    for index, (aspect, _) in enumerate(spec):
        model, s = train_reward_model(rt, cfg, sft_model, task, aspect, index, log)
        rt.print(
            f"reward model {index + 1} ({aspect}): held-out pairwise accuracy {s['heldout_accuracy']:.3f} "
            f"(vs the noisy labels {s['heldout_label_accuracy']:.3f})"
        )
        models.append(model)
        stats.append(s)
    ensemble = RewardEnsemble(
        models,
        [a for a, _ in spec],
        [w for _, w in spec],
        [s["score_mean"] for s in stats],
        [s["score_std"] for s in stats],
    )
    return ensemble, {"reward_models": stats, **evaluate_ensemble(rt, cfg, task, ensemble)}


def evaluate_ensemble(rt: Runtime, cfg: TrainConfig, task: LabelerTask, ensemble: RewardEnsemble) -> dict:
    """Held-out accuracy of the combined reward against the overall gold order (the reported number)."""
    rt.at("reward ensemble evaluation")
    with rt.timed("reward_model_eval"):
        held_pairs, held_ranked = make_preferences(
            cfg, task, "overall", cfg.rm_heldout, cfg.seed * 1009 + RM_SEED + 999, rt.device
        )
        acc = accuracy_on(None, [held_pairs, held_ranked], rt, scorer=ensemble.scorer(rt))
    return {"rm_heldout_accuracy": acc["accuracy"], "rm_heldout_label_accuracy": acc["label_accuracy"]}


def ensemble_state(ensemble: RewardEnsemble) -> dict:
    return {
        "models": [m.state_dict() for m in ensemble.models],
        "names": ensemble.names,
        "weights": ensemble.weights,
        "means": ensemble.means,
        "stds": ensemble.stds,
    }


def ensemble_from_state(state: dict, cfg: TrainConfig, device: torch.device) -> RewardEnsemble:
    models = []
    for sd in state["models"]:
        model = PolicyValueModel(cfg).to(device)
        model.load_state_dict(sd)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models.append(model)
    return RewardEnsemble(
        models, list(state["names"]), list(state["weights"]), list(state["means"]), list(state["stds"])
    )
