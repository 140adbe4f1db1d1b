"""Policy losses of verl 0.9.1's registry: ours (ops/policy_losses.py) vs verl's own registered function,
forward+backward, with rollout importance weights.

Minimal traffic over N = B·T tokens (fp32 log-probs, old log-probs, advantages, weights, a bool mask):
the forward reads 17 bytes per token, the backward reads them again and writes the fp32 gradient (21
bytes per token).  Each case first checks that ours matches verl (loss and gradient) before timing.
verl is imported with the peer-parity suite's placeholder modules (tests/peers/placeholders.py).

    python -m bench.bench_policy_losses [--threads N] [--dtype bfloat16] [--reps 7] [names ...]

prints, for each loss at B = 512, T = 2048 on CPU, the fwd+bwd medians of ours and verl timed alternately
in one process (wall and process CPU time; on a shared machine the CPU-time ratio is the steadier one)
and the speedup; "ppo_policy_loss" is ``ppo_policy_loss`` without weights against verl's vanilla.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from rlhf_kernels.ops.policy_losses import POLICY_LOSSES

from .harness import Bench

FAMILY = "policy_losses"
KWARGS = {
    "dro": {"beta": 0.3},
    "vanilla": {"dual_clip": 3.0},
    "dppo_tv": {"truncation": 3.0},
    "dppo_kl": {"truncation": 3.0},
}


def _verl():
    # tests/ is not a package (and a site-packages "tests" may shadow it): load the helper by its path.
    path = Path(__file__).resolve().parents[1] / "tests" / "peers" / "placeholders.py"
    spec = importlib.util.spec_from_file_location("peers_placeholders", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    import_peer = module.import_peer
    core, actor = import_peer("verl.trainer.ppo.core_algos"), import_peer("verl.workers.config.actor")
    return core, actor, import_peer("verl.trainer.config.algorithm")


def _config(actor, algorithm):
    # bypass_mode's settings (ignored by the other losses): PPO-clip on π/π_rollout, token-level TIS at 2
    correction = algorithm.RolloutCorrectionConfig(
        rollout_is="token", rollout_is_threshold=2.0, bypass_mode=True, loss_type="ppo_clip"
    )
    return actor.ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode="token-mean",
        global_batch_info={}, clip_ratio=0.2,
        policy_loss=actor.PolicyLossConfig(dro_beta=0.3, rollout_correction=correction),
    )


def _shapes(bench: Bench) -> list[tuple[int, int]]:
    if bench.device.type == "cuda":
        return [(512, 4096)]
    return [(64, 512)] if bench.quick else [(512, 2048)]


def _inputs(rows: int, cols: int, device: torch.device):
    lp = -torch.rand(rows, cols, device=device) * 3
    old = lp + torch.randn(rows, cols, device=device) * 0.3
    adv = torch.randn(rows, cols, device=device)
    weights = torch.rand(rows, cols, device=device) * 2
    lengths = torch.randint(cols // 4, cols + 1, (rows, 1), device=device)
    mask = torch.arange(cols, device=device) < lengths  # right-padded responses
    return lp, old, adv, weights, mask


def _pair(core, config, name: str, old, adv, weights, mask):
    """(ours, verl): the loss of variant ``name`` as a function of the log-probs, with rollout weights."""
    mode = "seq-mean-token-mean" if name in ("gspo", "sapo") else "token-mean"
    extra = dict(KWARGS.get(name, {}), **({} if name == "geo_mean" else {"loss_agg": mode}))
    ours_fn, verl_fn, mask_f = POLICY_LOSSES[name], core.POLICY_LOSS_REGISTRY[name], mask.float()
    if name == "bypass_mode":  # old = the rollout's log-probs; the weights come from them (_config)
        extra, weights = dict(extra, level="token", threshold=2.0), None

    def ours(x):
        return ours_fn(x, old, adv, mask, **extra, **({} if weights is None else {"is_weights": weights}))[0]

    def verl(x):
        return verl_fn(old, x, adv, mask_f, mode, config, weights)[0]

    return ours, verl


def _fwd_bwd(fn, x: torch.Tensor):
    def step():
        x.grad = None
        fn(x).backward()

    return step


def run(bench: Bench) -> None:
    core, actor, algorithm = _verl()
    config = _config(actor, algorithm)
    for rows, cols in _shapes(bench):
        lp, old, adv, weights, mask = _inputs(rows, cols, bench.device)
        for name in POLICY_LOSSES:
            ours, verl = _pair(core, config, name, old, adv, weights, mask)
            if name != "clip_cov":  # verl draws clip_cov's tokens at random
                _check(ours, verl, lp, name)
            case = f"{name} B={rows} T={cols} fp32"
            for impl, fn, baseline in (("verl", verl, None), ("rlhf_kernels", ours, "verl")):
                step = _fwd_bwd(fn, lp.detach().clone().requires_grad_())
                bench.measure(
                    FAMILY, case, impl, "fwd+bwd", step, bytes_moved=38 * lp.numel(), memory=False,
                    baseline=baseline,
                )


def _check(ours, verl, lp: torch.Tensor, what: str) -> None:
    results = []
    for fn in (ours, verl):
        x = lp.detach().clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (want, want_grad) = results
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{what} grad: {m}")


def interleaved(names: list[str], reps: int, dtype: torch.dtype) -> None:
    """Ours and verl alternately, ``reps`` times each, medians of wall and process CPU time."""
    from rlhf_kernels.ops.ppo_losses import ppo_policy_loss

    core, actor, algorithm = _verl()
    config = _config(actor, algorithm)
    torch.manual_seed(0)
    tensors = _inputs(512, 2048, torch.device("cpu"))
    lp, old, adv, weights, mask = (t.to(dtype) if t.is_floating_point() else t for t in tensors)
    print(f"threads={torch.get_num_threads()} load={os.getloadavg()} dtype={dtype}", flush=True)
    for name in names:
        if name == "ppo_policy_loss":
            vanilla, mask_f = core.POLICY_LOSS_REGISTRY["vanilla"], mask.float()
            pair = (
                lambda x: ppo_policy_loss(x, old, adv, mask, dual_clip=3.0)[0],
                lambda x: vanilla(old, x, adv, mask_f, "token-mean", config)[0],  # noqa: B023 (used at once)
            )
        else:
            pair = _pair(core, config, name, old, adv, weights, mask)
        steps = [_fwd_bwd(fn, lp.detach().clone().requires_grad_()) for fn in pair]
        wall, cpu = ([[], []], [[], []])
        for step in steps:
            step()
        for _ in range(reps):
            for i, step in enumerate(steps):
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
        (ours, verl), (ours_cpu, verl_cpu) = ([statistics.median(v) * 1e3 for v in w] for w in (wall, cpu))
        print(
            f"{name:16s} wall: ours {ours:7.1f} ms verl {verl:7.1f} ms {verl / ours:5.2f}x | "
            f"cpu: ours {ours_cpu:7.1f} ms verl {verl_cpu:7.1f} ms {verl_cpu / ours_cpu:5.2f}x",
            flush=True,
        )
    print(f"load={os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*", default=["ppo_policy_loss", *POLICY_LOSSES])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    interleaved(args.names, args.reps, getattr(torch, args.dtype))
