"""Per-call overhead of the registered path, for inputs so small that the work itself is negligible.

For each op, from the innermost layer out (each row's time includes the layers inside it):

    raw          the backend body called as a plain Python function: on CPU the PyTorch path's body
                 (``RegisteredOp.body`` of the ``*_torch`` op), on CUDA the Triton launcher
    custom op    (CPU) the ``*_torch`` op through the dispatcher
    registered   ``torch.ops.rlhf_kernels.<op>``: the dispatcher, the backend choice, the op inside
    public       the public function: argument checks, the registered op, the autograd wiring
    public+grad  the same with an input that requires grad (autograd records a node)
    compiled     the public function under ``torch.compile`` (argument checks and Python glue are
                 traced away; on CUDA Inductor launches the Triton kernels without the dispatcher)
    compat       the framework shim around the public function (rlhf_kernels.compat)
    eager        the framework's eager idiom on the same input, for scale

``fwd`` rows only; ``speedup`` is relative to ``raw`` (below 1: the layer's cost).  The label range
check of ``logprobs_from_logits`` reads device memory (a host sync on CUDA); ``public (no index check)``
shows the cost without it (``RLHF_KERNELS_CHECK_INDICES=0``).

A second set of cases ("swap ...") times the framework functions a user swaps for ``rlhf_kernels.compat``
at training sizes, forward+backward where there is a gradient, with peak memory: the framework's eager
idiom (from ``bench/baselines``) against the shim.  These are the numbers quoted in ``docs/compat-*.md``.
"""

from __future__ import annotations

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.compat import openrlhf as compat_openrlhf
from rlhf_kernels.compat import trl as compat_trl
from rlhf_kernels.compat import verl as compat_verl
from rlhf_kernels.ops import kl as kl_ops
from rlhf_kernels.ops import logprobs as logprobs_ops
from rlhf_kernels.ops import ppo_losses as ppo_ops
from rlhf_kernels.ops.cpu import kl as kl_cpu
from rlhf_kernels.ops.cpu import logprobs as logprobs_cpu
from rlhf_kernels.ops.cpu import ppo_losses as ppo_cpu

from .baselines import advantages as advantage_peers
from .baselines import logprobs as logprob_peers
from .baselines import losses as loss_peers
from .harness import Bench

FAMILY = "overhead"
OPS = torch.ops.rlhf_kernels


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()

    return call


def _compiled(fn):
    compiled = torch.compile(fn, fullgraph=True)
    return _no_grad(compiled)


def _measure_all(bench: Bench, case: str, layers: list[tuple[str, object]]) -> None:
    for impl, fn in layers:
        bench.measure(FAMILY, case, impl, "fwd", fn, memory=False, baseline=None if impl == "raw" else "raw")


def _logprobs(bench: Bench, device: torch.device) -> None:
    logits = torch.randn(8, 64, device=device)
    labels = torch.randint(0, 64, (8,), device=device)
    leaf = logits.clone().requires_grad_()
    cuda = device.type == "cuda"
    raw = (
        (lambda: logprobs_ops._fwd_triton(logits, labels, 1.0, -100, False))
        if cuda
        else (lambda: logprobs_cpu.logprobs_fwd_torch.body(logits, labels, 1.0, -100, False))
    )
    layers = [("raw", raw)]
    if not cuda:
        layers.append(("custom op", lambda: OPS.logprobs_fwd_torch.default(logits, labels, 1.0, -100, False)))
    layers += [
        ("registered", _no_grad(lambda: OPS.logprobs_fwd.default(logits, labels, 1.0, -100, False, False))),
        ("public", _no_grad(lambda: logprobs_ops.logprobs_from_logits(logits, labels, temperature=1.0))),
        ("public+grad", lambda: logprobs_ops.logprobs_from_logits(leaf, labels, temperature=1.0)),
        ("compiled", _compiled(lambda: logprobs_ops.logprobs_from_logits(logits, labels, temperature=1.0))),
        ("compat (verl)", lambda: compat_verl.logprobs_from_logits(leaf, labels)),
        ("eager", lambda: logprob_peers.eager_logprobs(leaf, labels)),
    ]
    _measure_all(bench, "logprobs 8x64", layers)
    previous = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(False)
    try:
        bench.measure(
            FAMILY,
            "logprobs 8x64",
            "public (no index check)",
            "fwd",
            _no_grad(lambda: logprobs_ops.logprobs_from_logits(logits, labels, temperature=1.0)),
            memory=False,
            baseline="raw",
        )
    finally:
        _dispatch.set_index_checks(previous)


def _kl(bench: Bench, device: torch.device) -> None:
    lp, ref = -torch.rand(64, device=device), -torch.rand(64, device=device)
    leaf = lp.clone().requires_grad_()
    cuda = device.type == "cuda"
    raw = (
        (lambda: kl_ops._launch_fwd(lp, ref, "k3"))
        if cuda
        else (lambda: kl_cpu.kl_penalty_fwd_torch.body(lp, ref, "k3"))
    )
    layers = [("raw", raw)]
    if not cuda:
        layers.append(("custom op", lambda: OPS.kl_penalty_fwd_torch.default(lp, ref, "k3")))
    layers += [
        ("registered", _no_grad(lambda: OPS.kl_penalty.default(lp, ref, "k3"))),
        ("public", _no_grad(lambda: kl_ops.kl_penalty(lp, ref, "k3"))),
        ("public+grad", lambda: kl_ops.kl_penalty(leaf, ref, "k3")),
        ("compiled", _compiled(lambda: kl_ops.kl_penalty(lp, ref, "k3"))),
        ("compat (verl)", lambda: compat_verl.kl_penalty(leaf, ref, "low_var_kl")),
        ("compat (openrlhf)", lambda: compat_openrlhf.compute_approx_kl(leaf, ref, kl_estimator="k3")),
    ]
    _measure_all(bench, "kl_penalty k3 64", layers)


def _policy(bench: Bench, device: torch.device) -> None:
    lp = -torch.rand(4, 16, device=device)
    old = lp + 0.1 * torch.randn(4, 16, device=device)
    adv = torch.randn(4, 16, device=device)
    mask = torch.rand(4, 16, device=device) < 0.8
    leaf = lp.clone().requires_grad_()
    cuda = device.type == "cuda"
    raw = (
        (lambda: ppo_ops._launch_policy_fwd(lp, old, adv, mask, 0.2, 0.2, 3.0))
        if cuda
        else (lambda: ppo_cpu.ppo_policy_loss_fwd_torch.body(lp, old, adv, mask, 0.2, 0.2, 3.0))
    )
    layers = [("raw", raw)]
    if not cuda:
        layers.append(
            ("custom op", lambda: OPS.ppo_policy_loss_fwd_torch.default(lp, old, adv, mask, 0.2, 0.2, 3.0))
        )
    layers += [
        ("registered", _no_grad(lambda: OPS.ppo_policy_loss_fwd.default(lp, old, adv, mask, 0.2, 0.2, 3.0))),
        ("public", _no_grad(lambda: ppo_ops.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0))),
        ("public+grad", lambda: ppo_ops.ppo_policy_loss(leaf, old, adv, mask, dual_clip=3.0)),
        ("compiled", _compiled(lambda: ppo_ops.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0))),
        ("compat (verl)", lambda: compat_verl.compute_policy_loss(old, leaf, adv, mask, cliprange=0.2)),
        ("eager", lambda: loss_peers.verl_compute_policy_loss(old, leaf, adv, mask.float(), cliprange=0.2)),
    ]
    _measure_all(bench, "ppo_policy_loss 4x16", layers)


# ---------------------------------------------------------------------------------------------------
# Swaps at training sizes: the framework's eager function vs the compat shim
# ---------------------------------------------------------------------------------------------------
def _fwd_bwd(fn, leaves):
    """forward + backward of the sum of ``fn``'s floating outputs; returns the gradients (kept alive
    until the memory probe has read its peak)."""

    def call():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad).backward()
        grads = [leaf.grad for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        return grads

    return call


def _swap(bench: Bench, case: str, pairs: list[tuple[str, object]], mode: str) -> None:
    baseline = pairs[0][0]
    for impl, fn in pairs:
        bench.measure(FAMILY, case, impl, mode, fn, baseline=None if impl == baseline else baseline)


def _swaps(bench: Bench, device: torch.device) -> None:
    quick = bench.quick or device.type == "cpu"
    n, vocab = (512, 32000) if quick else (8192, 151936)
    rows, cols = (64, 1024) if quick else (256, 4096)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    logits = torch.randn(n, vocab, device=device).mul_(2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device)

    def verl_eager():
        return logprob_peers.eager_logprobs(logits, labels), logprob_peers.verl_entropy_from_logits(
            logits.float()
        )

    def verl_shim():
        return compat_verl.logprobs_from_logits(logits, labels, False), compat_verl.entropy_from_logits(
            logits
        )

    case = f"swap verl logprobs+entropy N={n} V={vocab}"
    _swap(
        bench,
        case,
        [
            ("eager log_softmax+gather + verl entropy", _fwd_bwd(verl_eager, [logits])),
            ("compat.verl", _fwd_bwd(verl_shim, [logits])),
        ],
        "fwd+bwd",
    )
    case = f"swap trl selective_log_softmax N={n} V={vocab}"
    batch_logits = logits.view(8, n // 8, vocab)
    batch_labels = labels.view(8, n // 8)
    _swap(
        bench,
        case,
        [
            (
                "trl eager",
                _fwd_bwd(
                    lambda: logprob_peers.trl_selective_log_softmax(batch_logits, batch_labels), [logits]
                ),
            ),
            (
                "compat.trl",
                _fwd_bwd(lambda: compat_trl.selective_log_softmax(batch_logits, batch_labels), [logits]),
            ),
        ],
        "fwd+bwd",
    )
    logits = labels = batch_logits = batch_labels = None  # frees the [N, V] buffers

    rewards, values = torch.randn(rows, cols, device=device), torch.randn(rows, cols, device=device)
    mask = (torch.arange(cols, device=device) < torch.randint(1, cols + 1, (rows, 1), device=device)).float()
    case = f"swap verl compute_gae_advantage_return {rows}x{cols}"
    _swap(
        bench,
        case,
        [
            (
                "verl eager",
                lambda: advantage_peers.verl_compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95),
            ),
            (
                "compat.verl",
                lambda: compat_verl.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95),
            ),
        ],
        "fwd",
    )
    case = f"swap openrlhf get_advantages_and_returns {rows}x{cols}"
    _swap(
        bench,
        case,
        [
            (
                "openrlhf eager",
                lambda: advantage_peers.openrlhf_get_advantages_and_returns(values, rewards, mask, 1.0, 0.95),
            ),
            (
                "compat.openrlhf",
                lambda: compat_openrlhf.get_advantages_and_returns(values, rewards, mask, 1.0, 0.95),
            ),
        ],
        "fwd",
    )

    lp = (-torch.rand(rows, cols, device=device) * 3).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(rows, cols, device=device)
    adv = torch.randn(rows, cols, device=device)
    case = f"swap verl compute_policy_loss {rows}x{cols}"
    _swap(
        bench,
        case,
        [
            (
                "verl eager",
                _fwd_bwd(
                    lambda: loss_peers.verl_compute_policy_loss(old, lp, adv, mask, cliprange=0.2), [lp]
                ),
            ),
            (
                "compat.verl",
                _fwd_bwd(lambda: compat_verl.compute_policy_loss(old, lp, adv, mask, cliprange=0.2), [lp]),
            ),
        ],
        "fwd+bwd",
    )
    eager_policy = loss_peers.OpenRLHFPolicyLoss(0.2, 0.2)
    shim_policy = compat_openrlhf.PolicyLoss(0.2, 0.2)
    case = f"swap openrlhf PolicyLoss {rows}x{cols}"
    _swap(
        bench,
        case,
        [
            ("openrlhf eager", _fwd_bwd(lambda: eager_policy(lp, old, adv, mask), [lp])),
            ("compat.openrlhf", _fwd_bwd(lambda: shim_policy(lp, old, adv, mask), [lp])),
        ],
        "fwd+bwd",
    )


def run(bench: Bench) -> None:
    device = bench.device
    # On CPU, one intra-op thread for both sides of every comparison: the per-call cases are far below
    # any parallel grain, and on a shared machine an OpenMP parallel region that waits for a busy core
    # costs milliseconds, which would drown what this file measures.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            _logprobs(bench, device)
            _kl(bench, device)
            _policy(bench, device)
            _dispatch.set_index_checks(False)  # the label range check syncs on CUDA; timed code must not
            try:
                _swaps(bench, device)
            finally:
                _dispatch.set_index_checks(True)
    finally:
        torch.set_num_threads(threads)
