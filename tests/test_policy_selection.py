"""The policy losses' passes outside the token-level core: clip_cov / kl_cov token selections and the
gspo / geo_mean row sums, C++ (csrc/policy_selection.cpp) against the PyTorch path and the float64
oracles of rlhf_kernels/reference/policy_losses.py, and the losses equal between the two backends."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_grad_close

from rlhf_kernels import _dispatch, _ext
from rlhf_kernels.ops import policy_losses as pl
from rlhf_kernels.ops.cpu import _policy_selection as sel
from rlhf_kernels.ops.cpu.policy_losses import IS_LOG_EPS, clip_cov_selection, kl_cov_selection
from rlhf_kernels.reference import policy_losses as ref

SHAPES = [(1, 1), (1, 17), (5, 9), (7, 130), (3, 1100)]  # 1100 > one C++ piece (1024 positions)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RATIOS = [0.0002, 0.1, 1.0]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}


@pytest.fixture(scope="module", autouse=True)
def _extension():
    """The C++ extension is built on first use (about a minute): a build failure fails these tests."""
    reason = _ext.unavailable_reason("policy_losses", "cpp")
    assert reason is None, reason


def _inputs(shape, dtype=torch.float32, spread=0.4):
    lp = -torch.rand(shape) * 3
    old = lp + torch.randn(shape) * spread
    adv = torch.randn(shape) * 2
    mask = torch.rand(shape) < 0.7
    if shape[0] > 2:
        mask[1] = False
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _clip_cov(lp, old, adv, mask, ratio, clip_low=0.2, clip_high=0.28, lower=0.02, upper=3.0):
    return clip_cov_selection(lp, old, adv, mask, clip_low, clip_high, ratio, lower, upper)


def _both(fn, *args, **kwargs):
    """(C++ result, PyTorch result) of ``fn(*args, **kwargs)``."""
    out = []
    for backend in ("cpp", "torch"):
        with _dispatch.use_backend(backend):
            out.append(fn(*args, **kwargs))
    return out


def _assert_selection(got, want, dtype):
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == compute and got.shape == want.shape
    assert torch.equal(got.double(), want.double()), (got != want).nonzero()[:8].tolist()


def test_cpp_is_the_auto_cpu_backend():
    assert _dispatch.backend_for(pl.FAMILY, "cpu") == "cpp"
    with _dispatch.use_backend("torch"):
        assert not sel.cpp_runs(torch.device("cpu"))
    assert sel.cpp_runs(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# Selections: C++ = PyTorch = float64 oracle, exactly.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_selections_match_torch_and_oracle(shape, dtype):
    lp, old, adv, mask = _inputs(shape, dtype)
    for ratio in RATIOS:
        cpp, torch_path = _both(_clip_cov, lp, old, adv, mask, ratio)
        want = ref.clip_cov_selection(lp, old, adv, mask, 0.2, 0.28, ratio, 0.02, 3.0)
        _assert_selection(cpp, want, dtype)
        _assert_selection(torch_path, want, dtype)
        cpp, torch_path = _both(kl_cov_selection, lp, adv, mask, ratio)
        want = ref.kl_cov_selection(lp, adv, mask, ratio)
        _assert_selection(cpp, want, dtype)
        _assert_selection(torch_path, want, dtype)


def test_clip_cov_budget_and_eligible_counts():
    """Budget max(⌊ratio·Σm⌋, 1); fewer eligible tokens than the budget selects all of them; ratio 1.0
    (a float mask: Σm is not the count)."""
    lp, old, adv, mask = _inputs((6, 301))
    eligible = ref.clip_cov_selection(lp, old, adv, mask, 0.2, 0.28, 1.0, 0.02, 3.0)
    n_eligible = int(eligible.sum())
    assert 0 < n_eligible < int(mask.sum())
    for ratio, count in ((1e-9, 1), (0.01, int(0.01 * int(mask.sum()))), (1.0, n_eligible)):
        for got in _both(_clip_cov, lp, old, adv, mask, ratio):
            assert int(got.sum()) == count
            assert bool((got <= eligible).all())
    weights = mask * torch.rand(mask.shape).clamp(min=0.1)  # float mask
    want = ref.clip_cov_selection(lp, old, adv, weights, 0.2, 0.28, 0.05, 0.02, 3.0)
    assert int(want.sum()) > 0
    for got in _both(_clip_cov, lp, old, adv, weights, 0.05):
        _assert_selection(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_cov_ties_take_the_lower_flat_index(dtype):
    """Many equal covariances, the last selected rank inside a group of equal values: the group's lowest
    flat indices are taken.  Mirrored integer (A, lp) pairs make Ā and l̄p exact, so every precision sees
    the same ties."""
    torch.manual_seed(3)
    half = 150
    a = torch.randint(-2, 3, (half,)).double()
    l = torch.randint(-2, 3, (half,)).double()
    pairs = torch.stack([torch.cat([a, -a]), torch.cat([l, -l])])[:, torch.randperm(2 * half)]
    B, T = 6, 61
    mask = torch.zeros(B * T, dtype=torch.bool)
    mask[torch.randperm(B * T)[: 2 * half]] = True
    adv = torch.full((B * T,), float("nan"), dtype=torch.float64)
    lp = torch.full((B * T,), float("inf"), dtype=torch.float64)
    adv[mask], lp[mask] = pairs[0], pairs[1] - 2.0  # l̄p = −2, Ā = 0; NaN / inf only where masked
    adv, lp, mask = adv.view(B, T).to(dtype), lp.view(B, T).to(dtype), mask.view(B, T)
    cov = torch.where(mask, adv.double() * (lp.double() + 2.0), -torch.inf).flatten()
    for ratio in (0.05, 0.2, 0.5, 0.9, 1.0):
        k = int(2 * half * ratio)
        last = cov.sort(descending=True).values[k - 1]
        assert int((cov == last).sum()) > 2  # the cut falls in a group of ties
        above, tied = cov > last, (cov == last).nonzero().flatten()
        want = above.clone()
        want[tied[: k - int(above.sum())]] = True  # the lowest flat indices of the tied group
        want = want.view(B, T).double()
        assert torch.equal(ref.kl_cov_selection(lp, adv, mask, ratio), want)
        for got in _both(kl_cov_selection, lp, adv, mask, ratio):
            _assert_selection(got, want, dtype)


def test_all_masked_and_empty_selections():
    lp, old, adv, _ = _inputs((4, 33))
    mask = torch.zeros(4, 33, dtype=torch.bool)
    for ratio in (0.0002, 1.0):
        got = _both(_clip_cov, lp, old, adv, mask, ratio) + _both(kl_cov_selection, lp, adv, mask, ratio)
        for selected in got:
            assert selected.shape == (4, 33) and not bool(selected.any())


def test_masked_positions_are_never_read():
    """NaN / inf at masked positions: the selection of the same inputs with zeros there."""
    lp, old, adv, mask = _inputs((5, 130))
    nan, inf = float("nan"), float("inf")
    dirty = [torch.where(mask, t, bad) for t, bad in zip((lp, old, adv), (nan, inf, nan))]
    clean = [torch.where(mask, t, 0.0) for t in (lp, old, adv)]
    for ratio in (0.01, 1.0):
        want = ref.clip_cov_selection(*clean, mask, 0.2, 0.28, ratio, 0.02, 3.0)
        for got in _both(_clip_cov, *dirty, mask, ratio):
            _assert_selection(got, want, torch.float32)
        want = ref.kl_cov_selection(clean[0], clean[2], mask, ratio)
        for got in _both(kl_cov_selection, dirty[0], dirty[2], mask, ratio):
            _assert_selection(got, want, torch.float32)


def test_nan_at_a_valid_position():
    """NaN in lp at a valid position makes every covariance NaN: clip_cov selects nothing (NaN is never in
    range), kl_cov ranks NaN above every number, so the first k valid tokens in flat order."""
    lp, old, adv, mask = _inputs((4, 50))
    lp[2, 7], mask[2, 7] = float("nan"), True
    for ratio in (0.1, 1.0):
        for got in _both(_clip_cov, lp, old, adv, mask, ratio):
            assert not bool(got.any())
        want = ref.kl_cov_selection(lp, adv, mask, ratio)
        first = mask.flatten().nonzero().flatten()[: int(int(mask.sum()) * ratio)]
        assert torch.equal(want.flatten().nonzero().flatten(), first)
        for got in _both(kl_cov_selection, lp, adv, mask, ratio):
            _assert_selection(got, want, torch.float32)
    # NaN in old_logprobs at a valid position: that token's ratio is NaN, so it is not clipped.
    lp, old, adv, mask = _inputs((4, 50))
    old[0, 3], mask[0, 3] = float("nan"), True
    want = ref.clip_cov_selection(lp, old, adv, mask, 0.2, 0.28, 1.0, -100.0, 100.0)
    assert want[0, 3] == 1.0
    for got in _both(_clip_cov, lp, old, adv, mask, 1.0, 0.2, 0.28, -100.0, 100.0):
        _assert_selection(got, want, torch.float32)


def test_views_mask_dtypes_and_inputs_unmodified():
    """Transposed and strided views, int / float / fp16 masks: the contiguous bool-mask answer; the
    inputs are left as they were."""
    lp, old, adv, mask = _inputs((9, 70))
    want_clip = ref.clip_cov_selection(lp, old, adv, mask, 0.2, 0.28, 0.1, 0.02, 3.0)
    want_kl = ref.kl_cov_selection(lp, adv, mask, 0.1)
    wide = [torch.stack([t, torch.full_like(t, float("nan"))], -1).flatten(1) for t in (lp, old, adv)]
    strided = [w[:, ::2] for w in wide]  # stride 2 along T, NaN in between
    transposed = [t.t().contiguous().t() for t in (lp, old, adv)]
    for views in (strided, transposed):
        for m in (mask, mask.int(), mask.to(torch.float16), mask.t().contiguous().t()):
            before = [v.clone() for v in (*views, m)]
            for got in _both(_clip_cov, *views, m, 0.1):
                _assert_selection(got, want_clip, torch.float32)
            for got in _both(kl_cov_selection, views[0], views[2], m, 0.1):
                _assert_selection(got, want_kl, torch.float32)
            for v, b in zip((*views, m), before):
                assert torch.equal(v, b) or torch.equal(v.isnan(), b.isnan())


def test_fp64_scalars_are_not_rounded():
    """fp64 inputs and scalars like 0.7 stay fp64: the oracle's exact selection at a bound that fp32
    would round (the covariance bound 1 + 2^-40 between two fp32 numbers)."""
    lp, old, adv, mask = _inputs((5, 130), torch.float64)
    cov = (adv - (adv * mask).sum() / mask.sum()) * (lp - (lp * mask).sum() / mask.sum())
    lower = float(cov[mask].median()) + 2.0**-40
    for ratio in (0.3, 1.0):
        want = ref.clip_cov_selection(lp, old, adv, mask, 0.7, 0.3, ratio, lower, 3.0)
        for got in _both(_clip_cov, lp, old, adv, mask, ratio, 0.7, 0.3, lower, 3.0):
            _assert_selection(got, want, torch.float64)


def test_parallel_rounds_agree_with_one_thread():
    """Batches above the C++ grain (2^17 tokens) run in parallel: the same selection as one thread and
    as the PyTorch path."""
    lp, old, adv, mask = _inputs((66, 2100))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with _dispatch.use_backend("cpp"):
                results.append([_clip_cov(lp, old, adv, mask, r) for r in (0.0002, 0.3)])
                results[-1] += [kl_cov_selection(lp, adv, mask, r) for r in (0.0002, 0.3)]
    finally:
        torch.set_num_threads(threads)
    with _dispatch.use_backend("torch"):
        want = [_clip_cov(lp, old, adv, mask, r) for r in (0.0002, 0.3)]
        want += [kl_cov_selection(lp, adv, mask, r) for r in (0.0002, 0.3)]
    for one, two, w in zip(*results, want):
        assert torch.equal(one, w) and torch.equal(two, w)


# ---------------------------------------------------------------------------------------------------
# Row passes and the losses: "cpp" = "torch" (values, gradients, metrics) and = the oracle.
# ---------------------------------------------------------------------------------------------------
def test_row_passes_match_torch_and_ignore_masked_positions():
    lp, old, adv, mask = _inputs((6, 1100))
    mask = mask * torch.rand(mask.shape)  # float weights
    w = torch.rand(mask.shape) * 2
    nan = float("nan")
    dirty = [torch.where(mask != 0, t, nan) for t in (lp, old, adv, w)]
    m = mask.double()
    seq = ((lp.double() - old.double()) * m).sum(-1) / m.sum(-1).clamp(min=1)
    row_adv = (adv.double() * m).sum(-1)
    row_log_w = (torch.log(w.double() + IS_LOG_EPS) * m).sum(-1)
    for d in _both(sel.gspo_log_ratio, dirty[0], dirty[1], mask, torch.float32):
        assert d.shape == lp.shape and d.stride() == (1, 0)
        assert_close(d[:, 0], seq, 2e-6, "gspo row log-ratio")
    for a, lw in _both(sel.geo_mean_row_sums, dirty[2], mask, dirty[3], torch.float32, IS_LOG_EPS):
        assert_close(a, row_adv, 2e-5, "geo_mean row Σ A·m")
        assert_close(lw, row_log_w, 2e-5, "geo_mean row Σ log w·m")
    for a, lw in _both(sel.geo_mean_row_sums, adv, mask, None, torch.float32, IS_LOG_EPS):
        assert lw is None
        assert_close(a, row_adv, 2e-5, "geo_mean row Σ A·m")
    lp[3, 5], mask[3, 5] = nan, 1.0  # NaN at a valid position: its row only
    for d in _both(sel.gspo_log_ratio, lp, old, mask, torch.float32):
        assert d[3].isnan().all() and not d[[0, 1, 2, 4, 5]].isnan().any()


def test_geo_mean_log_is_within_one_ulp():
    """The C++ fp32 logarithm of the weights (vectorised) against float64: under 1 ulp over 1e-35..1e35
    and [0.5, 2]; 0, negatives, inf, NaN and subnormals as torch.log."""
    w = torch.cat([
        torch.exp(torch.empty(60_000).uniform_(-80.0, 80.0)), torch.linspace(0.5, 2.0, 20_001),
        torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("nan"), 1e-45, 1e-38, 3.4e38]),
    ]).view(-1, 1)
    ones = torch.ones_like(w, dtype=torch.bool)
    with _dispatch.use_backend("cpp"):
        _, got = sel.geo_mean_row_sums(torch.zeros_like(w), ones, w, torch.float32, 0.0)
    want = torch.log(w.flatten().double())
    finite = torch.isfinite(want)
    ulp = (torch.nextafter(want.float(), torch.tensor(float("inf"))) - want.float()).double().abs()
    assert bool(((got.double() - want).abs()[finite] <= ulp[finite]).all())
    torch.testing.assert_close(got[~finite], torch.log(w.flatten())[~finite], rtol=0, atol=0, equal_nan=True)


def _loss(name, dtype, lp, old, adv, mask, **kwargs):
    x = lp.detach().clone().requires_grad_()
    loss, metrics = pl.POLICY_LOSSES[name](x, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics


@pytest.mark.parametrize("name", ["gspo", "geo_mean", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_equal_between_backends_and_oracle(name, dtype):
    kwargs = {
        "gspo": {"clip_low": 0.05, "clip_high": 0.08},
        "geo_mean": {"clip_low": 0.1},
        "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": 0.02, "clip_cov_ub": 3.0},
        "kl_cov": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5},
    }[name]
    for shape in ((1, 1), (4, 37), (3, 1100)):
        lp, old, adv, mask = _inputs(shape, dtype)
        weights = (torch.rand(shape) * 2).to(dtype)
        for is_weights in (None, weights):
            cpp, torch_path = _both(_loss, name, dtype, lp, old, adv, mask, **kwargs, is_weights=is_weights)
            x = lp.detach().double().requires_grad_()
            want_loss, want_metrics = ref.POLICY_LOSSES[name](
                x, old, adv, mask, **kwargs, is_weights=is_weights
            )
            (want_grad,) = torch.autograd.grad(want_loss, x)
            for loss, grad, metrics in (cpp, torch_path):
                what = f"{name} {dtype} {shape}"
                assert_close(loss, want_loss, TOL[dtype], f"{what} loss")
                grad_tol = 8e-3 if dtype in (torch.bfloat16, torch.float16) else TOL[dtype]  # grad in dtype
                assert_grad_close(grad, want_grad, grad_tol, f"{what} grad")
                for key, value in want_metrics.items():
                    assert_close(metrics[key], value, 2e-6, f"{what} {key}")
            assert_close(cpp[0], torch_path[0], TOL[dtype], "cpp vs torch loss")
            assert_grad_close(cpp[1], torch_path[1], TOL[dtype], "cpp vs torch grad")
            assert set(cpp[2]) == set(torch_path[2])


def test_geo_mean_fully_masked_row():
    """A row with no valid token: Σ A·m = 0 over n_b + 1e-8, its loss term and gradient 0 on both backends."""
    lp, old, adv, mask = _inputs((3, 20))
    mask[0] = False
    w = torch.rand(3, 20) * 2
    x = lp.double().requires_grad_()
    want, _ = ref.geo_mean_policy_loss(x, old, adv, mask, is_weights=w)
    for loss, grad, _ in _both(_loss, "geo_mean", torch.float32, lp, old, adv, mask, is_weights=w):
        assert_close(loss, want, 2e-6, "geo_mean loss")
        assert not grad[0].any()


# ---------------------------------------------------------------------------------------------------
# Registration and tracing
# ---------------------------------------------------------------------------------------------------
def test_opcheck_cpp_ops():
    lp, old, adv, mask = _inputs((3, 9))
    w = torch.rand(3, 9)
    samples = {
        sel.clip_cov_selection_cpp: [(lp, old, adv, mask, 0.2, 0.28, 0.3, 0.02, 3.0)],
        sel.kl_cov_selection_cpp: [(lp, adv, mask.float(), 0.3), (lp.double(), adv.double(), mask, 1.0)],
        sel.gspo_log_ratio_cpp: [(lp, old, mask)],
        sel.geo_mean_row_sums_cpp: [(adv, mask, w, IS_LOG_EPS), (adv.double(), mask, None, IS_LOG_EPS)],
    }
    for op, cases in samples.items():
        for args in cases:
            torch.library.opcheck(op.op, args)


def test_compiled_losses_trace_the_cpp_ops_and_follow_the_backend():
    """torch.compile(fullgraph=True) sees the C++ passes as registered ops; changing the forced backend
    recompiles (the routing is a guarded constant)."""
    lp, old, adv, mask = _inputs((4, 9))
    graphs = []

    def record(gm, inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    def fn(x, o, a, m):
        return pl.kl_cov_policy_loss(x, o, a, m)[0] + pl.gspo_policy_loss(x, o, a, m)[0]

    compiled = torch.compile(fn, fullgraph=True, backend=record)
    for backend, ops in (("cpp", True), ("torch", False)):
        with _dispatch.use_backend(backend):
            assert_close(compiled(lp, old, adv, mask), fn(lp, old, adv, mask), 1e-6, backend)
        names = graphs[-1]
        assert ("rlhf_kernels.kl_cov_selection_cpp.default" in names) == ops
        assert ("rlhf_kernels.gspo_log_ratio_cpp.default" in names) == ops
    assert len(graphs) == 2
