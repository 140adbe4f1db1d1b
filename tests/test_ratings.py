"""Elo ratings (a sequential scan) on every backend against a float64 Python loop, and the Bradley–Terry
fit against a float64 Newton fit and against the known strengths that generated the comparisons."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, assert_close, assert_compiles_for_sm90, backend_device

from rlhf_kernels.ops import ratings as ratings_ops
from rlhf_kernels.ops.ratings import ELO_SCALE, bradley_terry, elo_ratings
from rlhf_kernels.reference import ratings as ref

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None


def comparisons(leagues: int | None, n: int, num_items: int, seed: int, pad: bool = True):
    """Random (winners, losers, scores) with −1 padding, out-of-range and self-comparisons mixed in."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if leagues is None else (leagues, n)
    winners = torch.randint(0, max(num_items, 1), shape, generator=gen)
    losers = torch.randint(0, max(num_items, 1), shape, generator=gen)
    if pad and n >= 4:
        winners.view(-1)[1] = -1
        losers.view(-1)[2] = num_items + 3
        losers.view(-1)[3] = winners.view(-1)[3]
    scores = torch.rand(shape, generator=gen, dtype=torch.float64)
    return winners, losers, scores


def simulate(strengths: torch.Tensor, n: int, seed: int):
    """n comparisons of uniformly drawn pairs under P(i beats j) = σ(θ_i − θ_j)."""
    gen = torch.Generator().manual_seed(seed)
    items = strengths.numel()
    a = torch.randint(0, items, (n,), generator=gen)
    b = (a + torch.randint(1, items, (n,), generator=gen)) % items
    won = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(strengths[a] - strengths[b])
    return torch.where(won, a, b), torch.where(won, b, a)


# ---------------------------------------------------------------------------------------------------
# Elo
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("leagues, n, num_items", [(None, 33, 17), (None, 1, 1), (3, 25, 5), (2, 0, 4),
                                                   (None, 40, 1100)])
def test_elo_matches_float64_loop(backend, device, leagues, n, num_items):
    winners, losers, scores = comparisons(leagues, n, num_items, seed=n + num_items)
    for with_scores in (False, True):
        s = scores if with_scores else None
        got = elo_ratings(winners.to(device), losers.to(device), num_items, k=24.0,
                          scores=None if s is None else s.float().to(device))
        expected = ref.elo_ratings(winners, losers, num_items, k=24.0, scores=s)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert_close(got, expected, 1e-6, f"elo {backend} scores={with_scores}")


def test_elo_float64_is_float64_exact(backend, device):
    """fp64 in, fp64 math: the K-factor 0.7 and the ln10/400 slope reach the kernel in full precision."""
    winners, losers, scores = comparisons(2, 60, 9, seed=3)
    initial = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 200 + 1500
    got = elo_ratings(winners.to(device), losers.to(device), 9, k=0.7, initial=initial.to(device),
                      scores=scores.to(device))
    expected = ref.elo_ratings(winners, losers, 9, k=0.7, initial=initial, scores=scores)
    assert got.dtype == torch.float64
    assert_close(got, expected, 1e-12, f"elo fp64 {backend}")
    # the same starting ratings for every league, as an [I] tensor
    got = elo_ratings(winners.to(device), losers.to(device), 9, initial=initial[0].to(device))
    assert_close(got, ref.elo_ratings(winners, losers, 9, initial=initial[0]), 1e-12, "elo shared initial")


def test_elo_worked_example_and_order_matters(backend, device):
    w, l = torch.tensor([0], device=device), torch.tensor([1], device=device)
    assert elo_ratings(w, l, 2).tolist() == [1016.0, 984.0]
    draw = elo_ratings(w, l, 2, initial=torch.tensor([1100.0, 1000.0], device=device),
                       scores=torch.tensor([0.5], device=device))
    expected_draw = 1 / (1 + 10 ** (-100 / 400))
    assert_close(draw, torch.tensor([1100 + 32 * (0.5 - expected_draw), 1000 - 32 * (0.5 - expected_draw)]),
                 1e-6, "draw")
    # a sequential scan: the same comparisons in another order give other ratings
    winners, losers = torch.tensor([0, 1, 2, 0], device=device), torch.tensor([1, 2, 0, 2], device=device)
    forward = elo_ratings(winners, losers, 3)
    backward = elo_ratings(winners.flip(0), losers.flip(0), 3)
    assert not torch.equal(forward, backward)
    assert_close(forward.sum(), torch.tensor(3000.0), 1e-7, "Elo conserves the total")


def test_elo_skips_padding_and_never_reads_out_of_bounds(backend, device):
    winners = torch.tensor([[0, -1, 5, 1, 2], [-7, 1, 1, 0, 100]], device=device)
    losers = torch.tensor([[1, 0, 0, 1, -1], [0, 2, 1, 2, 0]], device=device)
    got = elo_ratings(winners, losers, 3)
    assert_close(got[0], ref.elo_ratings(winners[0, :1].cpu(), losers[0, :1].cpu(), 3), 1e-7, "only (0, 1)")
    kept = torch.tensor([1, 0]), torch.tensor([2, 2])
    assert_close(got[1], ref.elo_ratings(*kept, 3), 1e-7, "only (1, 2), (0, 2)")


def test_elo_nan_score_poisons_only_its_items(backend, device):
    winners, losers = torch.tensor([0, 2, 3], device=device), torch.tensor([1, 3, 2], device=device)
    scores = torch.tensor([float("nan"), 1.0, 0.0], device=device)
    got = elo_ratings(winners, losers, 4, scores=scores).cpu()
    assert got[:2].isnan().all() and got[2:].isfinite().all()


def test_elo_inputs_unchanged_and_empty(backend, device):
    winners, losers, scores = comparisons(2, 20, 6, seed=4)
    initial = torch.randn(6, dtype=torch.float64) + 1000
    copies = [t.clone() for t in (winners, losers, scores, initial)]
    elo_ratings(winners.to(device), losers.to(device), 6, initial=initial.to(device),
                scores=scores.to(device))
    for t, c in zip((winners, losers, scores, initial), copies):
        assert torch.equal(t, c)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    assert elo_ratings(empty, empty, 3).tolist() == [1000.0] * 3
    assert elo_ratings(empty, empty, 0).shape == (0,)
    assert elo_ratings(empty.view(0, 0), empty.view(0, 0), 3).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elo_kernel_writes_every_rating(dtype):
    """The launcher copies the starting ratings into the output itself: poison the output first."""
    device = backend_device("triton")
    winners, losers, scores = comparisons(3, 30, 37, seed=8)
    initial = torch.randn(3, 37, dtype=dtype) * 50 + 1000
    out = torch.full((3, 37), float("nan"), dtype=dtype, device=device)
    ratings_ops._launch_elo_out(out, initial.to(device), winners.to(device), losers.to(device),
                                scores.to(dtype).to(device), 32.0, ELO_SCALE)
    expected = ref.elo_ratings(winners, losers, 37, initial=initial, scores=scores.to(dtype))
    assert_close(out, expected, 1e-12 if dtype == torch.float64 else 1e-6, "poisoned output")


def test_elo_bad_arguments():
    w = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="winners must be an integer tensor"):
        elo_ratings(w.float(), w, 2)
    with pytest.raises(ValueError, match=r"losers must have shape winners.shape = \(2,\); got \(3,\)"):
        elo_ratings(w, torch.tensor([1, 0, 1]), 2)
    with pytest.raises(ValueError, match="winners must be 1-D"):
        elo_ratings(w.view(1, 1, 2), w.view(1, 1, 2), 2)
    with pytest.raises(ValueError, match="num_items must be >= 0"):
        elo_ratings(w, w, -1)
    with pytest.raises(TypeError, match="num_items must be a Python int"):
        elo_ratings(w, w, 2.0)
    with pytest.raises(ValueError, match="k must be > 0"):
        elo_ratings(w, w, 2, k=0.0)
    with pytest.raises(ValueError, match=r"initial must be a float or have shape"):
        elo_ratings(w, w, 2, initial=torch.zeros(3))
    with pytest.raises(TypeError, match="scores must be a floating tensor"):
        elo_ratings(w, w, 2, scores=torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        elo_ratings(w, w, 2, dtype=torch.float16)


def test_elo_cpu_loop_equals_tensor_loop():
    """The CPU path's Python-float loop is the same recurrence as a loop of tensor ops (the baseline
    that bench/bench_ratings.py times it against)."""
    from bench.baselines.ratings import elo_tensor_loop

    winners, losers, scores = comparisons(None, 50, 7, seed=2)
    with torch.no_grad():
        expected = elo_tensor_loop(winners, losers, 7, 32.0, 1000.0, scores)
    got = elo_ratings(winners, losers, 7, scores=scores)
    assert_close(got, expected, 1e-12, "tensor loop")


def registration_samples(device: str) -> dict[str, list[tuple]]:
    """opcheck samples of the ratings family's registered ops, for tests/test_registration.py's
    SAMPLE_BUILDERS (opcheck passes on both, checked when this was written)."""
    winners, losers, scores = comparisons(2, 9, 5, seed=0)
    winners, losers, scores = winners.to(device), losers.to(device), scores.float().to(device)
    initial = torch.randn(2, 5, device=device) * 10 + 1000
    args = [(initial, winners, losers, None, 32.0, ELO_SCALE),
            (initial, winners, losers, scores, 16.0, ELO_SCALE)]
    return {"elo_ratings": args, "elo_ratings_torch": args}


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_kernels.ops import ratings

kernel = ratings._elo_fwd_kernel
for acc, ptr in ((triton.language.float32, "*fp32"), (triton.language.float64, "*fp64")):
    types = [ptr, ptr, "*i64", "*i64", ptr] + ["i64"] * 3 + ["i32"] * 2 + ["fp32"] * 6 + ["constexpr"] * 3
    triton.compile(
        ASTSource(fn=kernel, signature=dict(zip(kernel.arg_names, types)),
                  constexprs={"HAS_SCORES": True, "ACC": acc, "BLOCK_I": 128}),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernel runs natively in the other tests")
@pytest.mark.skipif(triton is None, reason="needs triton")
def test_elo_kernel_compiles_for_sm90_without_a_gpu():
    assert_compiles_for_sm90(_AOT_SCRIPT)


# ---------------------------------------------------------------------------------------------------
# Bradley–Terry
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", [1.0, 0.3])
def test_bradley_terry_matches_float64_newton_fit(prior):
    winners, losers, scores = comparisons(3, 80, 8, seed=11)
    for s in (None, scores):
        got = bradley_terry(winners, losers, 8, scores=s, prior=prior, dtype=torch.float64, tol=0.0)
        expected = ref.bradley_terry(winners, losers, 8, scores=s, prior=prior)
        assert_close(got, expected, 1e-10, f"BT prior={prior} scores={s is not None}")
        assert_close(got.mean(-1), torch.zeros(3, dtype=torch.float64), 1e-12, "anchored")
    got32 = bradley_terry(winners, losers, 8, prior=prior)
    assert got32.dtype == torch.float32
    assert_close(got32, ref.bradley_terry(winners, losers, 8, prior=prior), 1e-4, "fp32, default tol")


def test_bradley_terry_maximum_likelihood_without_prior():
    truth = torch.tensor([-1.0, -0.3, 0.2, 1.1], dtype=torch.float64)
    winners, losers = simulate(truth, 400, seed=5)
    got = bradley_terry(winners, losers, 4, prior=0.0, dtype=torch.float64, iters=400, tol=0.0)
    assert_close(got, ref.bradley_terry(winners, losers, 4, prior=0.0), 1e-9, "MLE")
    # an item that never wins is infinitely weak under the plain likelihood, finite with a prior
    w, l = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 2, 2])
    mle = bradley_terry(w, l, 3, prior=0.0)
    assert mle[2] == -math.inf and mle[:2].tolist() == [0.0, 0.0]
    assert bradley_terry(w, l, 3, prior=1.0).isfinite().all()


def test_bradley_terry_recovers_known_strengths():
    truth = torch.linspace(-1.5, 1.5, 12, dtype=torch.float64)
    winners, losers = simulate(truth, 30000, seed=1)
    got = bradley_terry(winners.cuda() if HAS_CUDA else winners, losers.cuda() if HAS_CUDA else losers, 12)
    # 5,000 comparisons per item: the standard error of each θ is ~0.03
    assert_close(got, truth, 0.1, "recovered strengths")
    elo = bradley_terry(winners, losers, 12, scale="elo")
    assert_close(elo, 1000 + got.cpu() * 400 / math.log(10), 1e-6, "Elo scale")
    # the Elo scan over the same comparisons orders the items the same way, up to noise
    scan = elo_ratings(winners, losers, 12, k=4.0)
    assert torch.corrcoef(torch.stack([scan.double(), truth]))[0, 1] > 0.98


def test_bradley_terry_edge_cases():
    w, l = torch.tensor([0]), torch.tensor([1])
    assert_close(bradley_terry(w, l, 2, dtype=torch.float64, tol=0.0), ref.bradley_terry(w, l, 2), 1e-12,
                 "example")
    assert_close(bradley_terry(w, l, 2), torch.tensor([0.528, -0.528]), 1e-3, "docstring example")
    got = bradley_terry(torch.tensor([0, 0, -1]), torch.tensor([1, 0, 3]), 4)  # items 2, 3 never compared
    assert got[2] == got[3] and got.sum().abs() < 1e-6
    none = torch.zeros(0, dtype=torch.long)
    assert bradley_terry(none, none, 3).tolist() == [0.0] * 3
    assert bradley_terry(w, w, 0).shape == (0,)
    nan_score = torch.tensor([float("nan"), 1.0])
    nan = bradley_terry(torch.tensor([0, 2]), torch.tensor([1, 3]), 4, scores=nan_score)
    assert nan.isnan().any()
    # a loose tolerance stops early (a worse fit), a tight one runs to the converged fit
    winners, losers = simulate(torch.linspace(-1, 1, 6, dtype=torch.float64), 300, seed=2)
    exact = ref.bradley_terry(winners, losers, 6)
    loose = bradley_terry(winners, losers, 6, tol=1e-2, dtype=torch.float64)
    tight = bradley_terry(winners, losers, 6, tol=1e-13, iters=300, dtype=torch.float64)
    assert (loose - exact).abs().max() > 1e-5
    assert_close(tight, exact, 1e-11, "tight tol")
    with pytest.raises(ValueError, match="prior must be >= 0"):
        bradley_terry(w, l, 2, prior=-1.0)
    with pytest.raises(ValueError, match="scale must be one of"):
        bradley_terry(w, l, 2, scale="glicko")
    with pytest.raises(ValueError, match="iters must be >= 0"):
        bradley_terry(w, l, 2, iters=-1)
