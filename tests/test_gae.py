"""compute_gae on every backend (PyTorch scan, C++ CPU, Triton, CUDA) against the float64 sequential
oracle and the peers' eager loops; the scan operator; the launcher writing every element."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_compiles_for_sm90, backend_device

from bench.baselines import gae as peers
from rlhf_kernels import _dispatch, _ext
from rlhf_kernels.ops import gae as gae_ops
from rlhf_kernels.ops.gae import compute_gae
from rlhf_kernels.reference import gae as ref

try:
    import triton
    import triton.language as tl

    from rlhf_kernels.ops.gae import _gae_combine

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


def pattern_mask(B: int, T: int, generator: torch.Generator) -> torch.Tensor:
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


def gae_inputs(B: int, T: int, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + B * 31 + T)
    rewards = torch.randn(B, T, generator=gen).to(dtype)
    values = torch.randn(B, T, generator=gen).to(dtype)
    mask = pattern_mask(B, T, gen)
    return rewards.to(device), values.to(device), mask.to(device)


def _check_gae(rewards, values, mask, gamma, lam, mode, *, tol=None):
    got_a, got_r = compute_gae(rewards, values, mask, gamma, lam, mask_mode=mode)
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
    rewards, values, mask = gae_inputs(B, T, device=backend_device(gae_backend))
    _check_gae(rewards, values, mask, 0.99, 0.95, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_cpp_rows_longer_than_one_buffer_fill(mode):
    """The C++ kernel converts whole rows of up to 8192 positions per buffer fill (csrc/gae.cpp kChunk):
    rows of 8192 + 300 take two fills, the state carried across their boundary (holes straddle it);
    9 rows: a block of 8 interleaved rows and a partial one."""
    rewards, values, mask = gae_inputs(9, 8192 + 300, seed=2)
    mask[2, 8100:8300] = False
    mask[3, 8191:8193] = False
    with _dispatch.use_backend("cpp"):
        _check_gae(rewards, values, mask, 0.999, 0.97, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_dtypes(gae_backend, mode, dtype):
    rewards, values, mask = gae_inputs(7, 45, dtype, backend_device(gae_backend), seed=1)
    _check_gae(rewards, values, mask, 0.97, 0.9, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.7), (0.8, 0.0), (1.0, 0.0)])
def test_gae_extreme_discounts(gae_backend, mode, gamma, lam):
    rewards, values, mask = gae_inputs(7, 150, device=backend_device(gae_backend), seed=2)
    _check_gae(rewards, values, mask, gamma, lam, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_mixed_dtypes_and_mask_dtypes(gae_backend, mode):
    device = backend_device(gae_backend)
    rewards, values, mask = gae_inputs(7, 33, device=device, seed=3)
    values = values.to(torch.bfloat16)
    for mask_dtype in (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16):
        _check_gae(rewards, values, mask.to(mask_dtype), 0.95, 0.9, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_fractional_mask_blends_like_the_formula(gae_backend, mode):
    # The masks are 0/1; a fractional m blends as nv ← m·V + (1−m)·nv (verl's formula).
    device = backend_device(gae_backend)
    rewards, values, mask = gae_inputs(5, 40, device=device, seed=4)
    weights = mask.float() * torch.rand(5, 40, device=device).clamp_min(0.1)
    _check_gae(rewards, values, weights, 0.9, 0.8, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gae_strided_inputs(gae_backend, mode):
    device = backend_device(gae_backend)
    big_r, big_v, big_m = gae_inputs(9, 80, device=device, seed=5)
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
    rewards, values, mask = gae_inputs(7, 60, device=device, seed=6)
    clean_a, clean_r = compute_gae(rewards * mask, values * mask, mask, 0.9, 0.95, mask_mode=mode)
    garbage = torch.where(torch.rand(7, 60, device=device) < 0.5, float("nan"), float("inf"))
    dirty_rewards = torch.where(mask, rewards, garbage)
    dirty_values = torch.where(mask, values, -garbage)
    dirty_a, dirty_r = compute_gae(dirty_rewards, dirty_values, mask, 0.9, 0.95, mask_mode=mode)
    torch.testing.assert_close(dirty_a, clean_a, rtol=0, atol=0)
    torch.testing.assert_close(dirty_r[mask], clean_r[mask], rtol=0, atol=0)
    if mode == "zero":  # returns = A + V·m: masked V is 0 there too
        torch.testing.assert_close(dirty_r, clean_r, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gae_nan_at_valid_position_propagates(gae_backend, mode):
    device = backend_device(gae_backend)
    rewards, values, mask = gae_inputs(2, 20, device=device, seed=7)
    mask[:] = True
    rewards[0, 12] = float("nan")
    advantages, returns = compute_gae(rewards, values, mask, 0.9, 0.9, mask_mode=mode)
    assert torch.isnan(advantages[0, :13]).all() and torch.isfinite(advantages[0, 13:]).all()
    assert torch.isfinite(advantages[1]).all() and torch.isnan(returns[0, :13]).all()


def test_gae_empty_batch(gae_backend):
    device = backend_device(gae_backend)
    a, r = compute_gae(torch.empty(0, 5, device=device), torch.empty(0, 5, device=device),
                           torch.empty(0, 5, dtype=torch.bool, device=device))
    assert a.shape == (0, 5) and r.shape == (0, 5)


@pytest.mark.parametrize("mode", MODES)
def test_gae_triton_carry_across_many_chunks(monkeypatch, mode):
    """Chunks of 16 positions: the state carried between chunks (including through holes and padding
    that straddle chunk boundaries) must give the sequential answer."""
    monkeypatch.setattr(gae_ops, "GAE_MAX_BLOCK_T", 16)
    rewards, values, mask = gae_inputs(4, 101, device=backend_device("triton"), seed=8)
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

# --------------------------------------------------------------------------------------------------
# The launcher, called directly
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,T", [(1, 1), (5, 37), (3, 101)])
def test_launcher_writes_every_element(monkeypatch, mode, B, T):
    """Outputs filled with NaN before the launch: every element is written, and right (several row
    tiles, T over several 16-position chunks, strided inputs)."""
    monkeypatch.setattr(gae_ops, "GAE_MAX_BLOCK_T", 16)
    device = backend_device("triton")
    rewards, values, mask = gae_inputs(B, 2 * T, device=device, seed=20)
    rewards, values, mask = rewards[:, ::2], values[:, 1::2], mask[:, ::2]
    advantages = torch.full((B, T), float("nan"), device=device)
    returns = torch.full((B, T), float("nan"), device=device)
    gae_ops._launch_fwd_out(advantages, returns, rewards, values, mask, 0.99, 0.95, mode == "carry")
    exp_a, exp_r = ref.compute_gae(rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95, mask_mode=mode)
    torch.testing.assert_close(advantages.cpu().double(), exp_a, **_tol(T, 0.99, 0.95))
    torch.testing.assert_close(returns.cpu().double(), exp_r, **_tol(T, 0.99, 0.95))


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_kernels.ops import gae

types = (["*bf16", "*fp32", "*u8", "*fp32", "*fp32"] + ["i64"] * 6 + ["i32"] * 2 + ["fp32"] * 6
         + ["constexpr"] * 4)
for carry in (True, False):
    triton.compile(
        ASTSource(fn=gae._gae_fwd_kernel, signature=dict(zip(gae._gae_fwd_kernel.arg_names, types)),
                  constexprs={"CARRY": carry, "ACC": triton.language.float32, "BLOCK_B": 2, "BLOCK_T": 1024}),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels run natively in the other tests")
@pytest.mark.skipif(triton is None, reason="needs triton")
def test_triton_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter checks the math, not the lowering: compile the kernel to PTX for sm_90 (Triton's
    bundled ptxas; no device needed), in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_AOT_SCRIPT)


def test_gae_auto_backend_on_cpu_is_cpp():
    assert _ext.unavailable_reason("gae", "cpp") is None
    assert _dispatch.backend_for("gae", "cpu") == "cpp"


def test_gae_matches_peer_idioms():
    """verl's loop is the carry mode; OpenRLHF's loop is the zero mode (finite inputs)."""
    rewards, values, mask = gae_inputs(7, 90, seed=9)
    for backend in ("cpp", "torch"):
        with _dispatch.use_backend(backend):
            a, r = compute_gae(rewards, values, mask, 0.99, 0.95, mask_mode="carry")
            va, vr = peers.verl_gae(rewards, values, mask, 0.99, 0.95)
            torch.testing.assert_close(a, va, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r, vr, rtol=1e-5, atol=1e-5)
            a, r = compute_gae(rewards, values, mask, 0.99, 0.95, mask_mode="zero")
            oa, orr = peers.openrlhf_get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
            torch.testing.assert_close(a, oa, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r, orr, rtol=1e-5, atol=1e-5)


def test_gae_errors():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="values must have shape rewards.shape"):
        compute_gae(r, torch.randn(2, 6), m)
    with pytest.raises(ValueError, match="mask must have shape rewards.shape"):
        compute_gae(r, v, m[:, :4])
    with pytest.raises(ValueError, match=r"rewards must be 2-D \[B, T\]"):
        compute_gae(r[0], v[0], m[0])
    with pytest.raises(TypeError, match="rewards must be a floating tensor"):
        compute_gae(r.long(), v, m)
    with pytest.raises(TypeError, match="values must be a floating tensor"):
        compute_gae(r, v.double(), m)
    with pytest.raises(TypeError, match="mask must be a bool, integer or floating"):
        compute_gae(r, v, m.to(torch.complex64))
    with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\]; got 1.5"):
        compute_gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match=r"lam must be in \[0.0, 1.0\]; got -0.1"):
        compute_gae(r, v, m, lam=-0.1)
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        compute_gae(r, v, m, mask_mode="left")


def test_gae_no_gradient_flows():
    rewards = torch.randn(2, 6, requires_grad=True)
    values = torch.randn(2, 6, requires_grad=True)
    a, r = compute_gae(rewards, values, torch.ones(2, 6))
    assert not a.requires_grad and not r.requires_grad


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------
def test_opcheck():
    rewards, values, mask = gae_inputs(3, 11, seed=10)
    for backend in ("torch", "cpp"):
        with _dispatch.use_backend(backend):
            for carry in (True, False):
                torch.library.opcheck(torch.ops.rlhf_kernels.compute_gae.default,
                                      (rewards, values, mask, 0.9, 0.8, carry))
    torch.library.opcheck(torch.ops.rlhf_kernels.gae_torch.default, (rewards, values, mask, 0.9, 0.8, True))
    torch.library.opcheck(torch.ops.rlhf_kernels.gae_cpp.default, (rewards, values, mask, 0.9, 0.8, False))
