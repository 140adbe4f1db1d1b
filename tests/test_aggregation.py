"""agg_loss: every mode against the float64 oracle and verl 0.9.1's meaning, the normalizer under
gradient accumulation / data parallelism, empty batches, and errors."""

from __future__ import annotations

import pytest
import torch

from bench.baselines.losses import verl_agg_loss
from rlhf_kernels.ops import aggregation
from rlhf_kernels.ops.aggregation import LOSS_AGG_MODES, agg_loss
from rlhf_kernels.reference import aggregation as ref

SHAPE = (6, 13)


def _mask(shape, empty_rows=(3,)):
    mask = torch.rand(shape) < 0.6
    mask[:, 0] = True  # every row but the chosen empty ones has a token
    for row in empty_rows:
        mask[row] = False
    return mask


def test_modes_are_verls():
    assert LOSS_AGG_MODES == (
        "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    )
    assert aggregation.TOKEN_SUM == "token-sum"


def test_worked_example():
    """The module docstring's example: B = 3, T = 4, row sums (2, 0, 6), tokens per row (2, 0, 3)."""
    per_token = torch.tensor(
        [[1.5, 0.5, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0], [1.0, 2.0, 3.0, float("nan")]], dtype=torch.float64
    )
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    want = {
        "token-mean": 8 / 5,
        "token-sum": 8.0,
        "seq-mean-token-sum": 8 / 2,  # the empty row is not counted
        "seq-mean-token-mean": (2 / 2 + 6 / 3) / 2,
        "seq-mean-token-sum-norm": 8 / (2 * 4),
    }
    for mode, value in want.items():
        assert agg_loss(per_token, mask, mode).item() == pytest.approx(value, rel=1e-15), mode
        assert ref.agg_loss(per_token, mask, mode).item() == pytest.approx(value, rel=1e-15), mode


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["bool", "weights"])
def test_matches_oracle(mode, mask_kind):
    per_token = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    mask = _mask(SHAPE)
    if mask_kind == "weights":  # non-negative weights, some rows summing to less than 1
        mask = mask.double() * torch.rand(SHAPE, dtype=torch.float64) * 0.3
    for normalizer in (None, 4, 0.37, torch.tensor(2.5)):
        got = agg_loss(per_token, mask, mode, normalizer)
        want = ref.agg_loss(per_token, mask, mode, normalizer)
        assert got.dtype == torch.float64 and got.dim() == 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: agg_loss(x, mask, mode), (per_token,))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_masked_positions_ignored(mode):
    per_token = torch.randn(SHAPE, dtype=torch.float64)
    mask = _mask(SHAPE)
    poisoned = torch.where(mask, per_token, float("nan"))
    poisoned[0, ~mask[0]] = float("inf")
    poisoned = poisoned.requires_grad_()
    loss = agg_loss(poisoned, mask, mode)
    loss.backward()
    torch.testing.assert_close(loss, agg_loss(per_token, mask, mode), rtol=1e-15, atol=0)
    assert bool((poisoned.grad[~mask] == 0).all()) and bool((poisoned.grad[mask] != 0).all())


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_matches_verl_default_arguments(mode):
    """No global arguments: the same number as verl 0.9.1's agg_loss (bench/baselines), empty rows in."""
    per_token = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    mask = _mask(SHAPE, empty_rows=(1, 4))
    got = agg_loss(per_token, mask, mode)
    x = per_token.detach().clone().requires_grad_()
    want = verl_agg_loss(x, mask.double(), mode)
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12  # verl's row means divide by n_b + 1e-8
    torch.testing.assert_close(got, want, rtol=tol, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(per_token.grad, x.grad, rtol=tol, atol=1e-12)


def _verl_normalizer(mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor, seq_len):
    """What docs/aggregation.md says to pass for verl's global-batch arguments."""
    if mode == "token-mean":
        return batch_num_tokens / dp_size
    if mode == "token-sum":
        return 1.0 / dp_size
    if mode == "seq-mean-token-sum-norm":
        return global_batch_size * (seq_len if loss_scale_factor is None else loss_scale_factor) / dp_size
    return global_batch_size / dp_size


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_normalizer_reproduces_verl_global_arguments(mode):
    per_token = torch.randn(SHAPE, dtype=torch.float64)
    mask = _mask(SHAPE)
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12  # verl's row means divide by n_b + 1e-8
    for dp_size, tokens, rows, scale in ((4, 123, 17, 64), (2, 77.0, 9.0, None), (1, 30, 5, 7)):
        want = verl_agg_loss(per_token, mask.double(), mode, dp_size, tokens, rows, scale)
        normalizer = _verl_normalizer(mode, dp_size, tokens, rows, scale, SHAPE[1])
        torch.testing.assert_close(agg_loss(per_token, mask, mode, normalizer), want, rtol=tol, atol=1e-12)
        as_tensor = agg_loss(per_token, mask, mode, torch.tensor(float(normalizer)))
        torch.testing.assert_close(as_tensor, want, rtol=tol, atol=1e-12)


def _global_denominator(mode, mask):
    """The whole batch's denominator, computed once and given to every micro-batch."""
    tokens = mask.double().sum(-1)
    rows = float((tokens > 0).sum())
    return {
        "token-mean": float(tokens.sum()),
        "token-sum": None,
        "seq-mean-token-sum": rows,
        "seq-mean-token-mean": rows,
        "seq-mean-token-sum-norm": rows * mask.shape[1],
    }[mode]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_with_the_global_denominator_add_up(mode):
    per_token = torch.randn(7, 11, dtype=torch.float64)
    mask = _mask((7, 11), empty_rows=(2, 5))
    full_x = per_token.clone().requires_grad_()
    full = agg_loss(full_x, mask, mode)
    full.backward()
    normalizer = _global_denominator(mode, mask)
    split_x = per_token.clone().requires_grad_()
    total = sum(agg_loss(split_x[rows], mask[rows], mode, normalizer) for rows in (slice(0, 3), slice(3, 7)))
    total.backward()
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_x.grad, full_x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_empty_batch_gives_zero_and_zero_gradient(mode):
    per_token = torch.randn(3, 5).to(torch.bfloat16).requires_grad_()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    loss = agg_loss(per_token, mask, mode)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert torch.equal(per_token.grad, torch.zeros_like(per_token))
    # A global denominator of 0 (an all-masked global batch): 0/0 = NaN as in verl, the gradient stays 0.
    x = torch.randn(3, 5, requires_grad=True)
    loss = agg_loss(x, mask, mode, torch.tensor(0.0))
    loss.backward()
    assert torch.isnan(loss) and torch.equal(x.grad, torch.zeros_like(x))


def test_bad_arguments():
    x = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    # Issue 19: the error names the argument agg_loss actually has.
    with pytest.raises(ValueError, match=r"^mode must be one of .*got 'mean'"):
        agg_loss(x, mask, mode="mean")
    with pytest.raises(ValueError, match=r"^mode must be one of"):
        agg_loss(x, mask, "seq-mean")
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        agg_loss(x, mask, "token-mean", 0)
    with pytest.raises(ValueError, match="normalizer"):
        agg_loss(x, mask, "token-mean", torch.ones(2))
    with pytest.raises(TypeError, match="normalizer"):
        agg_loss(x, mask, "token-mean", "10")
    with pytest.raises(ValueError, match="mask must have shape"):
        agg_loss(x, mask[:, :3], "token-mean")
    with pytest.raises(ValueError, match="per_token must be 2-D"):
        agg_loss(x.view(-1), mask.view(-1), "token-mean")
    with pytest.raises(TypeError, match="per_token must be a floating tensor"):
        agg_loss(x.long(), mask)
