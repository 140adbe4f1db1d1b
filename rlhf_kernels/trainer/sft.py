"""Stage 1: supervised fine-tuning on the demonstrator's responses (token-mean NLL of the response)."""

from __future__ import annotations

import math

import torch

import rlhf_kernels

from .checkpoint import crash_point
from .config import TrainConfig
from .model import IGNORE_INDEX, PolicyValueModel, response_labels
from .report import MetricsLog
from .runtime import Runtime, fmt, progress, read_step
from .task import LabelerTask, join

SFT_SEED = 1


def lr_at(step: int, total: int, base: float, warmup: int = 10, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor · base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress_ = (step - warmup) / max(total - warmup, 1)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0))))


def make_optimizer(model: torch.nn.Module | list, lr: float) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters (or a list of parameters)."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else list(model)
    # Weight decay would pull the tiny model towards zero for no benefit at these step counts.  The fused
    # implementation is 3x faster than the per-parameter loop on CPU (and exists on CUDA).
    kwargs = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def optimizer_step(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor, max_grad_norm: float
) -> torch.Tensor:
    """Backward, gradient-norm clipping, AdamW step; returns the gradient norm (a tensor: no sync)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return grad_norm


def global_batch_index(n: int, batch: int, gen: torch.Generator, rt: Runtime) -> torch.Tensor:
    """This rank's share of a global batch drawn with a generator every rank advances identically."""
    index = torch.randint(n, (batch,), generator=gen)
    return index[rt.rank :: rt.world]


def train_sft(
    rt: Runtime, cfg: TrainConfig, model: PolicyValueModel, task: LabelerTask, log: MetricsLog
) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + SFT_SEED)
    prompts = task.sample_prompts(cfg.sft_demos, gen)
    responses, response_mask = task.demonstrations(prompts, gen)
    demo_gold = task.gold(prompts.topic, responses, response_mask).mean().item()  # no device sync: CPU data
    ids, mask = join(prompts, responses, response_mask)
    labels = response_labels(responses, response_mask)
    ids, mask, labels = rt.to_device(ids), rt.to_device(mask), rt.to_device(labels)

    ddp_model = rt.wrap(model, find_unused=True)  # the value head is idle during SFT
    optimizer = make_optimizer(model, cfg.sft_lr)
    batch_gen = torch.Generator().manual_seed(cfg.seed * 1009 + SFT_SEED + 1)
    log_every = max(1, cfg.sft_steps // 50)
    bar = progress(cfg.sft_steps, "SFT", cfg.progress and rt.is_main)
    model.train()
    with rt.timed("sft"):
        for step in range(cfg.sft_steps):
            rt.at("SFT", step, cfg.sft_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.sft_steps, cfg.sft_lr)
            index = rt.to_device(global_batch_index(len(ids), cfg.sft_batch, batch_gen, rt))
            with rt.autocast():
                out = ddp_model(ids[index], mask[index], labels[index])
            loss = -rlhf_kernels.agg_loss(out.logprobs, labels[index] != IGNORE_INDEX)  # token-mean NLL
            optimizer_step(optimizer, model, loss, cfg.max_grad_norm)
            bar.update(1)
            crash_point(f"sft step {step} done")
            if step % log_every == 0 or step == cfg.sft_steps - 1:
                nll = read_step(rt, "sft", step, {"nll": loss}, {"loss": loss})["nll"]
                bar.set_postfix({"nll": fmt(nll)})
                if rt.is_main:
                    log.log({"stage": "sft", "step": step, "nll": nll, "lr": optimizer.param_groups[0]["lr"]})
    bar.close()
    model.eval()
    return {"demo_gold": demo_gold, "sft_final_nll": nll}
