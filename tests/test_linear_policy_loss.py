"""linear_policy_loss (ops/linear_policy_loss.py) and its driver (ops/_fused_linear.py) against the float64
oracle (rlhf_kernels.reference.linear_policy_loss, autograd for the gradients), on the PyTorch path and
the Triton kernels (interpreted on CPU), plus a second check against the unfused public policy losses."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_grad_close
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_kernels import _dispatch
from rlhf_kernels._validation import compute_dtype
from rlhf_kernels.ops import _fused_linear as driver
from rlhf_kernels.ops.aggregation import LOSS_AGG_MODES
from rlhf_kernels.ops.linear_policy_loss import LINEAR_POLICY_LOSSES, linear_policy_loss
from rlhf_kernels.ops.logprobs import logprobs_bwd_inplace, logprobs_from_logits, logprobs_fwd
from rlhf_kernels.ops.policy_losses import POLICY_LOSSES
from rlhf_kernels.reference import linear_policy_loss as ref

FWD_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}
# Parameters that make every branch of each variant happen on small random batches.
PARAMS = {
    "vanilla": {"clip_high": 0.28},
    "dro": {"beta": 0.3},
    "cispo": {"clip_high": 0.28},
    "dppo_tv": {"clip_low": 0.05, "clip_high": 0.08, "truncation": 1.3},
    "dppo_kl": {"clip_low": 0.01, "clip_high": 0.02, "truncation": 1.3},
}
_MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_}


def _inputs(batch=3, seq=7, hidden_size=8, vocab=17, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    g = {
        "hidden": torch.randn(batch, seq, hidden_size),
        "weight": torch.randn(vocab, hidden_size) * 0.5,
        "bias": torch.randn(vocab),
    }
    g = {k: v.to(dtype).to(device) for k, v in g.items()}
    lp_like = {
        "old_logprobs": -torch.rand(batch, seq) * 3,
        "advantages": torch.randn(batch, seq),
        "ref_logprobs": -torch.rand(batch, seq) * 3,
        "is_weights": torch.rand(batch, seq) * 2,
    }
    g.update({k: v.to(device) for k, v in lp_like.items()})
    g["labels"] = torch.randint(0, vocab, (batch, seq), device=device)
    g["mask"] = torch.rand(batch, seq, device=device) < 0.75
    if batch > 1:
        g["mask"][1] = False  # an empty row
    return g


def _run(fn, inp, dtype=None, **kwargs):
    """(loss, metrics, (d_hidden, d_weight, d_bias)) of ``fn``; the head tensors in ``dtype``."""
    head = [inp[k].detach().clone() for k in ("hidden", "weight", "bias")]
    if dtype is not None:
        head = [t.to(dtype) for t in head]
    head = [t.requires_grad_() for t in head]
    out = fn(
        head[0], head[1], inp["labels"], inp["old_logprobs"], inp["advantages"], inp["mask"], bias=head[2],
        **kwargs,
    )
    loss, metrics = out[0], out[1]
    grads = torch.autograd.grad(loss, head)
    return loss, metrics, grads, out


def _check(inp, tol_dtype=torch.float32, **kwargs):
    loss, metrics, grads, out = _run(linear_policy_loss, inp, **kwargs)
    kwargs.pop("chunk_rows", None)
    kwargs.pop("grad_weight_accumulation", None)
    want, want_metrics, want_grads, want_out = _run(ref.linear_policy_loss, inp, torch.float64, **kwargs)
    dtype = inp["hidden"].dtype
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, want, FWD_TOL[tol_dtype], "loss")
    for name, got, expected in zip(("d_hidden", "d_weight", "d_bias"), grads, want_grads):
        assert got.dtype == dtype and got.shape == expected.shape, name
        assert_grad_close(got, expected, GRAD_TOL[tol_dtype], name)
    assert set(metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert metrics[key].dim() == 0 and metrics[key].dtype == torch.float32, key
        assert_close(metrics[key], value, max(FWD_TOL[tol_dtype], 2e-6), key)
    return out, want_out, grads


# ---------------------------------------------------------------------------------------------------
# The loss against the oracle.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LINEAR_POLICY_LOSSES)
def test_every_variant_matches_oracle(backend, device, loss):
    """Entropy bonus, KL to the reference, temperature, rollout weights, chunks of 8 tokens (chunks cut
    sequences of 7), one aggregation mode per variant."""
    mode = LOSS_AGG_MODES[LINEAR_POLICY_LOSSES.index(loss) % len(LOSS_AGG_MODES)]
    _check(
        _inputs(device=device), loss=loss, loss_params=PARAMS.get(loss), entropy_coef=0.03,
        ref_logprobs=_inputs(device=device)["ref_logprobs"], kl_coef=0.2, temperature=0.7, loss_agg=mode,
        is_weights=_inputs(device=device)["is_weights"], chunk_rows=8,
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_every_aggregation_mode_and_normalizer(mode):
    inp = _inputs(batch=4, seq=5)
    estimator = "k3+" if LOSS_AGG_MODES.index(mode) % 2 else "low_var_kl"  # straight-through half the time
    kwargs = dict(entropy_coef=-0.1, ref_logprobs=inp["ref_logprobs"], kl_coef=0.5, kl_estimator=estimator,
                  loss_agg=mode, chunk_rows=3)
    _check(inp, **kwargs)
    _check(inp, normalizer=7.0, **kwargs)
    _check(inp, normalizer=torch.tensor(3.0), **kwargs)


@pytest.mark.parametrize("chunk_rows", [1, 5, 21, 1000])
def test_chunk_boundaries_give_the_same_result(chunk_rows):
    inp = _inputs()
    out, want, _ = _check(inp, entropy_coef=0.1, chunk_rows=chunk_rows, return_logprobs=True)
    assert_close(out[2], want[2], 2e-6, "per-token log-probs")


def test_float64_with_fp64_scalars_on_both_paths():
    """fp64 in, fp64 math: 1e-12 against the oracle, scalars like 0.7 included (the fp64 scalar rule)."""
    inp = _inputs(dtype=torch.float64)
    for backend in ("torch", "triton"):
        with _dispatch.use_backend(backend):
            _check(inp, tol_dtype=torch.float64, loss_params={"clip_low": 0.7, "dual_clip": 1.7},
                   entropy_coef=0.7, ref_logprobs=inp["ref_logprobs"], kl_coef=0.7, temperature=0.7,
                   chunk_rows=5)


@pytest.mark.parametrize("accumulation", driver.GRAD_WEIGHT_ACCUMULATIONS)
def test_bfloat16_inputs(accumulation):
    """bf16 head, 4 chunks: d_weight within 3e-2 of the oracle's scale with either accumulation."""
    inp = _inputs(hidden_size=32, vocab=64, dtype=torch.bfloat16)
    _check(inp, tol_dtype=torch.bfloat16, entropy_coef=0.1, ref_logprobs=inp["ref_logprobs"], kl_coef=0.1,
           chunk_rows=6, grad_weight_accumulation=accumulation)


@pytest.mark.parametrize("vocab", [1, 17])
def test_odd_vocabularies(vocab):
    inp = _inputs(vocab=vocab)
    inp["labels"] = inp["labels"].int()  # int32 labels too
    _check(inp, entropy_coef=0.2, chunk_rows=4)


def test_masked_vocabulary_entries(backend, device):
    """-inf bias entries have probability 0 and a zero bias gradient; labels avoid them."""
    inp = _inputs(device=device)
    inp["bias"][[0, 5, 16]] = float("-inf")
    inp["labels"] = torch.where(torch.isin(inp["labels"], torch.tensor([0, 5, 16], device=device)), 3,
                                inp["labels"])
    _, _, grads = _check(inp, entropy_coef=0.1, chunk_rows=11)
    assert bool((grads[2][[0, 5, 16]] == 0).all())


def test_ignored_labels_and_masked_positions_count_as_masked():
    """A label equal to ignore_index inside the mask is a masked position; masked positions contribute
    nothing and send nothing back (their hidden rows get an exactly zero gradient)."""
    inp = _inputs()
    inp["labels"][0, :3] = -100
    _, _, grads, out = _run(linear_policy_loss, inp, entropy_coef=0.1, return_logprobs=True)
    masked = (inp["labels"] == -100) | ~inp["mask"]
    assert bool((grads[0][masked] == 0).all()) and bool((out[2][masked] == 0).all())
    _check(inp, entropy_coef=0.1)
    plain = dict(inp, mask=inp["mask"] & (inp["labels"] != -100), labels=inp["labels"].clamp(min=0))
    loss_a = _run(linear_policy_loss, inp)[0]
    loss_b = _run(linear_policy_loss, plain)[0]
    assert_close(loss_a, loss_b, 1e-6, "ignore_index equals a zero mask")


def test_nan_in_gives_nan_out():
    inp = _inputs()
    inp["hidden"][0, 0, 0] = float("nan")
    inp["mask"][0, 0] = True
    loss, _, grads, _ = _run(linear_policy_loss, inp, chunk_rows=4)
    assert bool(loss.isnan()) and bool(grads[1].isnan().any())


def test_empty_and_fully_masked_batches():
    for inp in (_inputs(batch=0), dict(_inputs(), mask=torch.zeros(3, 7, dtype=torch.bool))):
        loss, metrics, grads, _ = _run(linear_policy_loss, inp, entropy_coef=0.1,
                                       ref_logprobs=inp["ref_logprobs"], kl_coef=0.1)
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
        assert all(bool((g == 0).all()) for g in grads)


def test_matches_unfused_public_policy_losses():
    """Second check: eager logits → logprobs_from_logits → the public policy loss (and its metrics)."""
    inp = _inputs()
    for loss in LINEAR_POLICY_LOSSES:
        kwargs = dict(PARAMS.get(loss, {}), is_weights=inp["is_weights"], loss_agg="seq-mean-token-mean")
        got, metrics, grads, _ = _run(linear_policy_loss, inp, loss=loss, loss_params=PARAMS.get(loss),
                                      is_weights=inp["is_weights"], loss_agg="seq-mean-token-mean")
        head = [inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        logits = head[0] @ head[1].T + head[2]
        lp = logprobs_from_logits(logits, inp["labels"])
        want, want_metrics = POLICY_LOSSES[loss](lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                                                 **kwargs)
        want_grads = torch.autograd.grad(want, head)
        assert_close(got, want, 1e-5, loss)
        for g, w in zip(grads, want_grads):
            assert_grad_close(g, w, 1e-5, loss)
        for key in set(metrics) & set(want_metrics):
            assert_close(metrics[key], want_metrics[key], 1e-6, f"{loss} {key}")


def test_frozen_head_and_upstream_gradient():
    """Only the tensors that require a gradient get one (the frozen weight skips its product); an upstream
    gradient of 2.5 scales every saved gradient."""
    inp = _inputs()
    hidden = inp["hidden"].clone().requires_grad_()
    loss, _ = linear_policy_loss(hidden, inp["weight"], inp["labels"], inp["old_logprobs"],
                                 inp["advantages"], inp["mask"], bias=inp["bias"])
    (2.5 * loss).backward()
    _, _, want, _ = _run(ref.linear_policy_loss, inp, torch.float64)
    assert_grad_close(hidden.grad, 2.5 * want[0], 2e-5, "d_hidden scaled")


def test_second_backward_through_a_retained_graph_raises():
    """The saved gradients are scaled in place (no second [V, H] buffer): a second backward through the
    same graph is refused by autograd's version check instead of returning scaled-twice gradients."""
    inp = _inputs()
    hidden = inp["hidden"].clone().requires_grad_()
    loss, _ = linear_policy_loss(hidden, inp["weight"], inp["labels"], inp["old_logprobs"],
                                 inp["advantages"], inp["mask"])
    torch.autograd.grad(loss, hidden, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, hidden)


def test_traces_with_torch_compile_fullgraph():
    """One graph (aot_eager: the tracing and the autograd wiring, without Inductor's C++ compile, which
    takes over a minute here); same loss and gradients as eager."""
    inp = _inputs(batch=2, seq=6)
    _dispatch.set_index_checks(False)  # the label range check reads the labels on the host
    try:
        def fn(hidden, weight):
            loss, metrics = linear_policy_loss(hidden, weight, inp["labels"], inp["old_logprobs"],
                                               inp["advantages"], inp["mask"], entropy_coef=0.1, chunk_rows=5)
            return loss, metrics["clipfrac"]

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        results = []
        for f in (fn, compiled):
            head = [inp["hidden"].clone().requires_grad_(), inp["weight"].clone().requires_grad_()]
            loss, clipfrac = f(*head)
            results.append((loss, clipfrac, *torch.autograd.grad(loss, head)))
    finally:
        _dispatch.set_index_checks(True)
    for got, want in zip(*results):
        assert_close(got, want, 1e-6, "compiled")


def test_inputs_not_modified():
    inp = _inputs()
    before = {k: v.clone() for k, v in inp.items()}
    _run(linear_policy_loss, inp, entropy_coef=0.1, ref_logprobs=inp["ref_logprobs"], kl_coef=0.1,
         is_weights=inp["is_weights"], chunk_rows=4)
    for key, value in before.items():
        assert torch.equal(value, inp[key]), key


def test_bad_inputs_raise_named_errors():
    inp = _inputs()
    args = [inp[k] for k in ("hidden", "weight", "labels", "old_logprobs", "advantages", "mask")]

    def call(*a, **kw):
        return linear_policy_loss(*a, **kw)

    with pytest.raises(ValueError, match="clip_cov.*selects tokens"):
        call(*args, loss="clip_cov")
    with pytest.raises(ValueError, match="loss must be one of"):
        call(*args, loss="nope")
    with pytest.raises(ValueError, match="unknown \\['beta'\\]"):
        call(*args, loss_params={"beta": 0.1})
    with pytest.raises(ValueError, match="beta'\\] is required"):
        call(*args, loss="dro")
    with pytest.raises(ValueError, match="clip_low"):
        call(*args, loss_params={"clip_low": -0.1})
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        call(*args, kl_coef=0.1)
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        call(args[0], args[1].double(), *args[2:])
    with pytest.raises(ValueError, match="hidden"):
        call(args[0][0], *args[1:])
    with pytest.raises(ValueError, match="labels"):
        call(args[0], args[1], args[2][:, :3], *args[3:])
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        call(args[0], args[1][:, :3], *args[2:])
    with pytest.raises(ValueError, match="temperature"):
        call(*args, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        call(*args, chunk_rows=0)
    with pytest.raises(ValueError, match="loss_agg"):
        call(*args, loss_agg="mean")
    with pytest.raises(ValueError, match="labels"):
        call(args[0], args[1], torch.full_like(args[2], 17), *args[3:])
    with pytest.raises(ValueError, match="grad_weight_accumulation must be one of"):
        call(*args, grad_weight_accumulation="bfloat16")


# ---------------------------------------------------------------------------------------------------
# The driver on its own: a cross-entropy chunk function through the registered log-prob ops.
# ---------------------------------------------------------------------------------------------------
def _cross_entropy_fn(labels):
    """−Σ log p[label] of each chunk: its logits gradient written over the logits by the op."""

    def chunk_fn(logits, rows):
        y = labels[rows]
        lp, entropy, lse = logprobs_fwd(logits, y, 1.0, -100, False, False)
        logprobs_bwd_inplace(torch.full_like(lp, -1.0), lse.new_empty(0), logits, y, lse, entropy, 1.0, -100)
        return (lp,)

    return chunk_fn


def _driver_case(dtype=torch.float32, n=23, h=8, v=19):
    hidden = torch.randn(n, h, dtype=dtype).T.contiguous().T  # column-major: any strides
    weight = (torch.randn(v, h) * 0.5).to(dtype)
    bias = torch.randn(v).to(dtype)
    labels = torch.randint(0, v, (n,))
    return hidden, weight, bias, labels


def _driver_oracle(hidden, weight, bias, labels, rows, inv_temperature):
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    logp = torch.log_softmax((h @ w.T + b) * inv_temperature, dim=-1)
    loss = -logp[rows].gather(1, labels[rows].unsqueeze(1)).sum()
    return loss, torch.autograd.grad(loss, (h, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_driver_gradients(backend, device, dtype):
    hidden, weight, bias, labels = (t.to(device) for t in _driver_case(dtype))
    # Index chunks (one not sorted), slices, and rows 20..22 in no chunk (zero d_hidden there).
    chunks = [torch.tensor([3, 0, 7]), slice(8, 20), torch.tensor([1, 2, 4, 5, 6])]
    chunks = [c.to(device) if isinstance(c, torch.Tensor) else c for c in chunks]
    outputs, d_hidden, d_weight, d_bias = driver.chunked_linear_loss(
        hidden, weight, bias, chunks, _cross_entropy_fn(labels), inv_temperature=1 / 0.7
    )
    rows = torch.arange(20)
    loss, want = _driver_oracle(hidden.cpu(), weight.cpu(), bias.cpu(), labels.cpu(), rows, 1 / 0.7)
    tol = GRAD_TOL[dtype]
    assert_close(-sum(o[0].double().sum() for o in outputs), loss, FWD_TOL[dtype], "loss")
    for got, expected, name in zip((d_hidden, d_weight, d_bias), want, ("d_hidden", "d_weight", "d_bias")):
        assert got.dtype == dtype, name
        assert_grad_close(got, expected, tol, name)
    assert bool((d_hidden[20:] == 0).all())


def test_driver_forward_only_and_frozen_head():
    hidden, weight, bias, labels = _driver_case()
    chunks = driver.row_chunks(23, 5)
    fwd = driver.chunked_linear_loss(hidden, weight, None, chunks, _cross_entropy_fn(labels), need_grad=False)
    assert fwd[1:] == (None, None, None) and len(fwd[0]) == 5
    _, d_hidden, d_weight, d_bias = driver.chunked_linear_loss(
        hidden, weight, bias, chunks, _cross_entropy_fn(labels), grad_weight=False
    )
    _, want = _driver_oracle(hidden, weight, bias, labels, torch.arange(23), 1.0)
    assert d_weight is None
    assert_grad_close(d_hidden, want[0], 2e-5, "d_hidden")
    assert_grad_close(d_bias, want[2], 2e-5, "d_bias")


class _OpLog(TorchDispatchMode):
    """Counts matrix products and records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.matmuls = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func.overloadpacket in _MATMULS
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "flags,per_chunk", [({}, 3), ({"grad_weight": False}, 2), ({"grad_hidden": False}, 2),
                        ({"need_grad": False}, 1)]
)
def test_driver_runs_three_products_per_chunk_and_no_n_by_v_buffer(flags, per_chunk):
    n, h, v = 64, 8, 200
    hidden, weight, bias, labels = _driver_case(n=n, h=h, v=v)
    rows = driver.plan_chunk_rows(n, v, device=torch.device("cpu"), budget_bytes=10 * v * 4)
    assert rows == 10
    with _OpLog() as log:
        chunks = driver.row_chunks(n, rows)
        driver.chunked_linear_loss(hidden, weight, bias, chunks, _cross_entropy_fn(labels), **flags)
    assert log.matmuls == per_chunk * 7  # 64 rows in chunks of 10: 7 chunks
    assert log.largest <= max(rows * v, v * h, n * h) < n * v


def test_linear_policy_loss_runs_three_products_per_chunk():
    inp = _inputs(batch=2, seq=10)
    with _OpLog() as log:
        _run(linear_policy_loss, inp, entropy_coef=0.1, ref_logprobs=inp["ref_logprobs"], kl_coef=0.1,
             chunk_rows=6)
    assert log.matmuls == 3 * 4  # 20 tokens in chunks of 6
    head = [inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    with torch.no_grad(), _OpLog() as log:  # the forward alone: one product per chunk
        loss, _ = linear_policy_loss(head[0], head[1], inp["labels"], inp["old_logprobs"], inp["advantages"],
                                     inp["mask"], bias=head[2], chunk_rows=6)
    assert log.matmuls == 4 and not loss.requires_grad


def test_plan_chunk_rows():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert driver.plan_chunk_rows(1000, 151936, device=cuda) == 384  # 431 fit: 3 chunks, 334 rounded up
    assert driver.plan_chunk_rows(16384, 151936, device=cuda) == 384  # 421 even, 448 too many: down
    assert driver.plan_chunk_rows(1000, 100, device=cpu, budget_bytes=400 * 400) == 334
    assert driver.plan_chunk_rows(10, 10**9, device=cpu) == 1
    assert driver.plan_chunk_rows(0, 17, device=cpu) == 1
    assert driver.plan_chunk_rows(5, 17, device=cpu) == 5
    assert driver.plan_chunk_rows(1000, 100, device=cpu, budget_bytes=100 * 8 * 64, dtype=torch.float64) == 63
    assert driver.row_chunks(0, 4) == []
    assert driver.row_chunks(9, 4) == [slice(0, 4), slice(4, 8), slice(8, 9)]


def test_driver_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="hidden must be \\[N, H\\]"):
        driver.chunked_linear_loss(torch.randn(4, 3), torch.randn(5, 2), None, [], lambda z, r: ())
    with pytest.raises(ValueError, match="grad_weight_accumulation must be one of"):
        driver.chunked_linear_loss(torch.randn(4, 2), torch.randn(5, 2), None, [], lambda z, r: (),
                                   grad_weight_accumulation="bf16")


# ---------------------------------------------------------------------------------------------------
# d_weight accumulation: "float32" (fp32 accumulator, rounded once) vs "weight_dtype" (per chunk).
# ---------------------------------------------------------------------------------------------------
def _driver_d_weight(dtype, accumulation, n=512, h=16, v=96, rows=8):
    """d_weight of the cross-entropy chunk function over n rows in chunks of ``rows`` (64 chunks), and
    the float64 oracle's."""
    torch.manual_seed(3)
    hidden, weight, bias, labels = _driver_case(dtype, n=n, h=h, v=v)
    _, _, d_weight, _ = driver.chunked_linear_loss(
        hidden, weight, bias, driver.row_chunks(n, rows), _cross_entropy_fn(labels), inv_temperature=1 / 0.7,
        grad_hidden=False, grad_weight_accumulation=accumulation,
    )
    _, want = _driver_oracle(hidden, weight, bias, labels, torch.arange(n), 1 / 0.7)
    return d_weight, want[1]


def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulation_modes_agree_exactly_for_fp32_and_fp64_weights(dtype):
    """An fp32 (fp64) weight accumulates in its own dtype either way: the same bits."""
    a, want = _driver_d_weight(dtype, "float32")
    b, _ = _driver_d_weight(dtype, "weight_dtype")
    assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    assert_grad_close(a, want, GRAD_TOL[dtype], "d_weight")


def test_bf16_d_weight_error_of_each_accumulation():
    """bf16, 64 chunks, torch path: "float32" rounds once (Frobenius error 1.1x the oracle's own bf16
    rounding, < 2.5e-3); "weight_dtype" rounds G to bf16 and d_weight once per chunk (< 2e-2, and worse
    than "float32"); both within assert_grad_close's 3e-2 of the largest entry."""
    _, want = _driver_d_weight(torch.bfloat16, "float32")
    floor = _relative_error(want.to(torch.bfloat16), want)
    errors = {}
    for accumulation in driver.GRAD_WEIGHT_ACCUMULATIONS:
        got, _ = _driver_d_weight(torch.bfloat16, accumulation)
        assert got.dtype == torch.bfloat16
        assert_grad_close(got, want, GRAD_TOL[torch.bfloat16], accumulation)
        errors[accumulation] = _relative_error(got, want)
    assert errors["float32"] < min(2.5e-3, 1.5 * floor), errors
    assert errors["float32"] < errors["weight_dtype"] < 2e-2, errors


class _Float32HeadBuffers(TorchDispatchMode):
    """The distinct storages of fp32 tensors of a given [V, H] shape that ops produce."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages = tuple(shape), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == self.shape:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_weight_dtype_accumulation_has_no_fp32_accumulator():
    """bf16 on CPU: "float32" makes two fp32 [V, H] buffers (the weight's fp32 copy for the products, and
    the accumulator), "weight_dtype" only the copy (on CUDA neither exists: bf16 tensor-core products)."""
    hidden, weight, bias, labels = _driver_case(torch.bfloat16, n=40, h=8, v=30)
    counts = {}
    for accumulation in driver.GRAD_WEIGHT_ACCUMULATIONS:
        with _Float32HeadBuffers(weight.shape) as log:
            driver.chunked_linear_loss(hidden, weight, bias, driver.row_chunks(40, 7),
                                       _cross_entropy_fn(labels), grad_weight_accumulation=accumulation)
        counts[accumulation] = len(log.storages)
    assert counts == {"float32": 2, "weight_dtype": 1}


# ---------------------------------------------------------------------------------------------------
# The driver's shared pieces: logits_product, product_operands, check_head.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_logits_product(dtype, with_bias):
    """fp32 logits (fp64 for fp64) of the inputs as given, bias and 1/τ folded in, never rounded to bf16;
    product_operands copies a bf16 head to fp32 once (CPU) and passes fp32/fp64 heads through."""
    hidden, weight, bias, _ = _driver_case(dtype, n=9, h=12, v=21)
    bias = bias if with_bias else None
    want = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    w, b = driver.product_operands(hidden, weight, bias)
    assert (w is weight) == (dtype != torch.bfloat16) and w.dtype == compute_dtype(hidden)
    for head in ((weight, bias), (w, b)):
        got = driver.logits_product(hidden, *head, 1 / 0.7)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(got, want / 0.7, 1e-12 if dtype == torch.float64 else 1e-5, "logits")


def test_check_head_names_the_argument():
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    driver.check_head(hidden, weight, torch.randn(5), prefix="ref_", ndim=3)
    with pytest.raises(ValueError, match="ref_hidden must be 3-D \\[S, T, H\\]"):
        driver.check_head(hidden[0], weight, None, prefix="ref_", ndim=3, layout="[S, T, H]")
    with pytest.raises(ValueError, match="teacher_weight must be \\[V, H\\].*got teacher_hidden "
                                         "\\(2, 3, 4\\) and teacher_weight \\(0, 4\\)"):
        driver.check_head(hidden, weight[:0], None, prefix="teacher_")
    with pytest.raises(ValueError, match="same H"):
        driver.check_head(hidden, weight[:, :3], None)
    with pytest.raises(TypeError, match="bias must have the dtype of hidden"):
        driver.check_head(hidden, weight, torch.randn(5).double())
    with pytest.raises(ValueError, match="bias must have shape \\(weight.shape\\[0\\],\\)"):
        driver.check_head(hidden, weight, torch.randn(4))
    with pytest.raises(TypeError, match="hidden must be a floating tensor"):
        driver.check_head(hidden.int(), weight, None)
