"""Minimal reproducers of what the fuzz suite found (issue 19), each a regular test.

Two groups:
* FIXED — defects issue 19 listed and other changes fixed; these keep them fixed, on both backends.
* PENDING FIX (outside the fuzz suite's files) — each fails until the fix given in its docstring is
  applied to the named file; the fuzz tests skip exactly that input class meanwhile (with ``assume``,
  pointing here), so that nothing else hides behind it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.reference import kl as ref_kl
from rlhf_kernels.reference import logprobs as ref_logprobs
from rlhf_kernels.reference import reward_losses as ref_rw
from rlhf_kernels.reference import token_rewards as ref_tr
from rlhf_kernels.reference import whiten as ref_whiten

from .checks import assert_matches, index_checks

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------------
# FIXED
# --------------------------------------------------------------------------------------------------
def test_logprobs_inplace_backward_refuses_stride0_logits(backend):
    logits = torch.randn(1, 5).expand(3, 5)
    with pytest.raises(ValueError, match="inplace_backward"):
        rk.logprobs_from_logits(logits, torch.zeros(3, dtype=torch.long), inplace_backward=True)


def test_logprobs_empty_middle_dimension(backend):
    logits = torch.randn(2, 0, 7, requires_grad=True)
    lp, h = rk.logprobs_from_logits(logits, torch.zeros(2, 0, dtype=torch.long), return_entropy=True)
    assert lp.shape == (2, 0) and h.shape == (2, 0)
    (grad,) = torch.autograd.grad((lp.sum() + h.sum()), logits)
    assert grad.shape == (2, 0, 7)


def test_masked_whiten_large_magnitudes(backend):
    x = torch.tensor([1e30, 2e30, 3e30, -5.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert_matches(rk.masked_whiten(x, mask), ref_whiten.masked_whiten(x, mask), "whitened 1e30", tol=1e-5)


def test_label_checks_switch_off_on_cpu(backend):
    logits = torch.randn(2, 5)
    labels = torch.tensor([1, 5])
    with pytest.raises(ValueError, match="labels"):
        rk.logprobs_from_logits(logits, labels)
    with index_checks(False):
        lp = rk.logprobs_from_logits(logits, labels)
    assert not lp[0].isnan() and lp[1].isnan()


def test_agg_loss_error_names_mode():
    with pytest.raises(ValueError, match=r"\bmode\b"):
        rk.agg_loss(torch.randn(2, 3), torch.ones(2, 3), "mean")


def test_group_advantages_empty_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = rk.group_advantages(torch.empty(0), 4)
    assert out.shape == (0,)


@pytest.mark.parametrize("entropy", [False, True])
def test_logprobs_label_gradient_where_its_probability_rounds_to_one(backend, entropy):
    """Long fuzz profile, V = 2: the label column's g·(1 − p_y), read as g − g·exp(x_y − lse), was 0 once
    p_y rounds to 1 in fp32 (logits [0, −37]: 1 − p_y = σ(−37) = 8.5e-17).  Now (p_y > 1/2) minus the
    sum of the others: exact to fp32 rounding.  Expected values from σ in float64, not from the oracle
    (whose one_hot − p rounds too: test_reference_logprobs_grad_label_column_below_float64_rounding)."""
    x = torch.tensor([[0.0, -37.0], [-50.0, 0.0]], requires_grad=True)
    lp, h = rk.logprobs_from_logits(x, torch.tensor([0, 1]), return_entropy=True)
    outputs, upstream = ((lp, h), (torch.ones(2), torch.ones(2))) if entropy else (lp, torch.ones(2))
    (grad,) = torch.autograd.grad(outputs, x, upstream)
    d = torch.tensor([37.0, 50.0], dtype=torch.float64)  # x_y − x_other
    q = torch.sigmoid(-d)  # 1 − p_y
    # V = 2: ∂ log p_y/∂x_y = q and ∂H/∂x_y = −p_y·q·(log p_y − log q) = −(1 − q)·q·d
    want_label = q - (1 - q) * q * d if entropy else q
    got_label = grad[torch.arange(2), torch.tensor([0, 1])].double()
    assert torch.allclose(got_label, want_label, rtol=1e-5, atol=0.0), (got_label, want_label)
    assert torch.equal(grad.sum(-1), torch.zeros(2))


def test_oob_guard_is_part_of_the_suite():
    """tests/test_oob_guard.py runs every Triton kernel inside guard regions (issue 19, item 4)."""
    import pathlib

    assert (pathlib.Path(__file__).parents[1] / "test_oob_guard.py").exists()


# --------------------------------------------------------------------------------------------------
# PENDING FIX — library
# --------------------------------------------------------------------------------------------------
EMPTY_SHAPES = [(0, 5), (3, 0), (0, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_ppo_policy_loss(backend, shape):
    """PENDING FIX (ops/aggregation.py check_token_inputs; ops/ppo_losses.py): the empty rule of
    docs/robustness.md — loss 0, metrics 0, gradient of the input's (empty) shape."""
    lp = torch.randn(shape, requires_grad=True)
    loss, metrics = rk.ppo_policy_loss(lp, torch.randn(shape), torch.randn(shape), torch.ones(shape))
    assert loss.dim() == 0 and loss.item() == 0.0
    assert all(v.dim() == 0 and v.item() == 0.0 for v in metrics.values()), metrics
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True)
    assert grad is None or grad.shape == shape


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_ppo_value_loss(backend, shape):
    """PENDING FIX (ops/aggregation.py check_token_inputs): loss 0, clipfrac 0."""
    v = torch.randn(shape, requires_grad=True)
    loss, metrics = rk.ppo_value_loss(v, torch.randn(shape), torch.randn(shape), torch.ones(shape))
    assert loss.item() == 0.0 and metrics["clipfrac"].item() == 0.0


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_kl_loss(backend, shape):
    """PENDING FIX (ops/aggregation.py check_token_inputs): loss 0."""
    lp = torch.randn(shape, requires_grad=True)
    assert rk.kl_loss(lp, torch.randn(shape), torch.ones(shape)).item() == 0.0


def test_logprobs_forward_with_tied_huge_maxima(backend):
    """FIXED (ops/logprobs.py, ops/token_stats.py forwards; found by the long fuzz profile): with two tied
    maxima so large that fp32(m + log 2) = m (logits [1e30, 1e30]), the Triton forward's log-prob x_y − lse
    was 0 instead of −log 2; now (x_y − m) − log s, as the PyTorch path and sampling_logprobs.  The
    backward's limitation (p read as 1) stays as documented."""
    lp, h = rk.logprobs_from_logits(torch.tensor([[1e30, 1e30]]), torch.tensor([0]), return_entropy=True)
    assert lp.item() == pytest.approx(-0.6931471805599453, rel=1e-6)
    assert h.item() == pytest.approx(0.6931471805599453, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2"])
def test_kl_penalty_old_logprobs_keeps_infinite_value(backend, estimator):
    """PENDING FIX (ops/kl.py kl_penalty): with old_logprobs the value is kl + (kl − kl.detach())·(w − 1),
    inf − inf = NaN where kl = inf.  Fix: scale the gradient without touching the value (a small
    autograd.Function returning kl, backward grad·w)."""
    lp = torch.tensor([INF, 1e30, 0.5])
    kl = rk.kl_penalty(lp, torch.zeros(3), estimator, old_logprobs=torch.zeros(3))
    expected = ref_kl.kl_penalty(lp.double(), torch.zeros(3, dtype=torch.float64), estimator)
    assert_matches(kl, expected, f"{estimator} with old_logprobs")


def test_group_advantages_leave_one_out_inf():
    """PENDING FIX (ops/advantages.py group_advantages): the leave-one-out baseline (Σ − s)/(G − 1) is
    inf − inf = NaN for an infinite member; the mean of the others is finite, so A = +inf."""
    out = rk.group_advantages(torch.tensor([INF, 1.0, 2.0]), 3, norm="none", leave_one_out=True)
    assert out[0].item() == INF, out


# --------------------------------------------------------------------------------------------------
# PENDING FIX — the float64 oracles (rlhf_kernels/reference): each hides a NaN, invents one, or crashes
# on an empty input.  The fuzz suite's tests/fuzz/oracles.py and the tests' comments work around them.
# --------------------------------------------------------------------------------------------------
def test_reference_entropy_of_nan_logits_is_nan():
    """reference/logprobs.py: −Σ where(p > 0, p log p, 0) turns NaN p into 0; use where(p == 0, 0, ·)."""
    assert ref_logprobs.entropy_from_logits(torch.tensor([[NAN, 0.0]])).isnan().all()


def test_reference_kl_straight_through_keeps_large_values():
    """reference/kl.py kl_penalty: value + w·k2 − (w·k2).detach() rounds 1e30 to 0 (and inf − inf = NaN);
    write value + (w·k2 − (w·k2).detach())."""
    lp = torch.tensor([1e30], dtype=torch.float64)
    out = ref_kl.kl_penalty(lp, torch.zeros(1, dtype=torch.float64), "k1",
                            old_logprobs=torch.zeros(1, dtype=torch.float64))
    assert out.item() == 1e30


def test_reference_logprobs_grad_label_column_below_float64_rounding():
    """FIXED (reference/logprobs.py logprobs_grad): g·(one_hot − p) rounded 1 − p_y to 0 once p_y is within
    1.1e-16 of 1 (logits [0, −37]: 0 where the gradient is σ(−37)·g = 8.5e-17·g); the oracle now forms the
    label column as minus the sum of the others, as the kernels do where p_y > 1/2."""
    one = torch.ones(1, dtype=torch.float64)
    grad = ref_logprobs.logprobs_grad(torch.tensor([[0.0, -37.0]]), torch.tensor([0]), one, None)
    want = torch.sigmoid(torch.tensor(-37.0, dtype=torch.float64)).item()
    assert grad[0, 0].item() == pytest.approx(want, rel=1e-12, abs=0.0)


def test_reference_whiten_empty_rows():
    """reference/whiten.py: x.reshape(-1, 0) raises for an empty last dimension; return zeros early."""
    assert ref_whiten.masked_whiten(torch.empty(3, 0), torch.empty(3, 0), dim=-1).shape == (3, 0)


def test_reference_token_rewards_empty_batch_mean_is_zero():
    """reference/token_rewards.py: row_kl.mean() of no row is NaN; the library and the rule give 0."""
    e = torch.empty(0, 4)
    _, kl_mean = ref_tr.token_level_rewards(torch.empty(0), e, e, e, kl_coef=0.1)
    assert kl_mean.item() == 0.0


def test_reference_reward_means_over_nothing_are_zero():
    """reference/reward_losses.py: .mean() over no pair/prompt/element is NaN; divide by max(n, 1)."""
    e = torch.empty(0, dtype=torch.float64)
    assert ref_rw.pairwise_reward_loss(e, e)[0].item() == 0.0
    assert ref_rw.pointwise_reward_loss(e, e).item() == 0.0
    assert ref_rw.ranking_hinge_loss(torch.empty(0, 3, dtype=torch.float64)).item() == 0.0


def test_reference_ranking_gradient_of_unpaired_nan_is_zero():
    """reference/reward_losses.py _pairs/ranking: torch.where(pair_valid, sp(s_i − s_j), 0) sends a NaN
    gradient through the invalid pair; use sp(torch.where(pair_valid, s_i − s_j, 0))."""
    s = torch.tensor([3.0, NAN], dtype=torch.float64, requires_grad=True)
    loss, _ = ref_rw.ranking_reward_loss(s, mask=torch.tensor([False, True]))
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.equal(grad, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("return_entropy", [False, True])
def test_interpreter_logprobs_warns_nothing(return_entropy):
    """PENDING FIX (ops/logprobs.py, issue 19's "invalid value encountered in multiply" under
    TRITON_INTERPRET=1): the forward kernel computes e·(x − m) = 0·(−inf) in the padding lanes of a block
    (discarded by tl.where, but numpy warns), the backward p·(log p + H) likewise.  Fix: move the where
    inside the product — ``e * tl.where(x == -inf, 0.0, x - m_ref)`` and
    ``p * tl.where(x == -inf, 0.0, logp + entropy)``: the same values, no NaN computed."""
    from rlhf_kernels import _dispatch

    x = torch.randn(3, 7, requires_grad=True)  # V = 7: the block has 9+ padding lanes
    with warnings.catch_warnings(), _dispatch.use_backend("triton"):
        warnings.simplefilter("error", RuntimeWarning)
        out = rk.logprobs_from_logits(x, torch.tensor([1, -100, 2]), return_entropy=return_entropy)
        loss = out[0].sum() + out[1].sum() if return_entropy else out.sum()
        loss.backward()


def test_kl_penalty_bf16_gradient_with_fp64_ref():
    """PENDING FIX (ops/kl.py _kl_penalty_bwd_kernel; Triton interpreter only): Triton 3.9's interpreter
    casts fp64 to bf16 wrongly (1.0 -> 9.2e-41), so bf16 logprobs with fp64 ref_logprobs get a garbage
    gradient in CI.  Fix: store through fp32, ``grad.to(tl.float32).to(grad_logprobs_ptr.dtype.element_ty)``
    (and the same for grad_ref): exact on the GPU too, up to a double rounding at exact bf16 ties."""
    from rlhf_kernels import _dispatch

    lp = torch.tensor([0.3, -1.2], dtype=torch.bfloat16, requires_grad=True)
    ref = torch.tensor([0.1, 0.4], dtype=torch.float64, requires_grad=True)
    with _dispatch.use_backend("triton"):
        grads = torch.autograd.grad(rk.kl_penalty(lp, ref, "k1").sum(), [lp, ref])
    assert torch.equal(grads[0], torch.ones(2, dtype=torch.bfloat16)), grads[0]


def test_ppo_value_loss_clipfrac_without_clip_ignores_nan(backend):
    """PENDING FIX (ops/ppo_losses.py _value_token_terms): without a clip the "all False" flag is
    ``err != err``, True at a NaN value, so clipfrac counts NaN tokens as clipped on the Triton path
    (torch path: 0).  Fix: ``clipped = err < err`` (False for every value, NaN included); likewise
    ``lower = clipped & (adv < adv)`` in _policy_token_terms."""
    v = torch.tensor([[float("nan"), 0.5]])
    _, metrics = rk.ppo_value_loss(v, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip=None)
    assert metrics["clipfrac"].item() == 0.0


def test_reference_linear_logprobs_ignored_nan_row_gets_no_gradient():
    """FIXED (reference/linear_logprobs.py; found by the fuzz suite's derandomized draws): a NaN hidden row
    whose label is ignored gave the float64 oracle a NaN gradient (log_softmax's backward of a NaN row,
    0·NaN), while the library gives it exactly 0 (docs/linear_logprobs.md: ignored rows reach nothing).
    The oracle now leaves ignored rows out of the product too."""
    from rlhf_kernels.reference import linear_logprobs as ref_linear

    hidden = torch.tensor([[0.5], [-0.3], [float("nan")]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[0.7]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, -100])
    lp, ent = ref_linear.linear_logprobs(hidden, weight, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad[2, 0].item() == 0.0 and torch.isfinite(weight.grad).all()
    got = rk.linear_logprobs(hidden.detach().float().requires_grad_(), weight.detach().float(), labels)
    assert got[2].item() == 0.0 and lp[2].item() == 0.0
