"""Advantage estimators: ours vs verl 0.9.1's own registered functions (the installed package, imported
with the peer-parity suite's placeholders for its heavy dependencies), 4096 responses in groups of 8
under shuffled uids, T = 2048.  Each case is first checked equal to verl at the valid tokens.

verl groups with Python dicts and loops over samples (and, for reinforce_plus_plus, over T); ours are
segment reductions on [B] and, on CPU tensors, the C++ kernels of csrc/advantages.cpp for the [B, T]
passes.  Two rows of ours: ``rlhf_kernels`` is the default ("auto": ``cpp`` on CPU, its note says which
backend ran), ``rlhf_kernels (torch)`` the plain-PyTorch path forced.  Threads: torch's (set
``OMP_NUM_THREADS``).  Minimal traffic (fp32 rewards, fp32 mask as in this benchmark): the outcome
estimators read the rewards and the mask and write the advantages, B·T·4·3 bytes (remax and
reinforce_plus_plus also write the returns: B·T·4·4); the optimal-token-baseline ones also read log π and
Σπ² and write the returns, B·T·4·6.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.advantages import ADVANTAGE_ESTIMATORS, uid_index
from rlhf_kernels.ops.advantages import FAMILY as OPS_FAMILY

from .harness import Bench

FAMILY = "advantages"
GROUP = 8


def _verl_core() -> types.ModuleType:
    """verl.trainer.ppo.core_algos through the peer suite's import helper (tests/peers/placeholders.py,
    loaded by path: ``tests`` is not a package)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "peers" / "placeholders.py"
    spec = importlib.util.spec_from_file_location("_peer_placeholders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.import_peer("verl.trainer.ppo.core_algos")


def _inputs(B: int, T: int, device: torch.device):
    gen = torch.Generator().manual_seed(B + T)
    perm = torch.randperm(B, generator=gen).numpy()
    uids = np.array([f"uid-{i // GROUP}" for i in range(B)], dtype=object)[perm]
    rewards = torch.zeros(B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=gen).float()
    mask = (torch.arange(T) < lengths[:, None]).float()
    extra = {"old_log_probs": -torch.rand(B, T, generator=gen) * 3,
             "sum_pi_squared": torch.rand(B, T, generator=gen) * 0.5,
             "baselines": torch.rand(B, generator=gen)}
    move = lambda t: t.to(device)  # noqa: E731
    return move(rewards), move(mask), uids, {k: move(v) for k, v in extra.items()}


def _cases(verl, rewards, mask, uids, index, extra):
    """name → (ours, verl's), both returning (advantages, returns)."""
    lp, pi2, base = extra["old_log_probs"], extra["sum_pi_squared"], extra["baselines"]
    config = types.SimpleNamespace(gamma=1.0)
    table = ADVANTAGE_ESTIMATORS
    cases = {
        "grpo": (lambda: table["grpo"](rewards, mask, index),
                 lambda: verl.compute_grpo_outcome_advantage(rewards, mask, uids)),
        "grpo (Dr.GRPO)": (lambda: table["grpo"](rewards, mask, index, 1e-6, False),
                           lambda: verl.compute_grpo_outcome_advantage(rewards, mask, uids, 1e-6, False)),
        "grpo_passk": (lambda: table["grpo_passk"](rewards, mask, index),
                       lambda: verl.compute_grpo_passk_outcome_advantage(rewards, mask, uids, config={})),
        "rloo": (lambda: table["rloo"](rewards, mask, index),
                 lambda: verl.compute_rloo_outcome_advantage(rewards, mask, uids)),
        "opo": (lambda: table["opo"](rewards, mask, index),
                lambda: verl.compute_opo_outcome_advantage(rewards, mask, uids)),
        "gpg": (lambda: table["gpg"](rewards, mask, index),
                lambda: verl.compute_gpg_outcome_advantage(rewards, mask, uids)),
        "gdpo": (lambda: table["gdpo"](rewards, mask, index),
                 lambda: verl.compute_gdpo_outcome_advantage(rewards, mask, uids)),
        "reinforce_plus_plus_baseline": (
            lambda: table["reinforce_plus_plus_baseline"](rewards, mask, index),
            lambda: verl.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards, mask, uids)),
        "reinforce_plus_plus": (
            lambda: table["reinforce_plus_plus"](rewards, mask, 1.0),
            lambda: verl.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=config)),
        "remax": (lambda: table["remax"](rewards, base, mask),
                  lambda: verl.compute_remax_outcome_advantage(rewards, base, mask)),
        "optimal_token_baseline": (
            lambda: table["optimal_token_baseline"](rewards, mask, index, lp, pi2),
            lambda: verl.compute_optimal_token_baseline_advantage(rewards, mask, uids, lp, pi2)),
        "tir_optimal_token_baseline": (
            lambda: table["tir_optimal_token_baseline"](rewards, mask, index, lp, pi2),
            lambda: verl.compute_multi_turn_optimal_token_baseline_advantage(rewards, mask, uids, lp, pi2)),
    }
    return cases


def _check(name: str, ours, theirs, mask: torch.Tensor) -> None:
    tol = 1e-3 if "reinforce" in name or name == "gdpo" else 1e-4
    got, want = ours()[0].double(), torch.where(mask != 0, theirs()[0], 0.0).double()
    error = ((got - want).abs() / (1 + want.abs())).max().item()
    if not error <= tol:
        raise AssertionError(f"advantages {name}: ours differ from verl's by {error:.3g} (tol {tol:g})")


def _traffic(name: str, B: int, T: int) -> int:
    if "optimal" in name:
        return B * T * 4 * 6
    return B * T * 4 * (4 if name in ("remax", "reinforce_plus_plus") else 3)


def run(bench: Bench, B: int = 4096, T: int = 2048) -> None:
    verl = _verl_core()
    rewards, mask, uids, extra = _inputs(B, T, bench.device)
    index = uid_index(uids, bench.device)
    backend = _dispatch.backend_for(OPS_FAMILY, bench.device)
    for name, (ours, theirs) in _cases(verl, rewards, mask, uids, index, extra).items():
        _check(name, ours, theirs, mask)
        traffic = _traffic(name, B, T)
        case = f"{name} B={B} G={GROUP} T={T}"
        bench.measure(FAMILY, case, "verl", "fwd", theirs, bytes_moved=traffic, memory=False)
        bench.measure(FAMILY, case, "rlhf_kernels", "fwd", ours, bytes_moved=traffic, memory=False,
                      baseline="verl", note=f"backend {backend}")
        if backend != "torch":
            def forced_torch(ours=ours):
                with _dispatch.use_backend("torch"):
                    return ours()

            _check(name, forced_torch, theirs, mask)
            bench.measure(FAMILY, case, "rlhf_kernels (torch)", "fwd", forced_torch, bytes_moved=traffic,
                          memory=False, baseline="verl", note="backend torch")
