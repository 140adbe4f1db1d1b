"""linear_distill_loss (fused student/teacher lm_heads + full-vocabulary divergence) against the float64
oracle and TRL 1.16's real ``GKDTrainer.generalized_jsd_loss``, on both row-math paths (Triton in the
interpreter, PyTorch)."""

from __future__ import annotations

import datetime
import importlib
import warnings

import pytest
import torch
from conftest import (
    HAS_CUDA,
    TRITON_DEVICE,
    assert_close,
    assert_compiles_for_sm90,
    assert_grad_close,
    backend_device,
    run_gloo_workers,
)

from rlhf_kernels import _dispatch
from rlhf_kernels.ops import _fused_linear
from rlhf_kernels.ops import linear_distill_loss as ops
from rlhf_kernels.ops.cpu import linear_distill_loss as cpu_ops
from rlhf_kernels.ops.linear_distill_loss import linear_distill_loss
from rlhf_kernels.reference.linear_distill_loss import linear_distill_loss as oracle

DIVERGENCE_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _inputs(lead=(3, 5), h_student=8, h_teacher=6, vocab=37, dtype=torch.float32, *, bias=True,
            ignore_every=3):
    torch.manual_seed(0)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    inputs = dict(
        student_hidden=cast(torch.randn(*lead, h_student)),
        student_weight=cast(torch.randn(vocab, h_student) * 0.6),
        teacher_hidden=cast(torch.randn(*lead, h_teacher)),
        teacher_weight=cast(torch.randn(vocab, h_teacher) * 0.6),
        student_bias=cast(torch.randn(vocab)) if bias else None,
        teacher_bias=cast(torch.randn(vocab)) if bias else None,
    )
    labels = torch.randint(0, vocab, lead)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return inputs, labels


def _on(device, inputs, labels):
    """The inputs and labels on ``device`` (the Triton path runs on CUDA when there is one)."""
    moved = {k: None if v is None else v.to(device) for k, v in inputs.items()}
    return moved, None if labels is None else labels.to(device)


def _check(inputs, labels, *, tol_dtype=None, **kwargs):
    """Value and the student's hidden / weight / bias gradients against the float64 oracle."""
    dtype = tol_dtype or inputs["student_hidden"].dtype
    leaves = {k: (v.clone().requires_grad_() if v is not None and k.startswith("student") else v)
              for k, v in inputs.items()}
    loss = linear_distill_loss(labels=labels, **leaves, **kwargs)
    loss.backward()
    ref_leaves = {k: None if v is None else v.detach().cpu().double() for k, v in inputs.items()}
    for name in ("student_hidden", "student_weight", "student_bias"):
        if ref_leaves[name] is not None:
            ref_leaves[name].requires_grad_()
    kwargs.pop("grad_weight_accumulation", None)
    want = oracle(labels=None if labels is None else labels.cpu(), **ref_leaves, **kwargs)
    want.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, want, FWD_TOL[dtype], "loss")
    for name in ("student_hidden", "student_weight", "student_bias"):
        if leaves[name] is not None:
            assert leaves[name].grad.dtype == leaves[name].dtype
            assert_grad_close(leaves[name].grad, ref_leaves[name].grad, GRAD_TOL[dtype], f"d {name}")
    for name in ("teacher_hidden", "teacher_weight"):
        assert ref_leaves[name].grad is None
    return loss


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_oracle_torch(divergence, beta, temperature):
    inputs, labels = _inputs()
    with _dispatch.use_backend("torch"):
        _check(inputs, labels, divergence=divergence, beta=beta, temperature=temperature)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_matches_oracle_triton(divergence, beta):
    inputs, labels = _on(TRITON_DEVICE, *_inputs(lead=(2, 3), vocab=23))
    with _dispatch.use_backend("triton"):
        _check(inputs, labels, divergence=divergence, beta=beta, temperature=0.8)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fp64_to_1e12(backend_name):
    inputs, labels = _on(backend_device(backend_name), *_inputs(lead=(2, 3), vocab=19, dtype=torch.float64))
    with _dispatch.use_backend(backend_name):
        _check(inputs, labels, divergence="jsd", beta=0.7, temperature=0.7)


@pytest.mark.parametrize("accumulation", _fused_linear.GRAD_WEIGHT_ACCUMULATIONS)
def test_bf16(accumulation, monkeypatch):
    """Chunks of 2 rows (6 chunks): the student's d_weight within 1e-2 of the oracle's scale either way."""
    inputs, labels = _inputs(lead=(4, 3), vocab=29, dtype=torch.bfloat16)
    monkeypatch.setattr(_fused_linear, "CHUNK_BYTES_CPU", 2 * 2 * 29 * 4)  # two buffers of 2 rows
    with _dispatch.use_backend("torch"):
        _check(inputs, labels, divergence="jsd", beta=0.5, grad_weight_accumulation=accumulation)


def test_second_backward_through_a_retained_graph_raises():
    """The driver's backward scales the saved gradients in place: a second backward is refused."""
    inputs, labels = _inputs(lead=(2, 3))
    leaf = inputs["student_weight"].clone().requires_grad_()
    with _dispatch.use_backend("torch"):
        loss = linear_distill_loss(**{**inputs, "student_weight": leaf}, labels=labels)
    torch.autograd.grad(loss, leaf, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, leaf)


def test_tiny_chunks(monkeypatch):
    """Chunks of one row (the budget below one row): same loss and gradients."""
    inputs, labels = _inputs(lead=(2, 7))
    monkeypatch.setattr(_fused_linear, "CHUNK_BYTES_CPU", 1)
    with _dispatch.use_backend("torch"):
        _check(inputs, labels, divergence="reverse_kl")


def test_without_labels_and_odd_vocab():
    inputs, _ = _inputs(lead=(5,), vocab=1)
    with _dispatch.use_backend("torch"):
        loss = _check(inputs, None, divergence="forward_kl")
    assert loss.item() == 0.0  # one entry: both distributions are 1
    inputs, _ = _inputs(lead=(1, 17), vocab=17)
    with _dispatch.use_backend("torch"):
        _check(inputs, None, divergence="jsd", beta=0.5)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_masked_vocabulary_entries(backend_name):
    """-inf bias entries: shared by both models (ignored), or masked by the student only (forward KL and
    JSD stay finite)."""
    inputs, labels = _on(backend_device(backend_name), *_inputs(lead=(2, 3), vocab=13))
    inputs["student_bias"][[0, 5]] = float("-inf")
    inputs["teacher_bias"][5] = float("-inf")
    with _dispatch.use_backend(backend_name):
        _check(inputs, labels, divergence="jsd", beta=0.5)
        inputs["teacher_bias"][0] = float("-inf")
        _check(inputs, labels, divergence="reverse_kl")


def test_ignored_rows_get_zero_gradient_even_with_nan():
    inputs, labels = _inputs(lead=(2, 4))
    labels[0, 1] = -100
    inputs["student_hidden"][0, 1] = float("nan")
    inputs["teacher_hidden"][0, 1] = float("nan")
    hidden = inputs["student_hidden"].clone().requires_grad_()
    with _dispatch.use_backend("torch"):
        loss = linear_distill_loss(**{**inputs, "student_hidden": hidden}, labels=labels, divergence="jsd")
        loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(hidden.grad[0, 1], torch.zeros_like(hidden.grad[0, 1]))
    labels[0, 1] = 5  # counted: NaN in, NaN out
    with _dispatch.use_backend("torch"):
        assert torch.isnan(linear_distill_loss(**inputs, labels=labels, divergence="jsd"))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_nan_in_nan_out_one_entry_vocabulary(divergence):
    """V = 1 and a NaN student state: ours and the oracle both NaN (the oracle's 0·log 0 guard once read
    the NaN as a masked entry and gave 0)."""
    inputs, _ = _inputs(lead=(3,), vocab=1, bias=False)
    inputs["student_hidden"][1, 0] = float("nan")
    with _dispatch.use_backend("torch"):
        got = linear_distill_loss(**inputs, divergence=divergence)
    want = oracle(**{k: None if v is None else v.double() for k, v in inputs.items()}, divergence=divergence)
    assert torch.isnan(got) and torch.isnan(want)


def test_empty_and_all_ignored():
    inputs, labels = _inputs(lead=(0, 3))
    hidden = inputs["student_hidden"].clone().requires_grad_()
    loss = linear_distill_loss(**{**inputs, "student_hidden": hidden}, labels=labels)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == hidden.shape
    inputs, labels = _inputs(lead=(2, 3))
    labels.fill_(-100)
    weight = inputs["student_weight"].clone().requires_grad_()
    loss = linear_distill_loss(**{**inputs, "student_weight": weight}, labels=labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(weight.grad) == 0


def test_inputs_unmodified_and_no_grad_path():
    inputs, labels = _inputs()
    before = {k: v.clone() for k, v in inputs.items()}
    with _dispatch.use_backend("torch"):
        with torch.no_grad():
            value = linear_distill_loss(**inputs, labels=labels, divergence="reverse_kl")
        leaf = inputs["student_hidden"].clone().requires_grad_()
        grad_value = linear_distill_loss(**{**inputs, "student_hidden": leaf}, labels=labels,
                                         divergence="reverse_kl")
    assert torch.equal(value, grad_value.detach())
    for k, v in inputs.items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------------
# The row op directly: every output written, both paths agree, ignored rows zero.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.25)])
def test_row_kernel_against_torch_path(divergence, beta):
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    student[2, 7] = teacher[2, 7] = float("-inf")
    labels = torch.tensor([1, -100, 3, 4, -100, 0])
    scale = torch.tensor([0.25])
    want_grad = student.clone()
    want = cpu_ops.linear_distill_rows_torch(want_grad, teacher, labels, scale, divergence, beta, -100, True)
    on = lambda t: t.to(TRITON_DEVICE)  # noqa: E731
    loss = torch.full((6,), float("nan"), device=TRITON_DEVICE)
    got_grad = on(student)
    ops._launch_rows(loss, got_grad, on(teacher), on(labels), on(scale), divergence, beta, -100, True)
    assert_close(loss, want, 1e-6, "per-row divergence")
    assert_close(got_grad, want_grad, 1e-6, "gradient")
    assert torch.equal(got_grad[[1, 4]].cpu(), torch.zeros(2, 50))
    assert (loss[[1, 4]] == 0).all()


_AOT_SCRIPT = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rlhf_kernels.ops.linear_distill_loss as ops

fn = ops._linear_distill_rows_kernel
for dtype, acc, divergences in (("fp32", tl.float32, range(3)), ("fp64", tl.float64, (2,))):
    types = [f"*{dtype}"] * 2 + ["*i64", "*fp32", f"*{dtype}"] + ["i64"] * 4 + ["i32"]
    types += ["fp32"] * 9 + ["i32"] + ["constexpr"] * 4
    for divergence in divergences:
        constexprs = {"BLOCK_V": 2048, "DIVERGENCE": divergence, "NEED_GRAD": True, "ACC": acc}
        source = ASTSource(fn=fn, signature=dict(zip(fn.arg_names, types)), constexprs=constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernel runs natively in the other tests")
def test_row_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter checks the math, not the lowering: compile the row kernel (each divergence, fp32, and
    the fp64 path) to PTX for sm_90 with Triton's bundled ptxas, in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_AOT_SCRIPT)


# ---------------------------------------------------------------------------------------------------
# TRL 1.16's real function on materialised logits.
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_generalized_jsd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's experimental-API notice
        module = importlib.import_module("trl.experimental.gkd.gkd_trainer")
    return module.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_trl(trl_generalized_jsd, beta, with_labels):
    """TRL's divergence at β, with its "batchmean" reduction: the mean over counted tokens with labels;
    without labels over the first dimension, i.e. the tokens of 2-D [N, V] logits."""
    inputs, labels = _inputs(lead=(2, 5), vocab=31, bias=False)
    lead = (2, 5) if with_labels else (10,)
    inputs = {k: (v.reshape(*lead, v.shape[-1]) if "hidden" in k else v) for k, v in inputs.items()}
    labels = labels if with_labels else None
    temperature = 0.9
    s_hidden = inputs["student_hidden"].double().requires_grad_()
    s_logits = s_hidden @ inputs["student_weight"].double().T
    t_logits = inputs["teacher_hidden"].double() @ inputs["teacher_weight"].double().T
    want = trl_generalized_jsd(s_logits, t_logits, labels=labels, beta=beta, temperature=temperature)
    want.backward()
    ours_hidden = inputs["student_hidden"].double().requires_grad_()
    with _dispatch.use_backend("torch"):
        got = linear_distill_loss(
            ours_hidden, inputs["student_weight"].double(), inputs["teacher_hidden"].double(),
            inputs["teacher_weight"].double(), labels, divergence="jsd", beta=beta, temperature=temperature,
        )
    got.backward()
    assert_close(got, want, 1e-12, "loss vs TRL")
    assert_grad_close(ours_hidden.grad, s_hidden.grad, 1e-12, "d student_hidden vs TRL")


# ---------------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(divergence="kl"), ValueError, r"divergence must be one of"),
        (dict(beta=1.5), ValueError, r"beta"),
        (dict(beta=-0.1), ValueError, r"beta"),
        (dict(temperature=0.0), ValueError, r"temperature"),
        (dict(teacher_weight=torch.randn(36, 6), teacher_bias=None), ValueError,
         r"teacher_weight must have the student's vocabulary"),
        (dict(teacher_hidden=torch.randn(3, 4, 6)), ValueError,
         r"teacher_hidden must have student_hidden's leading"),
        (dict(student_weight=torch.randn(37, 8).double()), TypeError, r"student_weight must have the dtype"),
        (dict(student_hidden=torch.randn(3, 5, 7)), ValueError, r"student_hidden must have shape"),
        (dict(labels=torch.zeros(3, 4, dtype=torch.int64)), ValueError, r"labels"),
        (dict(labels=torch.zeros(3, 5)), TypeError, r"labels"),
        (dict(student_bias=torch.randn(36)), ValueError, r"student_bias"),
        (dict(process_group="tp"), TypeError, r"process_group must be a torch.distributed.ProcessGroup"),
        (dict(grad_weight_accumulation="fp32"), ValueError, r"grad_weight_accumulation must be one of"),
        (dict(teacher_bias=torch.randn(37).double()), TypeError, r"teacher_bias must have the dtype of "
                                                                  r"teacher_hidden"),
    ],
)
def test_bad_input(change, error, match):
    inputs, labels = _inputs()
    kwargs = {**inputs, "labels": labels, **change}
    with pytest.raises(error, match=match):
        linear_distill_loss(**kwargs)


# ---------------------------------------------------------------------------------------------------
# opcheck samples of the new registered ops (for tests/test_registration.py's SAMPLE_BUILDERS).
# ---------------------------------------------------------------------------------------------------
def registration_samples(device: str) -> dict[str, list[tuple]]:
    student, teacher = torch.randn(5, 11, device=device), torch.randn(5, 11, device=device)
    labels = torch.tensor([1, -100, 3, 4, 0], device=device)
    scale = torch.tensor([0.5], device=device)
    args = [
        (student.clone(), teacher, labels, scale, "forward_kl", 0.5, -100, True),
        (student.clone(), teacher, labels, scale, "jsd", 0.3, -100, True),
        (student.clone(), teacher.double(), labels, scale, "reverse_kl", 0.5, -1, False),
    ]
    return {"linear_distill_rows": args, "linear_distill_rows_torch": args}


@pytest.mark.parametrize("name", ["linear_distill_rows", "linear_distill_rows_torch"])
def test_opcheck(name):
    op = getattr(torch.ops.rlhf_kernels, name)
    for args in registration_samples("cpu")[name]:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------------
# Vocabulary (tensor) parallelism: 2 CPU processes on gloo against the unsharded oracle.
# ---------------------------------------------------------------------------------------------------
def _tp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        inputs, labels = _inputs(lead=(2, 5), vocab=2 * 19)  # the same full tensors on every rank
        for name in ("student_bias", "teacher_bias"):
            inputs[name][[0, 30]] = float("-inf")  # one masked entry in each rank's slice
        rows = slice(rank * 19, (rank + 1) * 19)
        for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
            mine = {k: (v[rows] if "weight" in k or "bias" in k else v).clone() for k, v in inputs.items()}
            for name in ("student_hidden", "student_weight", "student_bias"):
                mine[name].requires_grad_()
            loss = linear_distill_loss(**mine, labels=labels, divergence=divergence, beta=beta,
                                       temperature=0.8, process_group=dist.group.WORLD)
            loss.backward()
            full = {k: v.double().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
            want = oracle(**full, labels=labels, divergence=divergence, beta=beta, temperature=0.8)
            want.backward()
            what = f"rank {rank} {divergence}"
            assert_close(loss, want, 1e-5, f"{what} loss")
            assert_grad_close(mine["student_hidden"].grad, full["student_hidden"].grad, 1e-5,
                              f"{what} d_hidden")
            assert_grad_close(mine["student_weight"].grad, full["student_weight"].grad[rows], 1e-5,
                              f"{what} d_weight")
            assert_grad_close(mine["student_bias"].grad, full["student_bias"].grad[rows], 1e-5,
                              f"{what} d_bias")
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_two_processes(monkeypatch):
    run_gloo_workers(_tp_worker, 2, "vocabulary-parallel", monkeypatch)
