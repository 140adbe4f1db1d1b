"""Where the trainer runs: device, data parallelism, precision, progress bars, phase timings, the NaN/inf
guard, and the one host look at each logged step's metrics."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, TrainConfig


class NonFiniteError(RuntimeError):
    """A loss, reward or advantage became NaN or infinite; the run stops, the last checkpoint stays."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with where the run stopped and its last checkpoint (the CLI prints how to resume)."""

    def __init__(self, where: str, checkpoint: str | None):
        super().__init__(where)
        self.where, self.checkpoint = where, checkpoint


@dataclass
class Runtime:
    cfg: TrainConfig
    device: torch.device
    rank: int = 0
    world: int = 1
    timings: dict = field(default_factory=dict)  # seconds per phase, summed
    position: tuple = ("start-up", 0, 0)  # (stage, step, steps) for the Ctrl-C message
    last_checkpoint: str | None = None
    restore: dict = field(default_factory=dict)  # process-wide settings changed by start(), to undo

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def process_group(self):
        """The group of every process (``masked_whiten(..., process_group=)``: global statistics), or
        None with one process."""
        return dist.group.WORLD if self.distributed else None

    def at(self, stage: str, step: int = 0, steps: int = 0) -> None:
        self.position = (stage, step, steps)

    def where(self) -> str:
        stage, step, steps = self.position
        return f"{stage} step {step + 1}/{steps}" if steps else stage

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.dtype == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # non_blocking: a host → GPU copy of pageable memory is staged without waiting for the GPU,
        # where a blocking one synchronises.
        return tensor.to(self.device, non_blocking=True)

    def wrap(self, model: nn.Module, *, find_unused: bool = False) -> nn.Module:
        """The model DistributedDataParallel averages gradients of (the model itself with one process);
        with ``--fsdp``, ``model`` itself, sharded in place by :func:`shard`."""
        if not self.distributed:
            return model
        if self.cfg.fsdp:
            return shard(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    @contextlib.contextmanager
    def timed(self, name: str):
        """Adds the block's wall time to ``timings[name]``.  Only with ``--profile`` does it synchronise
        the GPU around the block; without, GPU work still queued when a block ends is counted in the
        phase that next waits for it."""
        if self.cfg.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: --profile asked for exact phase times
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cfg.profile and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # host sync: --profile asked for exact phase times
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# Sharded data parallelism (--fsdp): torch's FSDP2
# ---------------------------------------------------------------------------------------------------
def shard(model: nn.Module) -> nn.Module:
    """FSDP2 (``fully_shard``) in place: every transformer block (a ModuleList named ``blocks`` or
    ``layers``) on its own, then the rest (embeddings, final norm, lm_head, value_head) as the root.
    Parameters, gradients and optimizer state are split across the default process group; a block's
    parameters are gathered for its forward and backward only.  Idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "layers"):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    # FSDP2 sets up its state on the root's first forward; generation calls the blocks directly, which
    # would make each block a root of its own: one forward of a single token through the root first,
    # then the root's parameters sharded again (a root keeps them gathered after its forward, and the
    # optimizer must see the shards).
    device = next(model.parameters()).device
    with torch.no_grad():
        one = torch.ones(1, 1, dtype=torch.int64, device=device)
        model(one, one.bool())
    model.reshard()
    return model


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    r"""(model state, optimizer state) as full tensors, for a checkpoint.  Collective under FSDP (every
    rank must call it; the full tensors land on the CPU); the plain ``state_dict()``\ s otherwise."""
    if not _is_sharded(model):
        return model.state_dict(), None if optimizer is None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, optim_state


def load_full_state(
    model: nn.Module, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
    optim_state: dict | None = None,
) -> None:
    """Loads what :func:`full_state` returned (every rank passes the same full state)."""
    if not _is_sharded(model):
        model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def plan_runtime(cfg: TrainConfig) -> Runtime:
    """The device and process layout of ``cfg`` under this environment (``torchrun`` sets WORLD_SIZE,
    RANK, LOCAL_RANK), checked before anything starts: :class:`ConfigError` for a device or dtype this
    machine cannot use, or batches too small for the process count."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    has_cuda = torch.cuda.is_available()
    problems = []
    if cfg.device == "cuda" and not has_cuda:
        problems.append("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    use_cuda = has_cuda and cfg.device != "cpu"
    if cfg.dtype == "bfloat16" and not use_cuda:
        problems.append(
            "--dtype bfloat16 needs a CUDA device (on the CPU the trainer runs float32); got device cpu"
        )
    elif cfg.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        problems.append("--dtype bfloat16: this GPU does not support bfloat16; use --dtype float32")
    if use_cuda and world > torch.cuda.device_count():
        problems.append(
            f"{world} processes need {world} GPUs (NCCL: one per process); this machine has "
            f"{torch.cuda.device_count()}: use --device cpu (gloo) or fewer processes"
        )
    for flag, at_least in (("sft_batch", world), ("eval_prompts", world)):
        if getattr(cfg, flag) < at_least:
            problems.append(f"--{flag} must be >= {at_least} (one per process); got {getattr(cfg, flag)}")
    if problems:
        raise ConfigError(problems)
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    return Runtime(cfg=cfg, device=device, rank=rank, world=world)


def start_runtime(rt: Runtime) -> Runtime:
    """Sets the process up for ``rt``: threads, the CUDA device, the process group (NCCL on CUDA, gloo on
    CPU); :func:`shutdown_runtime` undoes it."""
    import rlhf_kernels
    from rlhf_kernels import _dispatch

    if rt.cfg.threads > 0:
        rt.restore["threads"] = torch.get_num_threads()
        torch.set_num_threads(rt.cfg.threads)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
        # The log-prob ops range-check their labels with a host sync per call; the trainer's labels are
        # its own samples, in range by construction.
        rt.restore["index_checks"] = _dispatch.index_checks_enabled()
        rlhf_kernels.set_index_checks(False)
    if rt.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if rt.device.type == "cuda" else "gloo")
    return rt


def shutdown_runtime(rt: Runtime) -> None:
    import rlhf_kernels

    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
    if "threads" in rt.restore:
        torch.set_num_threads(rt.restore["threads"])
    if "index_checks" in rt.restore:
        rlhf_kernels.set_index_checks(rt.restore["index_checks"])


def read_step(
    rt: Runtime,
    stage: str,
    step: int,
    metrics: dict[str, torch.Tensor],
    guard: dict[str, torch.Tensor],
    checkpoint: str | None = None,
) -> dict[str, float]:
    """The host's one look at a logged step: ``metrics`` (0-dim tensors, averaged over ranks) as floats.

    Raises :class:`NonFiniteError` naming the stage, step and quantity when any value of ``guard`` is
    NaN/inf; ranks agree (a non-finite value on any rank stops every rank)."""
    flags = torch.stack([torch.isfinite(q.detach()).all() for q in guard.values()]).float()
    # (under --fsdp the gradient norm is a DTensor: its full value, the same on every rank)
    values = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in metrics.values()]
    values = torch.stack([v.detach().float().reshape(()) for v in values])
    if rt.distributed:
        both = rt.all_reduce_sum(torch.cat([flags, values]))
        flags, values = both[: len(guard)], both[len(guard) :] / rt.world
    host = torch.cat([flags, values]).tolist()  # host sync: the step's one transfer, where it logs
    bad = [name for name, ok in zip(guard, host) if ok < rt.world]
    if bad:
        where = (
            f"the last good checkpoint {checkpoint} is intact" if checkpoint else "no checkpoint was written"
        )
        raise NonFiniteError(f"non-finite {', '.join(bad)} at {stage} step {step}: stopping ({where})")
    return dict(zip(metrics, host[len(guard) :]))


# ---------------------------------------------------------------------------------------------------
# How long a GPU-sized preset takes on this CPU
# ---------------------------------------------------------------------------------------------------
def estimate_cpu_seconds(cfg: TrainConfig) -> float:
    """A rough estimate of the whole run on this CPU: one training step of the model is timed here, and
    every stage is counted in sequences through it (a forward-only sequence as a third of one)."""
    from .model import PolicyValueModel
    from .sft import make_optimizer

    with torch.random.fork_rng():
        model = PolicyValueModel(cfg)
        optimizer = make_optimizer(model, 1e-4)
        batch = min(cfg.sft_batch, 32)
        ids = torch.randint(4, cfg.vocab_size, (batch, cfg.seq_len))
        mask = torch.ones_like(ids, dtype=torch.bool)
        labels = ids[:, -cfg.max_new_tokens :]
        seconds = []
        for _ in range(3):  # the first is a warm-up
            start = time.perf_counter()
            out = model(ids, mask, labels, return_values=True)
            (out.logprobs.mean() + out.values.mean()).backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
    per_sequence = min(seconds[1:]) / batch
    n_rm = len(cfg.reward_models.split(","))
    trained = (
        cfg.sft_steps * cfg.sft_batch
        + n_rm * cfg.rm_steps * cfg.rm_batch * (2 + cfg.rm_max_k) / 2
        + cfg.ppo_steps * cfg.ppo_epochs * cfg.rollout_batch
    )
    forward = cfg.ppo_steps * cfg.rollout_batch * (3 + n_rm) + cfg.eval_prompts * (4 + cfg.best_of_n)
    return per_sequence * (trained + forward / 3)


# ---------------------------------------------------------------------------------------------------
# Progress bars: tqdm when installed, else a line every ~10 %.
# ---------------------------------------------------------------------------------------------------
class _PlainBar:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.n, self.postfix, self.start, self.next_print = 0, "", time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and (self.n / self.total >= self.next_print or self.n == self.total):
            self.next_print = math.floor(self.n / self.total * 10 + 1) / 10
            elapsed = time.perf_counter() - self.start
            print(
                f"{self.desc}: {self.n}/{self.total} [{elapsed:.1f}s] {self.postfix}",
                file=sys.stderr,
                flush=True,
            )

    def set_postfix(self, values: dict) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True, file=sys.stderr)
        except ImportError:
            pass
    return _PlainBar(total, desc, enabled)


def fmt(value: float) -> str:
    return f"{value:.3g}"
