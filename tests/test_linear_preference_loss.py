"""linear_preference_loss (fused lm_head + per-sequence log-probs + a preference loss) against the float64
oracle (logits materialised in float64, reference/preference_losses on the sums), on both row-math paths."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE, assert_close, assert_grad_close, backend_device
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_kernels import _dispatch
from rlhf_kernels.ops import _fused_linear
from rlhf_kernels.ops.linear_preference_loss import UNFUSABLE_DPO_LOSS_TYPES, linear_preference_loss
from rlhf_kernels.ops.preference_losses import DPO_LOSS_TYPES
from rlhf_kernels.reference.linear_preference_loss import linear_preference_loss as oracle
from rlhf_kernels.reference.linear_preference_loss import sequence_logps

B, T, H, V = 3, 5, 8, 23  # pairs, padded length, hidden size, vocabulary
FWD_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}
FUSABLE_DPO = [t for t in DPO_LOSS_TYPES if t not in UNFUSABLE_DPO_LOSS_TYPES]
# Each loss type's own hyperparameters, chosen so that every term is exercised (smoothing where read).
DPO_KWARGS = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1)}


def _batch(n_seq=2 * B, seq_len=T, dtype=torch.float32, *, bias=True, seed=0, empty_row=True):
    """Sequences with a 2-token prompt (ignored), one empty response (row 1), and a reference head."""
    torch.manual_seed(seed)
    hidden = torch.randn(n_seq, seq_len, H).to(dtype)
    weight = (torch.randn(V, H) * 0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    labels = torch.randint(0, V, (n_seq, seq_len))
    labels[:, :2] = -100
    if n_seq > 1 and empty_row:
        labels[1] = -100
    ref_hidden, ref_weight = torch.randn(n_seq, seq_len, 6).to(dtype), (torch.randn(V, 6) * 0.5).to(dtype)
    return hidden, weight, b, labels, ref_hidden, ref_weight


def _kto_kwargs(n_seq):
    torch.manual_seed(1)
    desirable = torch.arange(n_seq) % 3 != 1
    return dict(desirable=desirable, kl_logps=torch.randn(4) - 6, ref_kl_logps=torch.randn(4) - 6)


@pytest.fixture
def chunk_rows(monkeypatch):
    """Sets the driver's chunk budget to ``rows`` fp32 rows of V entries (None: the default)."""

    def set_rows(rows):
        if rows is not None:
            monkeypatch.setattr(_fused_linear, "CHUNK_BYTES_CPU", rows * V * 4)
            monkeypatch.setattr(_fused_linear, "CHUNK_BYTES_CUDA", rows * V * 4)

    return set_rows


def _check(hidden, weight, bias, labels, *, loss, ref=None, tol_dtype=None, device="cpu",
           accumulation="float32", **kwargs):
    """Loss, metrics and the hidden / weight / bias gradients against the float64 oracle; ours runs on
    ``device`` (CPU tensors go in; the Triton path runs on CUDA when there is one) with d_weight
    accumulated as ``accumulation`` says."""
    dtype = tol_dtype or hidden.dtype
    on = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    leaves = [None if t is None else t.to(device, copy=True).requires_grad_() for t in (hidden, weight, bias)]
    refs = {}
    if ref is not None:
        refs = dict(ref_logps=sequence_logps(*ref, labels)[0].to(hidden.dtype))
    got, metrics = linear_preference_loss(leaves[0], leaves[1], on(labels), loss=loss, bias=leaves[2],
                                          grad_weight_accumulation=accumulation,
                                          **{k: on(v) for k, v in {**refs, **kwargs}.items()})
    got.backward()
    oracle_leaves = [None if t is None else t.double().requires_grad_() for t in (hidden, weight, bias)]
    oracle_refs = {k: v.double() for k, v in refs.items()}
    want, want_metrics = oracle(oracle_leaves[0], oracle_leaves[1], labels, loss=loss, bias=oracle_leaves[2],
                                **oracle_refs, **kwargs)
    want.backward()
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, want, FWD_TOL[dtype], f"{loss} loss")
    for key, value in want_metrics.items():
        assert_close(metrics[key], value, max(FWD_TOL[dtype], 1e-6), f"{loss} metric {key}")
    for name, leaf, oracle_leaf in zip(("hidden", "weight", "bias"), leaves, oracle_leaves):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_grad_close(leaf.grad, oracle_leaf.grad, GRAD_TOL[dtype], f"{loss} d {name}")
    return got, metrics


@pytest.mark.parametrize("loss_type", FUSABLE_DPO)
def test_every_fusable_dpo_loss_type(loss_type, chunk_rows):
    chunk_rows(1)
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch()
    with _dispatch.use_backend("torch"):
        _check(hidden, weight, bias, labels, loss="dpo", ref=(ref_hidden, ref_weight), loss_type=loss_type,
               beta=0.3, **DPO_KWARGS.get(loss_type, {}))


@pytest.mark.parametrize(
    "loss,kwargs",
    [
        ("dpo", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])),  # TRL's MPO
        ("dpo", dict(loss_type="ipo", convention="openrlhf")),
        ("simpo", dict(beta=2.0, gamma=0.5, sft_weight=0.3)),
        ("cpo", dict(loss_type="sigmoid", cpo_alpha=1.0, label_smoothing=0.1)),
        ("cpo", dict(loss_type="hinge")),
        ("cpo", dict(loss_type="ipo", cpo_alpha=0.0)),
        ("cpo", dict(loss_type="simpo", alpha=0.5)),
        ("orpo", dict(beta=0.2)),
        ("kto", dict(loss_type="kto", desirable_weight=1.5)),
        ("kto", dict(loss_type="apo_zero_unpaired")),
    ],
)
def test_losses(loss, kwargs, chunk_rows):
    chunk_rows(T)
    # ORPO's log odds of an empty response (c / n = 0, p = 1) are infinite: no empty row there.
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch(empty_row=loss != "orpo")
    ref = None if loss in ("simpo", "cpo", "orpo") else (ref_hidden, ref_weight)
    if loss == "kto":
        extra = _kto_kwargs(2 * B)
        if kwargs["loss_type"] != "kto":
            extra = dict(desirable=extra["desirable"])
        kwargs = {**kwargs, **extra}
    with _dispatch.use_backend("torch"):
        _check(hidden, weight, bias, labels, loss=loss, ref=ref, **kwargs)


@pytest.mark.parametrize("loss", ["dpo", "simpo", "kto"])
def test_triton_path(loss, chunk_rows):
    """The row math through the Triton kernels (interpreter): chunks of one pair / one response, -inf bias."""
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch(n_seq=4, seq_len=4)
    bias[[3, 7]] = float("-inf")
    kwargs = dict(loss_type="sigmoid") if loss == "dpo" else _kto_kwargs(4) if loss == "kto" else {}
    ref = None if loss == "simpo" else (ref_hidden, ref_weight)
    chunk_rows(1)
    with _dispatch.use_backend("triton"):
        _check(hidden, weight, bias, labels, loss=loss, ref=ref, device=TRITON_DEVICE, **kwargs)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fp64_to_1e12(backend_name, chunk_rows):
    chunk_rows(4)
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch(n_seq=4, seq_len=4, dtype=torch.float64)
    with _dispatch.use_backend(backend_name):
        _check(hidden, weight, bias, labels, loss="dpo", ref=(ref_hidden, ref_weight), beta=0.7,
               loss_type=["sigmoid", "sft"], device=backend_device(backend_name))


@pytest.mark.parametrize("accumulation", _fused_linear.GRAD_WEIGHT_ACCUMULATIONS)
def test_bf16(accumulation, chunk_rows):
    """One pair per chunk (3 chunks): d_weight within 1e-2 of the oracle's scale either way."""
    chunk_rows(2 * T)
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch(dtype=torch.bfloat16)
    with _dispatch.use_backend("torch"):
        _check(hidden, weight, bias, labels, loss="dpo", ref=(ref_hidden, ref_weight), loss_type="sigmoid",
               accumulation=accumulation)


def test_second_backward_through_a_retained_graph_raises():
    """The driver's backward scales the saved gradients in place: a second backward is refused."""
    hidden, weight, bias, labels, *_ = _batch()
    leaf = weight.clone().requires_grad_()
    with _dispatch.use_backend("torch"):
        loss, _ = linear_preference_loss(hidden, leaf, labels, loss="simpo")
    torch.autograd.grad(loss, leaf, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, leaf)


@pytest.mark.parametrize("rows", [None, 1, 6, 18, 100])  # 18: chunks of 2, 2, 1 pairs
def test_chunk_boundaries(rows, chunk_rows):
    """One pair per chunk, two with an uneven last chunk, everything in one: same values and gradients."""
    chunk_rows(rows)
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch(n_seq=10, seq_len=3)
    with _dispatch.use_backend("torch"):
        _check(hidden, weight, bias, labels, loss="dpo", ref=(ref_hidden, ref_weight), loss_type="sigmoid")


def test_reference_computed_in_the_call():
    """ref_hidden / ref_weight give the same as the given sums, and receive no gradient."""
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch()
    ref_hidden, ref_weight = ref_hidden.requires_grad_(), ref_weight.requires_grad_()
    given = sequence_logps(ref_hidden.detach(), ref_weight.detach(), labels)[0].float()
    with _dispatch.use_backend("torch"):
        computed, metrics = linear_preference_loss(hidden, weight.requires_grad_(), labels, loss="dpo",
                                                   ref_hidden=ref_hidden, ref_weight=ref_weight)
        computed.backward()
        expected, _ = linear_preference_loss(hidden, weight.detach(), labels, loss="dpo", ref_logps=given)
    assert_close(computed, expected, 1e-6, "loss")
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert metrics["logps/sequences"].shape == (2 * B,)


def test_empty_responses_and_no_grad():
    """Row 1 (a chosen response) is all prompt: c = 0, n = 0, and its tokens get exactly zero gradient."""
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch()
    leaf = hidden.clone().requires_grad_()
    with _dispatch.use_backend("torch"):
        loss, metrics = linear_preference_loss(leaf, weight, labels, loss="simpo")
        loss.backward()
        with torch.no_grad():
            value, _ = linear_preference_loss(hidden, weight, labels, loss="simpo")
    assert metrics["logps/sequences"][1] == 0
    assert torch.count_nonzero(leaf.grad[1]) == 0 and torch.count_nonzero(leaf.grad[:, :2]) == 0
    assert torch.equal(value, loss.detach())


def test_empty_batch():
    """S = 0 sequences (no pair): loss 0 like the oracle's, zero gradients (was a range() step of 0)."""
    hidden = torch.randn(0, T, H).requires_grad_()
    weight = torch.randn(V, H).requires_grad_()
    labels = torch.zeros(0, T, dtype=torch.int64)
    with _dispatch.use_backend("torch"):
        loss, _ = linear_preference_loss(hidden, weight, labels, loss="cpo")
    loss.backward()
    want, _ = oracle(hidden.detach().double(), weight.detach().double(), labels, loss="cpo")
    assert_close(loss, want, 1e-6, "loss")
    assert hidden.grad.shape == hidden.shape and torch.count_nonzero(weight.grad) == 0


def test_nan_in_nan_out_and_inputs_unmodified():
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch()
    before = [t.clone() for t in (hidden, weight, bias, labels)]
    with _dispatch.use_backend("torch"):
        linear_preference_loss(hidden, weight.requires_grad_(), labels, loss="orpo", bias=bias)
    for t, b in zip((hidden, weight.detach(), bias, labels), before):
        assert torch.equal(t, b)
    hidden[0, 3, 0] = float("nan")
    with _dispatch.use_backend("torch"):
        loss, _ = linear_preference_loss(hidden, weight, labels, loss="orpo", bias=bias)
    assert torch.isnan(loss)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_three_matmuls_per_chunk(chunk_rows):
    chunk_rows(2 * T)  # one pair per chunk: 3 chunks
    hidden, weight, bias, labels, *_ = _batch()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with _dispatch.use_backend("torch"), _CountMatmuls() as counter:
        loss, _ = linear_preference_loss(*leaves, labels, loss="simpo")
        loss.backward()
    assert counter.count == 3 * B


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(loss="ppo"), ValueError, r"loss must be one of"),
        (dict(loss_type="sigmoidd"), ValueError, r"loss_type must be one of"),
        (dict(beta=0.0), ValueError, r"beta"),
        (dict(beta=-1.0), ValueError, r"beta"),
        (dict(loss_type="aot"), ValueError, r"sorts the log-ratios over the whole batch"),
        (dict(loss_type=["sigmoid", "aot_unpaired"]), ValueError, r"aot_unpaired"),
        (dict(ref_logps=None), ValueError, r"needs the reference model"),
        (dict(loss="simpo"), ValueError, r"reference-free"),
        (dict(ref_hidden=torch.randn(6, 5, 8)), ValueError, r"either ref_logps or ref_hidden"),
        (dict(chosen_lengths=torch.ones(3)), ValueError, r"computes chosen_lengths itself"),
        (dict(desirable=torch.ones(6, dtype=torch.bool)), ValueError, r"desirable is read by loss 'kto'"),
        (dict(loss="kto", kl_logps=torch.zeros(2), ref_kl_logps=torch.zeros(2)), ValueError,
         r"needs desirable"),
        (dict(labels=torch.zeros(5, 5, dtype=torch.int64)), ValueError, r"hidden"),
        (dict(ref_logps=torch.zeros(5)), ValueError, r"ref_logps"),
        (dict(weight=torch.randn(23, 8).double()), TypeError, r"weight must have the dtype of hidden"),
        (dict(hidden=torch.randn(30, 8)), ValueError, r"hidden must be 3-D \[S, T, H\]"),
        (dict(grad_weight_accumulation="bf16"), ValueError, r"grad_weight_accumulation must be one of"),
        (dict(ref_logps=None, ref_hidden=torch.randn(6, 5, 4), ref_weight=torch.randn(23, 3)), ValueError,
         r"ref_weight must be \[V, H\].*ref_hidden \(6, 5, 4\) and ref_weight \(23, 3\)"),
    ],
)
def test_bad_input(change, error, match):
    hidden, weight, bias, labels, *_ = _batch()
    kwargs = dict(hidden=hidden, weight=weight, labels=labels, loss="dpo", ref_logps=torch.zeros(2 * B))
    kwargs.update(change)
    with pytest.raises(error, match=match):
        linear_preference_loss(**kwargs)


def test_mismatched_counts():
    hidden, weight, bias, labels, *_ = _batch(n_seq=5)
    with pytest.raises(ValueError, match=r"chosen and rejected rows in equal numbers"):
        linear_preference_loss(hidden, weight, labels, loss="simpo")
