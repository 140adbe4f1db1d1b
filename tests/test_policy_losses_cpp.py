"""The C++ kernel of the policy-loss core (csrc/policy_losses.cpp) beyond what tests/test_policy_losses.py
and tests/test_ppo_losses.py check on every backend: its vector exp / log against float64 over their whole
range, the baseline (SSE2 / NEON) and AVX2 builds against each other, and the layouts the kernel reads
in place or converts (strided views, bf16 / fp16, integer masks, chunk tails, several threads)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_kernels import _ext
from rlhf_kernels.ops.cpu import policy_losses as cpu

PARAMS = {
    "vanilla": [0.2, 0.28, 3.0], "gpg": [], "dro": [0.3], "cispo": [0.2, 0.28], "sapo": [1.0, 1.05],
    "dppo_tv": [0.2, 0.28, 3.0], "dppo_kl": [0.2, 0.28, 3.0], "clip_cov": [0.2, 0.28], "kl_cov": [0.1],
    "gspo": [0.2, 0.28], "geo_mean": [0.2, 0.28],
}
assert set(PARAMS) == set(cpu.TOKEN_VARIANTS)


@pytest.fixture(scope="module")
def ext():
    module = _ext.load("cpp")
    assert module is not None, _ext.unavailable_reason("policy_losses", "cpp")
    return module


@pytest.fixture(params=["baseline", "auto"])
def isa(request, ext):
    """Both vector widths where the CPU has AVX2 ("auto" is then the AVX2 build)."""
    ext.policy_losses_vector_isa(request.param)
    yield ext.policy_losses_vector_isa()
    ext.policy_losses_vector_isa("auto")


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got − want| in units of the fp32 spacing at want (the smallest denormal spacing below)."""
    spacing = torch.where(
        want.abs() < 2.0**-126, torch.full_like(want, 2.0**-149),
        2.0 ** (torch.floor(torch.log2(want.abs())) - 23),
    )
    return (got.double() - want).abs() / spacing


def test_vector_exp_within_two_ulps_over_the_whole_range(ext, isa):
    x = torch.cat([torch.linspace(-110.0, 95.0, 200_003), torch.randn(10_000) * 30, torch.randn(10_000)])
    got = ext.policy_losses_vector_math(x, "exp")
    want = x.double().exp()
    finite = want < 3.4028234663852886e38  # the largest fp32
    assert _ulps(got[finite], want[finite]).max() <= 2.0
    assert torch.isinf(got[~finite]).all()
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, -200.0, 200.0, 88.72, -103.9])
    got = ext.policy_losses_vector_math(specials, "exp")
    assert math.isnan(got[0]) and got[1] == math.inf and got[2] == 0.0 and got[3] == 1.0 and got[4] == 1.0
    assert got[5] == 0.0 and got[6] == math.inf
    assert _ulps(got[7:], specials[7:].double().exp()).max() <= 2.0  # near the overflow, a denormal result


def test_vector_exp_for_small_arguments(ext, isa):
    x = torch.cat([torch.linspace(-64.0, 64.0, 100_001), torch.tensor([0.0, -0.0, 20.0, -20.0])])
    got = ext.policy_losses_vector_math(x, "exp_small")
    assert _ulps(got, x.double().exp()).max() <= 2.0
    assert math.isnan(ext.policy_losses_vector_math(torch.tensor([math.nan]), "exp_small")[0])


def test_vector_log_within_two_ulps_over_the_whole_range(ext, isa):
    bits = torch.randint(1, 0x7F7FFFFF, (300_000,), dtype=torch.int32)  # every positive finite fp32
    x = torch.cat([bits.view(torch.float32), torch.linspace(0.5, 2.0, 10_001), torch.rand(10_000)])
    got = ext.policy_losses_vector_math(x, "log")
    want = x.double().log()
    assert _ulps(got, want).max() <= 2.0
    specials = torch.tensor([0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 1.0, 1e-45])
    got = ext.policy_losses_vector_math(specials, "log")
    assert got[0] == -math.inf and got[1] == -math.inf
    assert math.isnan(got[2]) and got[3] == math.inf and math.isnan(got[4]) and math.isnan(got[5])
    assert got[6] == 0.0 and abs(got[7].item() - math.log(specials[7].item())) < 1e-5  # the least denormal


def _inputs(B: int, T: int, dtype: torch.dtype, variant: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=gen) * 3
    old = lp + torch.randn(B, T, generator=gen) * 0.5
    adv = torch.randn(B, T, generator=gen)
    weights = torch.rand(B, T, generator=gen) * 2
    mask = torch.rand(B, T, generator=gen) < 0.8
    lp[0, :3] = math.nan  # NaN at valid and masked positions
    mask[0, 1] = False
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    aux = None
    if variant in ("clip_cov", "kl_cov"):
        aux = (torch.rand(B, T, generator=gen) < 0.05).to(compute)
    elif variant == "gspo":
        aux = (torch.randn(B, 1, generator=gen) * 3).to(compute).expand(B, T)
    cast = [t.to(dtype) for t in (lp, old, adv)]
    return (*cast, mask, aux, weights.to(compute))


@pytest.mark.parametrize("variant", cpu.TOKEN_VARIANTS)
def test_builds_agree_and_match_the_pytorch_path(ext, variant):
    """Several chunks and a tail (T = 1030), rows on several threads (B = 70): the two builds give the same
    gradient bit for bit (no FMA: the same roundings) and partial sums within summation order; both
    match the PyTorch path."""
    lp, old, adv, mask, aux, weights = _inputs(70, 1030, torch.float32, variant)
    params = PARAMS[variant]
    grad_partials = torch.randn(70, 1)
    results = {}
    for choice in ("baseline", "auto"):
        ext.policy_losses_vector_isa(choice)
        try:
            partials, stats = cpu._cpp_fwd(lp, old, adv, mask, aux, weights, variant, params)
            grad = cpu._cpp_bwd(grad_partials, lp, old, adv, mask, aux, weights, variant, params)
        finally:
            ext.policy_losses_vector_isa("auto")
        results[choice] = (partials, stats, grad)
    (p0, s0, g0), (p1, s1, g1) = results["baseline"], results["auto"]
    assert torch.equal(g0.isnan(), g1.isnan()) and torch.equal(g0.nan_to_num(), g1.nan_to_num())
    # row sums of ~800 fp32 terms of size ~1, in another order: ~1e-5 apart
    torch.testing.assert_close(p0, p1, rtol=1e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(s0, s1, rtol=1e-5, atol=1e-4, equal_nan=True)
    want_partials, want_stats = cpu._fwd(lp, old, adv, mask, aux, weights, variant, params)
    want_grad = cpu._bwd(grad_partials, lp, old, adv, mask, aux, weights, variant, params)
    torch.testing.assert_close(p1, want_partials, rtol=1e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(s1, want_stats, rtol=1e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(g1, want_grad, rtol=2e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("variant", ["vanilla", "sapo", "dppo_kl", "gspo"])
def test_converted_layouts(ext, dtype, variant):
    """bf16 / fp16 / fp64 inputs, transposed (strided) views, a float and an int mask: the PyTorch path's
    results, in the gradient's dtype; inputs unmodified."""
    lp, old, adv, mask, aux, weights = _inputs(33, 515, dtype, variant, seed=1)
    lp_t = lp.t().contiguous().t()  # column-major: stride (1, 33)
    params = PARAMS[variant]
    before = [t.clone() for t in (lp_t, old, adv, weights)]
    grad_partials = torch.randn(33, 1, dtype=weights.dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for m in (mask.float(), mask.to(torch.int32)):
        got = cpu._cpp_fwd(lp_t, old, adv, m, aux, weights, variant, params)
        want = cpu._fwd(lp_t, old, adv, m, aux, weights, variant, params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, equal_nan=True, **tol)
        grad = cpu._cpp_bwd(grad_partials, lp_t, old, adv, m, aux, weights, variant, params)
        want_grad = cpu._bwd(grad_partials, lp_t, old, adv, m, aux, weights, variant, params)
        assert grad.dtype == dtype
        # one rounding to the gradient's dtype: one of its ulps apart at most
        grad_tol = {torch.bfloat16: dict(rtol=8e-3, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=1e-4)}
        torch.testing.assert_close(grad, want_grad, equal_nan=True, **grad_tol.get(dtype, tol))
    for a, b in zip(before, (lp_t, old, adv, weights)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_masked_positions_get_exact_zero_even_with_a_non_finite_upstream_gradient(ext):
    lp, old, adv, mask, aux, weights = _inputs(4, 40, torch.float32, "cispo")
    grad = cpu._cpp_bwd(torch.full((4, 1), math.inf), lp, old, adv, mask, aux, weights, "cispo", [0.2, 0.2])
    assert (grad[~mask] == 0).all()


def test_vector_isa_rejects_unknown_choices(ext):
    with pytest.raises(RuntimeError, match="choice must be"):
        ext.policy_losses_vector_isa("avx512")
    with pytest.raises(RuntimeError, match="fn must be"):
        ext.policy_losses_vector_math(torch.ones(3), "sin")


def test_compile_first_in_a_fresh_process():
    """torch.compile(fullgraph=True) of a policy loss before anything has loaded the extension: the choice
    of the C++ path (and of keeping D) must be a traced constant, not a trace into the loader's lock."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from rlhf_kernels.ops.policy_losses import sapo_policy_loss\n"
        "from rlhf_kernels.ops.ppo_losses import ppo_policy_loss\n"
        "lp = (-torch.rand(4, 9)).requires_grad_()\n"
        "old, adv, mask = lp.detach() + 0.1, torch.randn(4, 9), torch.rand(4, 9) < 0.8\n"
        "for f in (sapo_policy_loss, ppo_policy_loss):\n"
        "    fn = torch.compile(lambda a, b, c, m: f(a, b, c, m)[0], fullgraph=True, dynamic=True)\n"
        "    got = fn(lp, old, adv, mask)\n"
        "    want = f(lp, old, adv, mask)[0]\n"
        "    torch.testing.assert_close(got, want)\n"
        "    got.backward()\n"
        "    assert torch.isfinite(lp.grad).all()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
