"""Out-of-bounds guard for every Triton kernel (issue 19), in Triton's interpreter.

Every kernel launch is intercepted (``InterpretedFunction.run``): each tensor argument's storage is
copied into the middle of a larger allocation whose other bytes — a 64 KiB guard region on either side,
and every byte of the storage that no argument's view covers (the gaps of a sliced layout) — hold the
sentinel 0xFF (NaN in every float dtype, −1 in the integer ones).  After the launch the test fails if
any sentinel byte changed (a write outside the tensors), and the public op's outputs and gradients must
equal, bit for bit, those of the same call without the guard (a read outside the tensors would bring a
NaN sentinel into them).  Masked-off lanes are not read by ``tl.load``; an unmasked read whose value is
discarded is not visible here, and is what ``compute-sanitizer --tool memcheck`` finds on a GPU
(``docs/robustness.md`` gives the command).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _dispatch

triton = pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="the guard intercepts Triton's interpreter (CPU runs)")

GUARD = 1 << 16  # bytes of sentinel on either side of each storage
SENTINEL = 0xFF


def _byte_view(storage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class _GuardedStorage:
    """One argument storage copied between two guard regions, its uncovered bytes set to the sentinel."""

    def __init__(self, storage):
        self.original = storage
        self.nbytes = storage.nbytes()
        self.buffer = torch.full((GUARD + self.nbytes + GUARD,), SENTINEL, dtype=torch.uint8)
        self.owned = torch.zeros(self.nbytes, dtype=torch.bool)

    def cover(self, t: torch.Tensor) -> None:
        item = t.element_size()
        if t.numel() == 0:
            return
        elements = torch.arange(self.nbytes // item).as_strided(t.shape, t.stride(), t.storage_offset())
        first = elements.reshape(-1, 1) * item + torch.arange(item)
        self.owned[first.reshape(-1)] = True

    def fill(self) -> None:
        middle = self.buffer[GUARD : GUARD + self.nbytes]
        middle[self.owned] = _byte_view(self.original)[self.owned]

    def view(self, t: torch.Tensor) -> torch.Tensor:
        item = t.element_size()
        assert GUARD % item == 0
        out = torch.empty(0, dtype=t.dtype)
        return out.set_(
            self.buffer.untyped_storage(), GUARD // item + t.storage_offset(), t.shape, t.stride()
        )

    def check_and_write_back(self, kernel: str) -> None:
        before, after = self.buffer[:GUARD], self.buffer[GUARD + self.nbytes :]
        middle = self.buffer[GUARD : GUARD + self.nbytes]
        assert bool((before == SENTINEL).all()), f"{kernel} wrote before a tensor's storage"
        assert bool((after == SENTINEL).all()), f"{kernel} wrote past the end of a tensor's storage"
        assert bool((middle[~self.owned] == SENTINEL).all()), (
            f"{kernel} wrote into a gap between a view's elements"
        )
        _byte_view(self.original)[self.owned] = middle[self.owned]


@contextlib.contextmanager
def guarded_launches():
    """Runs every interpreted Triton launch on guarded copies of its tensor arguments; yields the list of
    kernel names launched."""
    original_run = interpreter.InterpretedFunction.run
    launched: list[str] = []

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        guards: dict[int, _GuardedStorage] = {}

        def tensors(values):
            for v in values:
                base = getattr(v, "base", v) if not isinstance(v, torch.Tensor) else v
                if isinstance(base, torch.Tensor):
                    yield base

        for t in tensors(list(args) + list(kwargs.values())):
            key = t.untyped_storage().data_ptr()
            guards.setdefault(key, _GuardedStorage(t.untyped_storage())).cover(t)
        for g in guards.values():
            g.fill()

        def swap(v):
            if isinstance(v, torch.Tensor):
                return guards[v.untyped_storage().data_ptr()].view(v)
            if isinstance(getattr(v, "base", None), torch.Tensor):  # triton.reinterpret wrappers
                return triton.reinterpret(swap(v.base), v.dtype)
            return v

        result = original_run(self, *[swap(a) for a in args], grid=grid, warmup=warmup,
                              **{k: swap(v) for k, v in kwargs.items()})
        name = getattr(self.fn, "__name__", str(self.fn))
        for g in guards.values():
            g.check_and_write_back(name)
        launched.append(name)
        return result

    interpreter.InterpretedFunction.run = run
    try:
        yield launched
    finally:
        interpreter.InterpretedFunction.run = original_run


def _flat(result):
    if result is None:  # a TokenStats field that was not requested
        return []
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    return [t for item in result for t in _flat(item)]


def _run(make_inputs, fn, grad_names):
    """(outputs, gradients) of ``fn`` on fresh inputs, with the Triton backend."""
    torch.manual_seed(0)
    device = "cuda" if HAS_CUDA else "cpu"  # on a GPU: native kernels, for compute-sanitizer memcheck
    inputs = {k: v.to(device) for k, v in make_inputs().items()}
    leaves = {k: inputs[k].requires_grad_(True) for k in grad_names}
    with _dispatch.use_backend("triton"):
        outputs = [o.detach().clone() if not o.requires_grad else o for o in _flat(fn(**inputs))]
        live = [o for o in outputs if o.requires_grad]
        grads = []
        if live:
            ups = [torch.linspace(-1, 1, o.numel()).view(o.shape).to(o.device, o.dtype) for o in live]
            grads = torch.autograd.grad(live, list(leaves.values()), ups, allow_unused=True)
    return [o.detach() for o in outputs], [g for g in grads if g is not None]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _strided(shape, dtype=torch.float32, layout="sliced"):
    """Random values of ``shape`` in a non-contiguous layout (so gaps exist in the storage)."""
    x = torch.randn(shape).to(dtype)
    if layout == "sliced":
        wide = torch.randn(*shape[:-1], 2 * shape[-1] + 1).to(dtype)
        wide[..., 1::2] = x
        return wide[..., 1::2]
    if layout == "transposed" and len(shape) >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def _mask(shape):
    m = torch.rand(shape) < 0.6
    return m


def _labels(shape, vocab, ignored=0.3):
    """Labels in [0, vocab) with about ``ignored`` of them -100 (the labelled-rows-first paths)."""
    labels = torch.randint(0, vocab, shape)
    return torch.where(torch.rand(shape) < ignored, -100, labels)


B, T, V = 3, 7, 37  # odd sizes: every block has a partial tail

CASES = {
    "logprobs": (
        lambda: dict(logits=_strided((B, V)), labels=torch.randint(0, V, (B,))),
        lambda logits, labels: rk.logprobs_from_logits(logits, labels, return_entropy=True),
        ("logits",),
    ),
    "logprobs_inplace": (
        lambda: dict(logits=torch.randn(2, 3, V), labels=torch.randint(0, V, (2, 3))),
        lambda logits, labels: rk.logprobs_from_logits(logits * 1.0, labels, inplace_backward=True),
        ("logits",),
    ),
    "entropy": (lambda: dict(logits=_strided((5, V), layout="transposed")),
                lambda logits: rk.entropy_from_logits(logits), ("logits",)),
    "linear_logprobs": (
        lambda: dict(hidden=torch.randn(B, 5, 24), weight=torch.randn(V, 24), bias=torch.randn(V),
                     labels=torch.randint(0, V, (B, 5))),
        lambda hidden, weight, bias, labels: rk.linear_logprobs(hidden, weight, labels, bias=bias,
                                                                return_entropy=True),
        ("hidden", "weight", "bias"),
    ),
    "gae": (
        lambda: dict(
            rewards=_strided((B, T)), values=_strided((B, T), layout="transposed"), mask=_mask((B, T))
        ),
        lambda rewards, values, mask: rk.compute_gae(rewards, values, mask, 0.9, 0.95), (),
    ),
    "whiten": (lambda: dict(x=_strided((B, T)), mask=_mask((B, T))),
               lambda x, mask: (rk.masked_whiten(x, mask), rk.masked_whiten(x, mask, dim=-1)), ()),
    "token_rewards": (
        lambda: dict(scores=torch.randn(B), logprobs=_strided((B, T)), ref_logprobs=torch.randn(B, T),
                     mask=_mask((B, T))),
        lambda scores, logprobs, ref_logprobs, mask: rk.token_level_rewards(
            scores, logprobs, ref_logprobs, mask, kl_coef=0.1, estimator="k3", score_clip=1.0),
        (),
    ),
    "kl_penalty": (lambda: dict(lp=_strided((B, T)), ref=torch.randn(B, T), old=torch.randn(B, T)),
                   lambda lp, ref, old: rk.kl_penalty(lp, ref, "k3", old_logprobs=old), ("lp", "ref")),
    "kl_loss": (lambda: dict(lp=_strided((B, T)), ref=torch.randn(B, T), mask=_mask((B, T))),
                lambda lp, ref, mask: rk.kl_loss(lp, ref, mask, estimator="k3+"), ("lp",)),
    "ppo_policy_loss": (
        lambda: dict(
            lp=_strided((B, T)), old=torch.randn(B, T), adv=torch.randn(B, 1).expand(B, T), mask=_mask((B, T))
        ),
        lambda lp, old, adv, mask: rk.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0), ("lp",),
    ),
    "ppo_value_loss": (
        lambda: dict(v=_strided((B, T), layout="transposed"), old=torch.randn(B, T), ret=torch.randn(B, T),
                     mask=_mask((B, T))),
        lambda v, old, ret, mask: rk.ppo_value_loss(v, old, ret, mask), ("v",),
    ),
    "pairwise_reward_loss": (
        lambda: dict(c=torch.randn(T), r=torch.randn(T), margin=torch.rand(T)),
        lambda c, r, margin: rk.pairwise_reward_loss(c, r, margin=margin, center_coef=0.01), ("c", "r"),
    ),
    "ranking_reward_loss": (lambda: dict(s=_strided((B, 5)), mask=_mask((B, 5))),
                            lambda s, mask: rk.ranking_reward_loss(s, mask=mask), ("s",)),
    "ranking_hinge_loss": (lambda: dict(s=_strided((B, 5), layout="transposed")),
                           lambda s: rk.ranking_hinge_loss(s), ("s",)),
    "pointwise_reward_loss": (lambda: dict(p=torch.randn(T), t=torch.randn(T)),
                              lambda p, t: rk.pointwise_reward_loss(p, t), ("p", "t")),
    "token_stats": (
        lambda: dict(logits=_strided((B, V), layout="transposed"), labels=_labels((B,), V)),
        lambda logits, labels: rk.token_stats_from_logits(
            logits, labels, temperature=0.7, softcap=5.0, entropy=True, sum_sq_probs=True, top1_match=True,
            mean_logit=True, top_k=3),
        ("logits",),
    ),
    "policy_loss_token": (
        lambda: dict(lp=_strided((B, T)), old=torch.randn(B, T), adv=torch.randn(B, T), mask=_mask((B, T))),
        lambda lp, old, adv, mask: rk.sapo_policy_loss(lp, old, adv, mask), ("lp",),
    ),
    # Kernels added in issue 15 and after (sampling, ratings, token statistics from hidden states, the
    # batch-invariant d_hidden product, the distillation row kernel).
    "sampling_logprobs": (
        lambda: dict(logits=_strided((B, V)), labels=_labels((B,), V)),
        lambda logits, labels: rk.sampling_logprobs(
            logits, labels, temperature=0.7, top_k=9, top_p=0.8, min_p=0.01, return_entropy=True,
            return_mask_mass=True),
        ("logits",),
    ),
    "sampling_logprobs_top_p": (
        lambda: dict(logits=_strided((2, 3, V), layout="transposed"), labels=torch.randint(0, V, (2, 3))),
        lambda logits, labels: rk.sampling_logprobs(logits, labels, top_p=0.5), ("logits",),
    ),
    "elo_ratings": (
        lambda: dict(w=torch.randint(-1, 7, (2, 19)), l=torch.randint(0, 8, (2, 19)), s=torch.rand(2, 19),
                     init=1000 + 50 * torch.randn(2, 7)),
        lambda w, l, s, init: rk.elo_ratings(w, l, 7, k=16.0, initial=init, scores=s), (),
    ),
    "linear_token_stats": (
        lambda: dict(hidden=_strided((B, 5, 24)), weight=torch.randn(V, 24), bias=torch.randn(V),
                     labels=_labels((B, 5), V)),
        lambda hidden, weight, bias, labels: rk.linear_token_stats(
            hidden, weight, labels, bias=bias, temperature=0.7, logit_scale=0.5, softcap=4.0, entropy=True,
            sum_sq_probs=True, top1_match=True, mean_logit=True),
        ("hidden", "weight", "bias"),
    ),
    "linear_logprobs_batch_invariant": (
        lambda: dict(hidden=_strided((B, 5, 24), layout="transposed"), weight=torch.randn(V, 24),
                     labels=_labels((B, 5), V)),
        lambda hidden, weight, labels: rk.linear_logprobs(hidden, weight, labels, return_entropy=True,
                                                          batch_invariant=True),
        ("hidden", "weight"),
    ),
    "linear_token_stats_batch_invariant": (
        lambda: dict(hidden=torch.randn(B, 5, 24), weight=torch.randn(V, 24), labels=_labels((B, 5), V)),
        lambda hidden, weight, labels: rk.linear_token_stats(hidden, weight, labels, sum_sq_probs=True,
                                                             mean_logit=True, batch_invariant=True),
        ("hidden",),
    ),
    "linear_distill_loss": (
        lambda: dict(sh=_strided((B, 5, 24)), sw=torch.randn(V, 24), sb=torch.randn(V),
                     th=torch.randn(B, 5, 16), tw=torch.randn(V, 16), labels=_labels((B, 5), V)),
        lambda sh, sw, sb, th, tw, labels: [
            rk.linear_distill_loss(sh, sw, th, tw, labels, divergence=divergence, beta=0.3, temperature=0.7,
                                   student_bias=sb)
            for divergence in ("forward_kl", "reverse_kl", "jsd")],
        ("sh", "sw", "sb"),
    ),
}

# The kernels each case must launch; test_every_kernel_is_guarded checks that together they are every
# ``@triton.jit`` kernel of the package.
KERNELS = {
    "logprobs": ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"),
    "logprobs_inplace": ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"),
    "entropy": ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"),
    "linear_logprobs": ("_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"),
    "gae": ("_gae_fwd_kernel",),
    "whiten": ("_whiten_pivot_kernel", "_whiten_moments_kernel", "_whiten_apply_kernel"),
    "token_rewards": ("_token_rewards_fwd_kernel",),
    "kl_penalty": ("_kl_penalty_fwd_kernel", "_kl_penalty_bwd_kernel"),
    "kl_loss": ("_kl_penalty_fwd_kernel",),
    "ppo_policy_loss": ("_ppo_policy_loss_fwd_kernel", "_ppo_policy_loss_bwd_kernel"),
    "ppo_value_loss": ("_ppo_value_loss_fwd_kernel", "_ppo_value_loss_bwd_kernel"),
    "pairwise_reward_loss": ("_pairwise_reward_fwd_kernel", "_pairwise_reward_bwd_kernel"),
    "ranking_reward_loss": ("_ranking_fwd_kernel", "_ranking_bwd_kernel"),
    "ranking_hinge_loss": ("_ranking_fwd_kernel", "_ranking_bwd_kernel"),
    "pointwise_reward_loss": ("_pointwise_reward_fwd_kernel", "_pointwise_reward_bwd_kernel"),
    "token_stats": ("_token_stats_fwd_kernel", "_token_stats_bwd_kernel"),
    "policy_loss_token": ("_policy_loss_token_fwd_kernel", "_policy_loss_token_bwd_kernel"),
    "sampling_logprobs": ("_sampling_logprobs_fwd_kernel", "_sampling_logprobs_bwd_kernel"),
    "sampling_logprobs_top_p": ("_sampling_logprobs_fwd_kernel", "_sampling_logprobs_bwd_kernel"),
    "elo_ratings": ("_elo_fwd_kernel",),
    "linear_token_stats": ("_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"),
    "linear_logprobs_batch_invariant": ("_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel",
                                        "_linear_logprobs_grad_hidden_kernel"),
    "linear_token_stats_batch_invariant": ("_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel",
                                           "_linear_logprobs_grad_hidden_kernel"),
    "linear_distill_loss": ("_linear_distill_rows_kernel",),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_stay_in_bounds(case):
    make_inputs, fn, grad_names = CASES[case]
    expected_out, expected_grads = _run(make_inputs, fn, grad_names)
    if HAS_CUDA:  # the native kernels ran; `compute-sanitizer --tool memcheck` checks their accesses
        return
    with guarded_launches() as launched:
        out, grads = _run(make_inputs, fn, grad_names)
    missing = set(KERNELS[case]) - set(launched)
    assert not missing, f"{case}: kernels {sorted(missing)} did not run (launched: {sorted(set(launched))})"
    for i, (a, b) in enumerate(zip(out + grads, expected_out + expected_grads)):
        assert _same(a, b), f"{case}: output/gradient {i} changed under the guard (read outside a tensor?)"


def test_every_kernel_is_guarded():
    """Every ``@triton.jit`` kernel of the package (a jitted function named ``*_kernel``) is launched by
    some case above, so a new kernel without a guard case fails here."""
    import pathlib
    import re

    root = pathlib.Path(rk.__file__).parent
    pattern = re.compile(r"@triton\.jit[^\n]*\n(?:\s*@[^\n]*\n)*\s*def (_\w+_kernel)\(")
    kernels = {name for path in root.rglob("*.py") for name in pattern.findall(path.read_text())}
    assert len(kernels) >= 30, f"the scan found only {sorted(kernels)}"
    assert set(KERNELS) == set(CASES)
    covered = {name for names in KERNELS.values() for name in names}
    assert not kernels - covered, f"kernels without an out-of-bounds guard case: {sorted(kernels - covered)}"
    assert not covered - kernels, f"KERNELS names kernels that do not exist: {sorted(covered - kernels)}"


@interpreter_only
def test_guard_catches_an_out_of_bounds_write():
    """The guard itself: a kernel writing one element past its output is caught."""
    import triton.language as tl

    @triton.jit
    def _write_one_past(out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, 1.0, mask=offsets <= n)  # <= : one past the end

    out = torch.zeros(5)
    with guarded_launches(), pytest.raises(AssertionError, match="past the end"):
        _write_one_past[(1,)](out, 5, BLOCK=8)


@interpreter_only
def test_guard_catches_an_out_of_bounds_read():
    import triton.language as tl

    @triton.jit
    def _read_one_past(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets <= n, other=0.0)
        tl.store(out_ptr, tl.sum(x, axis=0))

    out, x = torch.zeros(1), torch.ones(5)
    with guarded_launches():
        _read_one_past[(1,)](out, x, 5, BLOCK=8)
    assert out.isnan().all()  # the sentinel came in
