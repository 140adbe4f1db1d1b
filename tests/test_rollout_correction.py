"""rollout_correction (and the bypass_mode policy loss) against the float64 oracle; defined results where
verl raises or divides by zero; errors; no host sync; inputs untouched.  Parity with the real verl 0.9.1:
tests/test_rollout_correction_verl.py."""

from __future__ import annotations

import pytest
import torch
from peers.cases import close
from peers.cases import mask as make_mask

from rlhf_kernels.ops import policy_losses as pl
from rlhf_kernels.ops.rollout_correction import REJECTION_OPTIONS, rollout_correction
from rlhf_kernels.reference import rollout_correction as ref

METRIC_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5}
WEIGHT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}  # weights in the input dtype
# Settings that make every branch happen on small random batches (spread 0.5): some tokens truncated /
# zeroed, some rejected, some kept, by every kind of option.
SETTINGS = [
    dict(level="token", threshold=1.5),
    dict(level="sequence", threshold=3.0, batch_normalize=True),
    dict(level="token", threshold=(0.7, 1.4), batch_normalize=True,
         rejection={"token_k1": (0.6, 1.8), "seq_mean_k3": 0.15, "seq_max_k2": 0.8}),
    dict(level="sequence", threshold=(0.05, 20.0),
         rejection={"seq_sum_k1": 20.0, "token_k2": 0.4, "seq_sum_k3": 5.0}),
    dict(level=None, rejection={"seq_mean_k1": (0.8, 1.3), "token_k3": 0.3, "seq_mean_k2": 0.2,
                                "seq_max_k3": 1.5, "seq_sum_k2": 4.0}),
]


def _inputs(B, T, dtype=torch.float32, kind="holes", spread=0.5):
    rollout = -torch.rand(B, T) * 4
    logprobs = rollout + torch.randn(B, T) * spread
    return logprobs.to(dtype), rollout.to(dtype), make_mask(B, T, kind)


def _check(logprobs, rollout, mask, settings, dtype=None):
    dtype = dtype or logprobs.dtype
    weights, keep, metrics = rollout_correction(logprobs, rollout, mask, **settings)
    want_w, want_keep, want = ref.rollout_correction(logprobs, rollout, mask, **settings)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if settings.get("level") is None:
        assert weights is None and want_w is None
    else:
        assert weights.dtype == dtype and weights.shape == logprobs.shape
        close(weights, want_w, WEIGHT_TOL[dtype], "is_weights")
    assert keep.dtype == mask.dtype and torch.equal(keep, want_keep)
    assert list(metrics) == list(want), "same metrics, in the same order"
    for key, value in want.items():
        assert metrics[key].dim() == 0 and metrics[key].dtype == compute, key
        close(metrics[key], value, METRIC_TOL[dtype], key)
    return weights, keep, metrics


@pytest.mark.parametrize("settings", SETTINGS, ids=range(len(SETTINGS)))
@pytest.mark.parametrize("kind", ["random", "holes", "left", "empty_rows"])
def test_matches_float64_oracle(settings, kind):
    logprobs, rollout, mask = _inputs(7, 29, kind=kind)
    if kind == "left":
        mask = mask.float()  # keep_mask comes back as a float 0/1 mask
    weights, keep, metrics = _check(logprobs, rollout, mask, settings)
    if settings.get("rejection"):
        assert 0 < float(metrics["rollout_rs_masked_fraction"]) < 1  # the test rejects something
    if isinstance(settings.get("threshold"), tuple) and settings["level"] == "token":
        assert 0 < float(metrics["rollout_is_oob_ratio"]) < 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("settings", [SETTINGS[1], SETTINGS[2], SETTINGS[3]], ids=range(3))
def test_dtypes(dtype, settings):
    """fp64 computes in fp64 (to 1e-10); bf16 computes in fp32 from the bf16 values, weights rounded to
    bf16.  A ratio bound of 1/3 (not representable in fp32) is honoured in fp64."""
    logprobs, rollout, mask = _inputs(5, 23, dtype=dtype, kind="empty_rows")
    if dtype == torch.float64:
        settings = dict(settings, threshold=(1.0 / 3.0, 7.0 / 3.0))
    _check(logprobs, rollout, mask, settings)


def test_one_token_batch_and_single_row():
    for B, T in ((1, 1), (1, 9)):
        logprobs, rollout, mask = _inputs(B, T, kind="right")
        for settings in SETTINGS:
            _check(logprobs, rollout, mask, settings)


def test_extreme_log_ratios_and_garbage_at_masked_positions():
    """|ℓ| up to 60 (past the ±20 clamp, sequence sums far past it); NaN / ±inf at masked positions
    change nothing."""
    logprobs, rollout, mask = _inputs(6, 31, kind="holes", spread=25.0)
    logprobs = rollout + (logprobs - rollout).clamp(-60, 60)
    for settings in SETTINGS:
        clean = _check(logprobs, rollout, mask, settings)
        padded = torch.where(mask, logprobs, float("nan")), torch.where(mask, rollout, float("inf"))
        garbage = rollout_correction(*padded, mask, **settings)
        if clean[0] is not None:
            assert torch.equal(garbage[0], clean[0])
        assert torch.equal(garbage[1], clean[1])
        for key, value in clean[2].items():
            torch.testing.assert_close(garbage[2][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_all_masked_batch_is_defined():
    """verl raises; here: weights 0, keep_mask = mask (all 0), every metric 0."""
    logprobs, rollout, mask = _inputs(4, 11, kind="all_masked")
    for settings in SETTINGS:
        weights, keep, metrics = _check(logprobs, rollout, mask, settings)
        assert weights is None or bool((weights == 0).all())
        assert not bool(keep.any()) and all(float(v) == 0.0 for v in metrics.values())


def test_icepop_zeroing_every_weight_is_defined():
    """Every ratio outside [100, 200]: every weight 0, effective sample size 0 (verl divides by zero), no
    batch normalisation (factor 1)."""
    logprobs, rollout, mask = _inputs(4, 13, kind="random")
    for level in ("token", "sequence"):
        settings = dict(level=level, threshold=(100.0, 200.0), batch_normalize=True)
        weights, _, metrics = _check(logprobs, rollout, mask, settings)
        assert bool((weights == 0).all())
        assert float(metrics["rollout_is_eff_sample_size"]) == 0.0
        assert float(metrics["rollout_is_batch_norm_factor"]) == 1.0


def test_worked_example_and_batch_normalisation():
    logprobs = torch.tensor([[0.1, 3.0, 5.0]], dtype=torch.float64)
    rollout = torch.zeros_like(logprobs)
    mask = torch.tensor([[True, True, False]])
    weights, _, _ = rollout_correction(logprobs, rollout, mask, level="token", threshold=2.0)
    assert torch.equal(weights, torch.tensor([[torch.e ** 0.1, 2.0, 0.0]], dtype=torch.float64))
    normalized, _, metrics = rollout_correction(logprobs, rollout, mask, threshold=2.0, batch_normalize=True)
    close(normalized[mask].mean(), torch.tensor(1.0, dtype=torch.float64), 1e-12, "normalised mean")
    factor = torch.tensor((torch.e ** 0.1 + 2.0) / 2, dtype=torch.float64)
    close(metrics["rollout_is_batch_norm_factor"], factor, 1e-12, "factor")


def test_nan_at_a_valid_position_propagates():
    logprobs, rollout, mask = _inputs(3, 9, kind="random")
    mask[0, 2] = True
    logprobs[0, 2] = float("nan")
    for threshold in (2.0, (0.5, 2.0)):
        weights, _, metrics = rollout_correction(logprobs, rollout, mask, threshold=threshold)
        assert bool(weights[0, 2].isnan()) and bool(metrics["rollout_is_mean"].isnan())
    _, keep, _ = rollout_correction(logprobs, rollout, mask, rejection={"token_k2": 1.0})
    assert not bool(keep[0, 2])  # a NaN divergence fails every bound: rejected (verl's comparisons)


def test_inputs_unchanged_no_host_sync_and_no_gradient(monkeypatch):
    logprobs, rollout, mask = _inputs(5, 17, kind="empty_rows")
    logprobs.requires_grad_()
    copies = [t.detach().clone() for t in (logprobs, rollout, mask)]

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    outputs = [rollout_correction(logprobs, rollout, mask, **settings) for settings in SETTINGS]
    monkeypatch.undo()
    for before, after in zip(copies, (logprobs, rollout, mask)):
        assert torch.equal(before, after.detach())
    for weights, keep, metrics in outputs:
        assert keep is not mask and keep.data_ptr() != mask.data_ptr()
        assert weights is None or not weights.requires_grad
        assert not any(v.requires_grad for v in metrics.values())


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True): no data-dependent Python branch anywhere (the no-sync claim)."""
    logprobs, rollout, mask = _inputs(4, 9, kind="empty_rows")
    settings = SETTINGS[2]
    compiled = torch.compile(lambda *args: rollout_correction(*args, **settings), fullgraph=True)
    weights, keep, metrics = compiled(logprobs, rollout, mask)
    want_w, want_keep, want = rollout_correction(logprobs, rollout, mask, **settings)
    close(weights, want_w, 1e-6, "weights")
    assert torch.equal(keep, want_keep) and list(metrics) == list(want)
    for key, value in want.items():
        close(metrics[key], value, 1e-6, key)


def test_errors():
    logprobs, rollout, mask = _inputs(3, 5)
    cases = [
        (dict(level="tokens"), ValueError, "level must be one of"),
        (dict(threshold=0.0), ValueError, "threshold must be > 0"),
        (dict(threshold=-2.0), ValueError, "threshold must be > 0"),
        (dict(threshold=(2.0, 1.0)), ValueError, "lower <= upper"),
        (dict(threshold=(0.0, 1.0)), ValueError, "threshold lower bound must be > 0"),
        (dict(threshold=(1.0, 2.0, 3.0)), ValueError, "pair"),
        (dict(threshold="2.0"), TypeError, "threshold must be a Python float"),
        (dict(threshold=float("inf")), ValueError, "finite"),
        (dict(rejection={"token_k4": 1.0}), ValueError, "seq_max_k3"),
        (dict(rejection={"seq_max_k1": 1.0}), ValueError, "must be one of"),
        (dict(rejection={"token_k2": (0.1, 1.0)}), ValueError, "single upper bound"),
        (dict(rejection={"token_k3": -1.0}), ValueError, r"rejection\['token_k3'\] must be > 0"),
        (dict(rejection={"seq_sum_k1": (3.0, 2.0)}), ValueError, "lower <= upper"),
        (dict(rejection={}), TypeError, "non-empty mapping"),
        (dict(rejection="token_k1"), TypeError, "mapping"),
        (dict(batch_normalize=1), TypeError, "batch_normalize must be a bool"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            rollout_correction(logprobs, rollout, mask, **kwargs)
    with pytest.raises(ValueError, match="rollout_logprobs must have shape"):
        rollout_correction(logprobs, rollout[:, :4], mask)
    with pytest.raises(TypeError, match="rollout_logprobs must have the dtype"):
        rollout_correction(logprobs, rollout.double(), mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        rollout_correction(logprobs, rollout, mask[:2])
    assert len(REJECTION_OPTIONS) == 11


# ---------------------------------------------------------------------------------------------------
# bypass_mode policy loss
# ---------------------------------------------------------------------------------------------------
BYPASS = [
    dict(loss_type="ppo_clip"),
    dict(loss_type="ppo_clip", level="token", threshold=2.0, rejection={"token_k1": (0.6, 1.8)},
         clip_high=0.28, loss_agg="seq-mean-token-mean"),
    dict(loss_type="reinforce", level="token", threshold=1.5),
    dict(loss_type="reinforce", level="sequence", threshold=(0.2, 5.0), batch_normalize=True,
         rejection={"seq_mean_k3": 0.15}, loss_agg="token-sum"),
    dict(loss_type="reinforce"),
]


def _loss_and_grad(fn, logprobs, *args, **kwargs):
    x = logprobs.detach().clone().requires_grad_()
    loss, metrics = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics


@pytest.mark.parametrize("settings", BYPASS, ids=range(len(BYPASS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bypass_mode_matches_oracle(settings, dtype):
    logprobs, rollout, mask = _inputs(6, 21, dtype=dtype, kind="empty_rows")
    advantages = (torch.randn(6, 21) * 2).to(dtype)
    args = (logprobs, rollout, advantages, mask)
    loss, grad, metrics = _loss_and_grad(pl.bypass_mode_policy_loss, *args, **settings)
    upcast = [t.double() for t in args[:3]]
    want, want_grad, want_metrics = _loss_and_grad(ref.bypass_mode_policy_loss, *upcast, mask, **settings)
    tol = METRIC_TOL[dtype]
    close(loss, want, tol, "loss")
    close(grad, want_grad, tol, "gradient")
    assert set(want_metrics) <= set(metrics)
    for key, value in want_metrics.items():
        assert metrics[key].dtype == torch.float32, key
        close(metrics[key], value, 2e-5, key)


def test_bypass_mode_all_masked_and_errors():
    logprobs, rollout, mask = _inputs(3, 8, kind="all_masked")
    advantages = torch.randn(3, 8)
    for settings in BYPASS:
        args = (logprobs, rollout, advantages, mask)
        loss, grad, metrics = _loss_and_grad(pl.bypass_mode_policy_loss, *args, **settings)
        assert float(loss.detach()) == 0.0 and bool((grad == 0).all())
        assert all(float(v) == 0 for v in metrics.values())
    with pytest.raises(ValueError, match="loss_type must be one of"):
        pl.bypass_mode_policy_loss(logprobs, rollout, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="is_weights"):
        pl.bypass_mode_policy_loss(logprobs, rollout, advantages, mask, is_weights=torch.ones(3, 8))


# ---------------------------------------------------------------------------------------------------
# is_correction (OpenRLHF's PolicyLoss correction) and off_policy_mask (TRL) against the oracle
# ---------------------------------------------------------------------------------------------------
IS_CORRECTION_SETTINGS = [
    dict(level="token", mode="mask", gating="ratio", threshold=(0.8, 1.25)),
    dict(level="token", mode="clip", gating="ratio", threshold=(0.8, 1.25)),
    dict(level="sequence", mode="mask", gating="ratio", threshold=(0.9, 1.1)),
    dict(level="token", mode="mask", gating="binary_kl", threshold=0.01),
    dict(level="sequence", mode="mask", gating="tv", threshold=(0.0, 0.03)),
]


@pytest.mark.parametrize("settings", IS_CORRECTION_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("kind", ["random", "empty_rows", "all_masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_is_correction_matches_oracle(settings, kind, dtype):
    from rlhf_kernels.ops.rollout_correction import is_correction

    old = (-torch.rand(5, 17) * 2).to(dtype)
    rollout = old + torch.randn(5, 17, dtype=dtype) * 0.3
    mask = make_mask(5, 17, kind)
    got, metrics = is_correction(old, rollout, mask, **settings)
    want, want_metrics = ref.is_correction(old, rollout, mask, **settings)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.dtype == dtype
    close(got, want, tol, "coefficient")
    for key in want_metrics:
        close(metrics[key], want_metrics[key], tol, key)


@pytest.mark.parametrize("kind", ["random", "holes", "all_masked"])
def test_off_policy_mask_matches_oracle(kind):
    from rlhf_kernels.ops.rollout_correction import off_policy_mask

    lp = -torch.rand(6, 9) * 2
    sampling = lp + torch.tensor([0.0, 0.4, 0.05, 0.9, 0.2, 0.6])[:, None] + torch.randn(6, 9) * 0.05
    sampling[1, 0] = float("nan")
    mask = make_mask(6, 9, kind, dtype=torch.int64)
    lp_garbage = lp.masked_fill(mask == 0, float("inf"))  # masked positions never matter
    for advantages in (torch.tensor([1.0, -1.0, -1.0, -1.0, 0.0, -0.5]), torch.randn(6, 9)):
        got = off_policy_mask(advantages, lp_garbage, sampling, mask, 0.3)
        assert got.dtype == torch.int64
        assert torch.equal(got, ref.off_policy_mask(advantages, lp, sampling, mask, 0.3))
    with pytest.raises(ValueError, match=r"advantages must have shape \(6,\), \(6, 1\)"):
        off_policy_mask(torch.zeros(5), lp, sampling, mask, 0.3)
