"""Policy losses of verl 0.9.1's registry: ours (ops/policy_losses.py) vs verl's own registered function,
forward+backward, with rollout importance weights.

Minimal traffic over N = B·T tokens (fp32 log-probs, old log-probs, advantages, weights, a bool mask):
the forward reads 17 bytes per token, the backward reads them again and writes the fp32 gradient (21
bytes per token).  Each case first checks that ours matches verl (loss and gradient) before timing.
verl is imported with the peer-parity suite's placeholder modules (tests/peers/placeholders.py).

    python -m bench.bench_policy_losses     # prints fwd+bwd medians and the speedup over verl (CPU)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from rlhf_kernels.ops.policy_losses import POLICY_LOSSES

from .harness import Bench, measure_ceilings

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
    return import_peer("verl.trainer.ppo.core_algos"), import_peer("verl.workers.config.actor")


def _config(actor):
    return actor.ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode="token-mean",
        global_batch_info={}, clip_ratio=0.2, policy_loss=actor.PolicyLossConfig(dro_beta=0.3),
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

    def ours(x):
        return ours_fn(x, old, adv, mask, is_weights=weights, **extra)[0]

    def verl(x):
        return verl_fn(old, x, adv, mask_f, mode, config, weights)[0]

    return ours, verl


def _fwd_bwd(fn, x: torch.Tensor):
    def step():
        x.grad = None
        fn(x).backward()

    return step


def run(bench: Bench) -> None:
    core, actor = _verl()
    config = _config(actor)
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


if __name__ == "__main__":
    device = torch.device("cpu")
    bench = Bench(device, measure_ceilings(device), quick=False)
    run(bench)
    for row in bench.rows:
        speedup = f"  {row.speedup:.2f}x" if row.speedup else ""
        print(f"{row.case:32s} {row.impl:13s} {row.median_ms:9.2f} ms{speedup}", flush=True)
