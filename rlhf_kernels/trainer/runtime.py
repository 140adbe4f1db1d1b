"""Where the trainer runs: device, data parallelism, precision, progress bars, the NaN/inf guard."""

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

from .config import TrainConfig


class NonFiniteError(RuntimeError):
    """A loss, reward or advantage became NaN or infinite; the run stops, the last checkpoint stays."""


@dataclass
class Runtime:
    cfg: TrainConfig
    device: torch.device
    rank: int = 0
    world: int = 1
    timings: dict = field(default_factory=dict)  # seconds per phase, summed

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.dtype == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wrap(self, model: nn.Module, *, find_unused: bool = False) -> nn.Module:
        """The model DistributedDataParallel averages gradients of (the model itself with one process)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        tensor = tensor.detach().clone().float()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor / self.world

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
        """Adds the block's wall time to ``timings[name]`` (synchronises CUDA: timing only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Picks the device and, under ``torchrun`` (WORLD_SIZE > 1), joins the process group: NCCL on
    CUDA, gloo on CPU."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch.cuda.is_available() is False")
    if want_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(cfg=cfg, device=device, rank=rank, world=world)


def shutdown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_finite(
    rt: Runtime, stage: str, step: int, checkpoint: str | None, **quantities: torch.Tensor
) -> None:
    """Raises :class:`NonFiniteError` naming the stage, step and quantity when any value is NaN/inf.

    One host sync for all quantities (the trainer calls it where it logs).  Ranks agree: a non-finite
    value on any rank stops every rank."""
    names = list(quantities)
    flags = torch.stack([torch.isfinite(q.detach()).all() for q in quantities.values()]).float()
    flags = _all_reduce_min(rt, flags)
    bad = [name for name, ok in zip(names, flags.tolist()) if ok < 1]  # host sync (logging point)
    if bad:
        where = (
            f"the last good checkpoint {checkpoint} is intact" if checkpoint else "no checkpoint was written"
        )
        raise NonFiniteError(f"non-finite {', '.join(bad)} at {stage} step {step}: stopping ({where})")


def _all_reduce_min(rt: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    if not rt.distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


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
