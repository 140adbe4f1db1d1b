"""compute_gae (every backend: PyTorch scan, C++ CPU, Triton, CUDA), masked_whiten, token_level_rewards,
group advantages; against the float64 sequential oracles and the peers' eager idioms."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, backend_device

import rlhf_kernels.ops.advantages as adv
from bench.baselines import advantages as peers
from bench.baselines.masked import verl_masked_whiten
from rlhf_kernels import _dispatch, _ext
from rlhf_kernels.reference import advantages as ref

try:
    import triton
    import triton.language as tl

    from rlhf_kernels.ops.advantages import _gae_combine

    @triton.jit
    def _associativity_kernel(maps_ptr, left_ptr, right_ptr, N: tl.constexpr):
        """left = (a then b) then c, right = a then (b then c), for maps a, b, c = maps[0], [1], [2]."""
        i = tl.arange(0, N)
        pa = tl.load(maps_ptr + 0 * N + i)
        qa = tl.load(maps_ptr + 1 * N + i)
        ra = tl.load(maps_ptr + 2 * N + i)
        ca = tl.load(maps_ptr + 3 * N + i)
        da = tl.load(maps_ptr + 4 * N + i)
        pb = tl.load(maps_ptr + 5 * N + i)
        qb = tl.load(maps_ptr + 6 * N + i)
        rb = tl.load(maps_ptr + 7 * N + i)
        cb = tl.load(maps_ptr + 8 * N + i)
        db = tl.load(maps_ptr + 9 * N + i)
        pc = tl.load(maps_ptr + 10 * N + i)
        qc = tl.load(maps_ptr + 11 * N + i)
        rc = tl.load(maps_ptr + 12 * N + i)
        cc = tl.load(maps_ptr + 13 * N + i)
        dc = tl.load(maps_ptr + 14 * N + i)
        p, q, r, c, d = _gae_combine(pa, qa, ra, ca, da, pb, qb, rb, cb, db)
        p, q, r, c, d = _gae_combine(p, q, r, c, d, pc, qc, rc, cc, dc)
        tl.store(left_ptr + 0 * N + i, p)
        tl.store(left_ptr + 1 * N + i, q)
        tl.store(left_ptr + 2 * N + i, r)
        tl.store(left_ptr + 3 * N + i, c)
        tl.store(left_ptr + 4 * N + i, d)
        p, q, r, c, d = _gae_combine(pb, qb, rb, cb, db, pc, qc, rc, cc, dc)
        p, q, r, c, d = _gae_combine(pa, qa, ra, ca, da, p, q, r, c, d)
        tl.store(right_ptr + 0 * N + i, p)
        tl.store(right_ptr + 1 * N + i, q)
        tl.store(right_ptr + 2 * N + i, r)
        tl.store(right_ptr + 3 * N + i, c)
        tl.store(right_ptr + 4 * N + i, d)
except ImportError:  # pragma: no cover
    triton = None

GAE_BACKENDS = ["torch", "cpp", "triton"] + (["cuda"] if HAS_CUDA else [])
MODES = ("carry", "zero")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(params=GAE_BACKENDS)
def gae_backend(request):
    """GAE's backends, forced.  The C++ extension is built here on first use (about a minute): a
    build failure fails these tests rather than skipping them."""
    if request.param in ("cpp", "cuda"):
        reason = _ext.unavailable_reason("gae", request.param)
        assert reason is None, reason
    with _dispatch.use_backend(request.param):
        yield request.param


def _tol(T: int, gamma: float, lam: float) -> dict:
    """fp32 arithmetic against float64 on inputs already rounded to their dtype: the error grows with
    the effective horizon (1/(1 − γλ), or T when γλ = 1)."""
    horizon = T if gamma * lam == 1.0 else min(T, 1.0 / (1.0 - gamma * lam))
    return dict(rtol=1e-5 * max(1.0, horizon**0.5), atol=2e-6 * max(1.0, horizon))


def _pattern_mask(B: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """One row per pattern, cycling: right padding, left padding, holes (tool outputs inside the
    response), all zero, a single valid token, all valid, Bernoulli."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind = b % 7
        n = int(torch.randint(1, T + 1, (1,), generator=generator))
        if kind == 0:
            mask[b, :n] = True
        elif kind == 1:
            mask[b, T - n :] = True
        elif kind == 2:
            mask[b, :n] = True
            for _ in range(3):
                start = int(torch.randint(0, T, (1,), generator=generator))
                mask[b, start : start + max(1, T // 10)] = False
        elif kind == 4:
            mask[b, int(torch.randint(0, T, (1,), generator=generator))] = True
        elif kind == 5:
            mask[b] = True
        elif kind == 6:
            mask[b] = torch.rand(T, generator=generator) < 0.6
    return mask


def _gae_inputs(B: int, T: int, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + B * 31 + T)
    rewards = torch.randn(B, T, generator=gen).to(dtype)
    values = torch.randn(B, T, generator=gen).to(dtype)
    mask = _pattern_mask(B, T, gen)
    return rewards.to(device), values.to(device), mask.to(device)


def _check_gae(rewards, values, mask, gamma, lam, mode, *, tol=None):
    got_a, got_r = adv.compute_gae(rewards, values, mask, gamma, lam, mask_mode=mode)
    exp_a, exp_r = ref.compute_gae(rewards.cpu(), values.cpu(), mask.cpu(), gamma, lam, mask_mode=mode)
    assert got_a.dtype == torch.float32 and got_r.dtype == torch.float32
    assert got_a.shape == rewards.shape and got_r.shape == rewards.shape
    tol = tol or _tol(rewards.shape[1], gamma, lam)
    torch.testing.assert_close(got_a.cpu().double(), exp_a, **tol)
    torch.testing.assert_close(got_r.cpu().double(), exp_r, **tol)


# --------------------------------------------------------------------------------------------------
# GAE against the sequential oracle
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 2, 7, 128, 1000, 4097])
def test_gae_matches_sequential_oracle(gae_backend, mode, T):
    B = 7 if gae_backend != "triton" or T <= 128 else 2  # the interpreter scans element by element
    rewards, values, mask = _gae_inputs(B, T, device=backend_device(gae_backend))
    _check_gae(rewards, values, mask, 0.99, 0.95, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_dtypes(gae_backend, mode, dtype):
    rewards, values, mask = _gae_inputs(7, 45, dtype, backend_device(gae_backend), seed=1)
    _check_gae(rewards, values, mask, 0.97, 0.9, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.7), (0.8, 0.0), (1.0, 0.0)])
def test_gae_extreme_discounts(gae_backend, mode, gamma, lam):
    rewards, values, mask = _gae_inputs(7, 150, device=backend_device(gae_backend), seed=2)
    _check_gae(rewards, values, mask, gamma, lam, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_mixed_dtypes_and_mask_dtypes(gae_backend, mode):
    device = backend_device(gae_backend)
    rewards, values, mask = _gae_inputs(7, 33, device=device, seed=3)
    values = values.to(torch.bfloat16)
    for mask_dtype in (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16):
        _check_gae(rewards, values, mask.to(mask_dtype), 0.95, 0.9, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_fractional_mask_blends_like_the_formula(gae_backend, mode):
    # The masks are 0/1; a fractional m blends as nv ← m·V + (1−m)·nv (verl's formula).
    device = backend_device(gae_backend)
    rewards, values, mask = _gae_inputs(5, 40, device=device, seed=4)
    weights = mask.float() * torch.rand(5, 40, device=device).clamp_min(0.1)
    _check_gae(rewards, values, weights, 0.9, 0.8, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_strided_inputs(gae_backend, mode):
    device = backend_device(gae_backend)
    big_r, big_v, big_m = _gae_inputs(9, 80, device=device, seed=5)
    rewards = big_r[1:8:2, 3:70]  # row and column strides
    values = big_v.t().contiguous().t()[1:8:2, 3:70]  # column-major storage
    mask = big_m[1:8:2, 3:70]
    _check_gae(rewards, values, mask, 0.99, 0.95, mode)
    expanded = torch.randn(1, 67, device=device).expand(4, 67)  # stride 0
    _check_gae(expanded, values, mask, 0.99, 0.95, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_masked_positions_never_leak(gae_backend, mode):
    """inf/NaN garbage where the mask is 0 changes nothing at valid positions."""
    device = backend_device(gae_backend)
    rewards, values, mask = _gae_inputs(7, 60, device=device, seed=6)
    clean_a, clean_r = adv.compute_gae(rewards * mask, values * mask, mask, 0.9, 0.95, mask_mode=mode)
    garbage = torch.where(torch.rand(7, 60, device=device) < 0.5, float("nan"), float("inf"))
    dirty_rewards = torch.where(mask, rewards, garbage)
    dirty_values = torch.where(mask, values, -garbage)
    dirty_a, dirty_r = adv.compute_gae(dirty_rewards, dirty_values, mask, 0.9, 0.95, mask_mode=mode)
    torch.testing.assert_close(dirty_a, clean_a, rtol=0, atol=0)
    torch.testing.assert_close(dirty_r[mask], clean_r[mask], rtol=0, atol=0)
    if mode == "zero":  # returns = A + V·m: masked V is 0 there too
        torch.testing.assert_close(dirty_r, clean_r, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gae_nan_at_valid_position_propagates(gae_backend, mode):
    device = backend_device(gae_backend)
    rewards, values, mask = _gae_inputs(2, 20, device=device, seed=7)
    mask[:] = True
    rewards[0, 12] = float("nan")
    advantages, returns = adv.compute_gae(rewards, values, mask, 0.9, 0.9, mask_mode=mode)
    assert torch.isnan(advantages[0, :13]).all() and torch.isfinite(advantages[0, 13:]).all()
    assert torch.isfinite(advantages[1]).all() and torch.isnan(returns[0, :13]).all()


def test_gae_empty_batch(gae_backend):
    device = backend_device(gae_backend)
    a, r = adv.compute_gae(torch.empty(0, 5, device=device), torch.empty(0, 5, device=device),
                           torch.empty(0, 5, dtype=torch.bool, device=device))
    assert a.shape == (0, 5) and r.shape == (0, 5)


@pytest.mark.parametrize("mode", MODES)
def test_gae_triton_carry_across_many_chunks(monkeypatch, mode):
    """Chunks of 16 positions: the state carried between chunks (including through holes and padding
    that straddle chunk boundaries) must give the sequential answer."""
    monkeypatch.setattr(adv, "GAE_MAX_BLOCK_T", 16)
    rewards, values, mask = _gae_inputs(4, 101, device=backend_device("triton"), seed=8)
    mask[2, 10:40] = False  # a hole across two chunk boundaries
    with _dispatch.use_backend("triton"):
        _check_gae(rewards, values, mask, 0.99, 0.97, mode)


@pytest.mark.skipif(triton is None, reason="needs triton")
def test_gae_scan_operator_is_associative():
    """The Triton combine operator on random maps, in both bracketings (what a parallel scan relies
    on), in the interpreter on CPU or natively on CUDA; and the composed map equals applying the
    maps one after another."""
    device = backend_device("triton")
    maps = torch.rand(3, 5, 16, device=device) * 2 - 0.5
    left = torch.empty(5, 16, device=device)
    right = torch.empty(5, 16, device=device)
    _associativity_kernel[(1,)](maps, left, right, N=16)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-6)

    def apply(m, nv, lg):
        p, q, r, c, d = m
        return p * nv + c, q * nv + r * lg + d

    nv, lg = torch.randn(16, device=device), torch.randn(16, device=device)
    state = (nv, lg)
    for k in range(3):
        state = apply(maps[k], *state)
    torch.testing.assert_close(torch.stack(apply(left, nv, lg)), torch.stack(state), rtol=1e-5, atol=1e-5)


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rlhf_kernels.ops.advantages as adv
import rlhf_kernels.ops.kl as kl

def compile_for_sm90(fn, signature, constexprs):
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

def sig(names, types):
    return dict(zip(names, types))

i64, i32, f32, c = "i64", "i32", "fp32", "constexpr"
for carry in (True, False):
    compile_for_sm90(adv._gae_fwd_kernel, sig(adv._gae_fwd_kernel.arg_names, [
        "*bf16", "*fp32", "*u8", "*fp32", "*fp32", i64, i64, i64, i64, i64, i64, i32, i32, f32, f32,
        c, c, c]),
        {"CARRY": carry, "BLOCK_B": 2, "BLOCK_T": 1024})
compile_for_sm90(adv._token_rewards_fwd_kernel, sig(adv._token_rewards_fwd_kernel.arg_names, [
    "*fp32", "*bf16", "*fp32", "*i64", "*fp32", "*fp32", i64, i64, i64, i64, i64, i64, i64, i32, i32,
    f32, f32, c, c, c, c]), {"ESTIMATOR": 3, "HAS_CLIP": True, "BLOCK_B": 2, "BLOCK_T": 1024})
compile_for_sm90(adv._whiten_stats_kernel, sig(adv._whiten_stats_kernel.arg_names, [
    "*fp16", "*u8", "*fp32", "*fp32", "*fp32", i64, i64, i64, i64, i32, i32, c, c]),
    {"BLOCK_B": 4, "BLOCK_T": 512})
compile_for_sm90(adv._whiten_apply_kernel, sig(adv._whiten_apply_kernel.arg_names, [
    "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", i64, i64, i64, i64, i32, i32, c, c, c, c]),
    {"PER_ROW": False, "SHIFT_MEAN": False, "BLOCK_B": 4, "BLOCK_T": 512})
compile_for_sm90(kl._kl_penalty_fwd_kernel, sig(kl._kl_penalty_fwd_kernel.arg_names, [
    "*bf16", "*fp32", "*fp32", i32, c, c]), {"ESTIMATOR": 3, "BLOCK": 1024})
compile_for_sm90(kl._kl_penalty_bwd_kernel, sig(kl._kl_penalty_bwd_kernel.arg_names, [
    "*bf16", "*fp32", "*fp32", "*bf16", "*fp32", i32, c, c, c]),
    {"ESTIMATOR": 3, "BLOCK": 1024, "HAS_GRAD_REF": True})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels run natively in the other tests")
@pytest.mark.skipif(triton is None, reason="needs triton")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks the math, not the lowering: compile every kernel of this family to PTX
    for sm_90 (Triton's bundled ptxas; no device needed), in a process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def test_gae_auto_backend_on_cpu_is_cpp():
    assert _ext.unavailable_reason("gae", "cpp") is None
    assert _dispatch.backend_for("gae", "cpu") == "cpp"


def test_gae_matches_peer_idioms():
    """verl's loop is the carry mode; OpenRLHF's loop is the zero mode (finite inputs)."""
    rewards, values, mask = _gae_inputs(7, 90, seed=9)
    for backend in ("cpp", "torch"):
        with _dispatch.use_backend(backend):
            a, r = adv.compute_gae(rewards, values, mask, 0.99, 0.95, mask_mode="carry")
            va, vr = peers.verl_gae(rewards, values, mask, 0.99, 0.95)
            torch.testing.assert_close(a, va, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r, vr, rtol=1e-5, atol=1e-5)
            a, r = adv.compute_gae(rewards, values, mask, 0.99, 0.95, mask_mode="zero")
            oa, orr = peers.openrlhf_get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
            torch.testing.assert_close(a, oa, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r, orr, rtol=1e-5, atol=1e-5)


def test_gae_errors():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="values must have shape rewards.shape"):
        adv.compute_gae(r, torch.randn(2, 6), m)
    with pytest.raises(ValueError, match="mask must have shape rewards.shape"):
        adv.compute_gae(r, v, m[:, :4])
    with pytest.raises(ValueError, match=r"rewards must be 2-D \[B, T\]"):
        adv.compute_gae(r[0], v[0], m[0])
    with pytest.raises(TypeError, match="rewards must be a floating tensor"):
        adv.compute_gae(r.long(), v, m)
    with pytest.raises(TypeError, match="values must be a floating tensor"):
        adv.compute_gae(r, v.double(), m)
    with pytest.raises(TypeError, match="mask must be a bool, integer or floating"):
        adv.compute_gae(r, v, m.to(torch.complex64))
    with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\]; got 1.5"):
        adv.compute_gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match=r"lam must be in \[0.0, 1.0\]; got -0.1"):
        adv.compute_gae(r, v, m, lam=-0.1)
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        adv.compute_gae(r, v, m, mask_mode="left")


def test_gae_no_gradient_flows():
    rewards = torch.randn(2, 6, requires_grad=True)
    values = torch.randn(2, 6, requires_grad=True)
    a, r = adv.compute_gae(rewards, values, torch.ones(2, 6))
    assert not a.requires_grad and not r.requires_grad


# --------------------------------------------------------------------------------------------------
# Registration and compile
# --------------------------------------------------------------------------------------------------
def test_opcheck():
    rewards, values, mask = _gae_inputs(3, 11, seed=10)
    for backend in ("torch", "cpp"):
        with _dispatch.use_backend(backend):
            for carry in (True, False):
                torch.library.opcheck(torch.ops.rlhf_kernels.compute_gae.default,
                                      (rewards, values, mask, 0.9, 0.8, carry))
    torch.library.opcheck(torch.ops.rlhf_kernels.gae_torch.default, (rewards, values, mask, 0.9, 0.8, True))
    torch.library.opcheck(torch.ops.rlhf_kernels.gae_cpp.default, (rewards, values, mask, 0.9, 0.8, False))
    lp, rf = torch.randn(3, 11), torch.randn(3, 11)
    with _dispatch.use_backend("torch"):
        torch.library.opcheck(torch.ops.rlhf_kernels.token_level_rewards.default,
                              (torch.randn(3), lp, rf, mask, 0.1, "k3", 2.0, True))
        for per_row in (True, False):
            torch.library.opcheck(torch.ops.rlhf_kernels.masked_whiten.default,
                                  (values, mask, True, True, 1e-8, per_row))


@pytest.mark.parametrize("backend_name", ["torch", "auto"])  # auto: GAE through the C++ kernel
def test_compile_fullgraph_dynamic_cpu(backend_name):
    def step(rewards, values, mask, scores, lp, ref_lp):
        token_rewards, kl_mean = adv.token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.05,
                                                         estimator="k3")
        a, r = adv.compute_gae(token_rewards + rewards, values, mask, 0.99, 0.95)
        return adv.masked_whiten(a, mask), r, kl_mean

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend(backend_name):
        for B, T in ((3, 17), (5, 29)):
            rewards, values, mask = _gae_inputs(B, T, seed=11)
            args = (rewards, values, mask, torch.randn(B), torch.randn(B, T), torch.randn(B, T))
            with _dispatch.use_backend("torch"):
                expected = step(*args)
            for got, want in zip(compiled(*args), expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_compile_fullgraph_dynamic_triton():
    def step(rewards, values, mask, scores, lp, ref_lp):
        token_rewards, kl_mean = adv.token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.05)
        a, r = adv.compute_gae(token_rewards + rewards, values, mask, 0.99, 0.95)
        return adv.masked_whiten(a, mask, dim=-1), r, kl_mean

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    rewards, values, mask = _gae_inputs(16, 300, device="cuda", seed=12)
    args = (rewards, values, mask, torch.randn(16, device="cuda"), torch.randn(16, 300, device="cuda"),
            torch.randn(16, 300, device="cuda"))
    with _dispatch.use_backend("triton"):
        expected = step(*args)
        for got, want in zip(compiled(*args), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="host-sync detection needs CUDA")
def test_no_host_sync_on_cuda():
    rewards, values, mask = _gae_inputs(8, 500, device="cuda", seed=13)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in ("triton", "cuda", "torch"):
            with _dispatch.use_backend(backend):
                adv.compute_gae(rewards, values, mask, 0.99, 0.95)
        adv.masked_whiten(values, mask)
        adv.masked_whiten(values, mask, dim=-1)
        adv.token_level_rewards(values[:, 0], rewards, values, mask, kl_coef=0.1, score_clip=1.0)
        adv.group_advantages(values[:, 0], 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------
# masked_whiten
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [None, -1])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten_matches_oracle(backend, device, dim, shift_mean, unbiased):
    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(7, 53, generator=gen) * 4 + 3).to(device)
    mask = _pattern_mask(7, 53, gen).to(device)  # includes an all-masked row and a single-token row
    got = adv.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, dim=dim)
    expected = ref.masked_whiten(x.cpu(), mask.cpu(), shift_mean=shift_mean, unbiased=unbiased, dim=dim)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_whiten_dtypes_shapes_and_weights(backend, device, dtype):
    x = (torch.randn(3, 4, 70) * 2 + 1).to(dtype).to(device)
    mask = (torch.rand(3, 4, 70) < 0.7).to(device)
    for dim in (None, -1):
        got = adv.masked_whiten(x, mask, dim=dim)
        assert got.shape == x.shape
        torch.testing.assert_close(got.cpu().double(), ref.masked_whiten(x.cpu(), mask.cpu(), dim=dim),
                                   rtol=1e-5, atol=1e-5)
    weights = mask.float() * torch.rand(3, 4, 70, device=device)
    torch.testing.assert_close(adv.masked_whiten(x, weights).cpu().double(),
                               ref.masked_whiten(x.cpu(), weights.cpu()), rtol=1e-5, atol=1e-5)
    flat = adv.masked_whiten(x.reshape(-1), mask.reshape(-1))
    torch.testing.assert_close(flat.view(x.shape), adv.masked_whiten(x, mask), rtol=1e-5, atol=1e-6)


def test_whiten_long_rows_are_stable(backend, device):
    """Chunked statistics of a row longer than one block, far from zero (a naive Σx² − n·μ² fails)."""
    x = (torch.randn(2, 2500, dtype=torch.float64) + 1e3).to(device)
    mask = torch.ones(2, 2500, dtype=torch.bool, device=device)
    mask[1, 1700:] = False
    for dim in (None, -1):
        got = adv.masked_whiten(x.float(), mask, dim=dim).cpu().double()
        expected = ref.masked_whiten(x.float().cpu(), mask.cpu(), dim=dim)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_whiten_degenerate_selections(backend, device):
    x = torch.randn(4, 9, device=device)
    none = torch.zeros(4, 9, dtype=torch.bool, device=device)
    for dim in (None, -1):
        for shift_mean in (True, False):
            out = adv.masked_whiten(x, none, shift_mean=shift_mean, dim=dim)
            assert torch.equal(out, torch.zeros_like(out)), (dim, shift_mean)  # μ = 0 and var = 0
    one = none.clone()
    one[2, 5] = True
    out = adv.masked_whiten(x, one)
    assert torch.equal(out, torch.zeros_like(out))  # a single element whitens to 0, unbiased or not
    out = adv.masked_whiten(x, one, shift_mean=False)
    assert torch.equal(out, torch.full_like(out, x[2, 5].item()))


def test_whiten_masked_garbage_does_not_leak(backend, device):
    x = torch.randn(3, 40, device=device)
    mask = torch.rand(3, 40, device=device) < 0.5
    clean = adv.masked_whiten(x * mask, mask, dim=-1)
    dirty = adv.masked_whiten(torch.where(mask, x, float("nan")), mask, dim=-1)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_whiten_matches_verl_at_valid_positions():
    x = torch.randn(6, 50)
    mask = torch.rand(6, 50) < 0.6
    ours = adv.masked_whiten(x, mask)
    verl = verl_masked_whiten(x, mask)
    torch.testing.assert_close(ours[mask], verl[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[~mask], torch.zeros_like(ours[~mask]))  # verl leaves values there
    openrlhf = peers.openrlhf_normalize(x, mask)
    torch.testing.assert_close(adv.masked_whiten(x, mask, unbiased=False)[mask], openrlhf[mask],
                               rtol=1e-5, atol=1e-5)


def test_whiten_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="mask must have shape x.shape"):
        adv.masked_whiten(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="dim must be None or -1"):
        adv.masked_whiten(x, torch.ones(2, 5), dim=0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        adv.masked_whiten(x, torch.ones(2, 5), eps=-1e-8)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        adv.masked_whiten(x.long(), torch.ones(2, 5))
    assert adv.masked_whiten(torch.empty(0, 5), torch.empty(0, 5)).shape == (0, 5)


# --------------------------------------------------------------------------------------------------
# token_level_rewards
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("score_clip", [None, 0.5])
def test_token_rewards_match_oracle(backend, device, estimator, score_clip):
    gen = torch.Generator().manual_seed(15)
    B, T = 7, 61
    scores = (torch.randn(B, generator=gen) * 2).to(device)
    lp = torch.randn(B, T, generator=gen).to(torch.bfloat16).to(device)
    ref_lp = torch.randn(B, T, generator=gen).to(device)
    mask = _pattern_mask(B, T, gen).to(device)
    rewards, kl_mean = adv.token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.07, estimator=estimator,
                                               score_clip=score_clip)
    e_rewards, e_kl = ref.token_level_rewards(scores.cpu(), lp.cpu(), ref_lp.cpu(), mask.cpu(), kl_coef=0.07,
                                              estimator=estimator, score_clip=score_clip)
    assert rewards.dtype == torch.float32 and kl_mean.dtype == torch.float32 and kl_mean.shape == ()
    torch.testing.assert_close(rewards.cpu().double(), e_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_mean.cpu().double(), e_kl, rtol=1e-5, atol=1e-6)


def test_token_rewards_score_placement(backend, device):
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], device=device)
    lp = torch.randn(4, 5, device=device)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    rewards, _ = adv.token_level_rewards(scores, lp, lp, mask, kl_coef=0.3)  # KL = 0: only scores
    expected = torch.zeros(4, 5, device=device)
    expected[0, 2], expected[1, 4], expected[2, 2] = 1.0, 2.0, 3.0  # the row without tokens gets none
    assert torch.equal(rewards, expected)
    long_mask = torch.zeros(2, 3000, dtype=torch.bool, device=device)
    long_mask[0, :2999] = True
    long_mask[1, 5] = True  # last valid position in the first of several chunks
    rewards, _ = adv.token_level_rewards(scores[:2], torch.zeros(2, 3000, device=device),
                                         torch.zeros(2, 3000, device=device), long_mask, kl_coef=1.0)
    assert rewards[0, 2998].item() == 1.0 and rewards[1, 5].item() == 2.0
    assert rewards.abs().sum().item() == 3.0


def test_token_rewards_kl_mean_matches_verl():
    gen = torch.Generator().manual_seed(16)
    scores = torch.randn(6, generator=gen)
    lp, ref_lp = torch.randn(6, 40, generator=gen), torch.randn(6, 40, generator=gen)
    lengths = torch.tensor([40, 1, 17, 33, 2, 25])
    mask = torch.arange(40)[None, :] < lengths[:, None]
    rewards, kl_mean = adv.token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.1)
    v_rewards, v_kl = peers.verl_token_level_rewards(scores, lp, ref_lp, mask, 0.1)
    torch.testing.assert_close(rewards, v_rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_mean, v_kl, rtol=1e-5, atol=1e-6)


def test_token_rewards_errors():
    lp, m = torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"scores must have shape logprobs.shape\[:1\]"):
        adv.token_level_rewards(torch.randn(3), lp, lp, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="score_clip must be > 0"):
        adv.token_level_rewards(torch.randn(2), lp, lp, m, kl_coef=0.1, score_clip=0.0)
    with pytest.raises(TypeError, match="kl_coef must be a Python float"):
        adv.token_level_rewards(torch.randn(2), lp, lp, m, kl_coef=torch.tensor(0.1))
    with pytest.raises(ValueError, match="estimator must be one of"):
        adv.token_level_rewards(torch.randn(2), lp, lp, m, kl_coef=0.1, estimator="mse")
    with pytest.raises(ValueError, match="mask must have shape logprobs.shape"):
        adv.token_level_rewards(torch.randn(2), lp, lp, m[:, :3], kl_coef=0.1)


# --------------------------------------------------------------------------------------------------
# group advantages and the broadcast helper
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["std", "none"])
@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages_match_oracle(norm, leave_one_out, dtype):
    scores = (torch.randn(15) * 3).to(dtype)
    for group_size in (3, 5, 15):
        got = adv.group_advantages(scores, group_size, norm=norm, leave_one_out=leave_one_out)
        expected = ref.group_advantages(scores, group_size, norm=norm, leave_one_out=leave_one_out)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_group_advantages_special_cases():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    grpo = adv.group_advantages(scores, 3)
    assert torch.equal(grpo[:3], torch.zeros(3))  # identical scores: σ = 0, A = 0/eps = 0
    torch.testing.assert_close(grpo[3:], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-6))
    rloo = adv.group_advantages(scores, 3, norm="none", leave_one_out=True)
    torch.testing.assert_close(rloo[3:], torch.tensor([-1.5, 0.0, 1.5]))  # s_i − mean of the others
    assert torch.equal(adv.group_advantages(scores, 1, norm="none"), torch.zeros(6))
    x = torch.randn(6, requires_grad=True)
    adv.group_advantages(x, 3).sum().backward()
    assert x.grad is not None


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size must divide the number of scores"):
        adv.group_advantages(torch.randn(10), 3)
    with pytest.raises(ValueError, match="group_size must be >= 2 with norm='std'"):
        adv.group_advantages(torch.randn(4), 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        adv.group_advantages(torch.randn(4), 1, norm="none", leave_one_out=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        adv.group_advantages(torch.randn(4), 2, norm="mad")
    with pytest.raises(ValueError, match=r"scores must be 1-D \[B\]"):
        adv.group_advantages(torch.randn(4, 1), 2)
    with pytest.raises(TypeError, match="group_size must be a Python int"):
        adv.group_advantages(torch.randn(4), 2.0)


def test_broadcast_to_tokens():
    values = torch.tensor([1.5, float("nan"), -2.0])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    out = adv.broadcast_to_tokens(values, mask)
    torch.testing.assert_close(out.double(), ref.broadcast_to_tokens(values.nan_to_num(0.0), mask))
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    with pytest.raises(ValueError, match=r"advantages must have shape mask.shape\[:1\]"):
        adv.broadcast_to_tokens(torch.randn(2), mask)
