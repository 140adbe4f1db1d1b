"""Vocabulary-sharded logits (``process_group=``) of logprobs_from_logits, entropy_from_logits and
token_stats_from_logits: 2 CPU processes on gloo against the unsharded op, on both backends.

Implementation: rlhf_kernels/parallel.py (the merge) over the token_stats kernels; the vocabulary-parallel
linear_logprobs is tested in tests/test_linear_logprobs.py.
"""

from __future__ import annotations

import datetime

import pytest
import torch
from conftest import assert_close, run_gloo_workers

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.logprobs import entropy_from_logits, logprobs_from_logits
from rlhf_kernels.ops.token_stats import token_stats_from_logits

WORLD = 2
LOCAL_VOCAB = 29  # a shard; the vocabulary is WORLD·29 = 58
FWD_TOL = 2e-5  # fp32 arithmetic on both sides, merged in a different order
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}  # bf16: both sides round the gradient once


def _assert_grad_close(got, want, rtol, what):
    """Per row, |got − want| ≤ rtol·max_j |want_j| (+1e-6 absolute)."""
    scale = want.double().abs().amax(-1, keepdim=True) + 1e-30
    err = (got.double() - want.double()).abs() / scale
    assert bool((err <= rtol + 1e-6).all()), f"{what}: max scaled error {err.max().item():.3g}"


def _full_inputs(dtype):
    """The same [3, 4, 58] logits and labels on every rank: ignored positions, -inf entries, a row whose
    second shard is all -inf, labels on the first entry of shard 0 and the last of shard 1."""
    torch.manual_seed(0)
    vocab = WORLD * LOCAL_VOCAB
    logits = torch.randn(3, 4, vocab) * 3
    logits[torch.rand(logits.shape) < 0.1] = float("-inf")
    logits[0, 1, LOCAL_VOCAB:] = float("-inf")
    labels = torch.randint(0, vocab, (3, 4))
    labels[torch.rand(3, 4) < 0.25] = -100
    labels[0, 0], labels[0, 2], labels[0, 1] = 0, vocab - 1, 3
    # labels on -inf entries give -inf log-probs: keep them finite (masked entries are compared above)
    labels = torch.where(logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0].isinf(), -100, labels)
    logits[0, 0, 0] = logits[0, 2, vocab - 1] = logits[0, 1, 3] = 1.5
    labels[0, 0], labels[0, 2], labels[0, 1] = 0, vocab - 1, 3
    return logits.to(dtype), labels


def _compare(backend, run, logits, labels, columns, dtype, what):
    """run(logits, labels, group) → tuple of outputs; sharded (this rank's columns, on ``backend``)
    against unsharded (on the torch path, which the other test files hold to the oracle and to the
    Triton path): values, and the logits gradient of a fixed weighting of the outputs."""
    import torch.distributed as dist

    results, grads = [], []
    for x, group, on in ((logits[..., columns], dist.group.WORLD, backend), (logits, None, "torch")):
        x = x.clone().requires_grad_()
        with _dispatch.use_backend(on):
            outputs = run(x, labels, group)
        loss = sum((0.5 + i) * torch.where(o.isfinite(), o, 0.0).sum() for i, o in enumerate(outputs))
        loss.backward()
        results.append(outputs)
        grads.append(x.grad)
    for i, (got, want) in enumerate(zip(*results)):
        assert torch.equal(got.isnan(), want.isnan()), f"{what} output {i}: NaN positions"
        got, want = torch.nan_to_num(got.detach()), torch.nan_to_num(want.detach())
        assert_close(got, want, FWD_TOL, f"{what} output {i}")
    assert grads[0].dtype == dtype
    _assert_grad_close(grads[0], grads[1][..., columns], GRAD_RTOL[dtype], f"{what} gradient")


CASES = (
    ("logprobs+entropy", lambda x, y, g: logprobs_from_logits(
        x, y, temperature=0.8, return_entropy=True, process_group=g
    )),
    ("ignore_index=3", lambda x, y, g: (logprobs_from_logits(x, y, ignore_index=3, process_group=g),)),
    ("entropy_from_logits", lambda x, y, g: (entropy_from_logits(x, process_group=g),)),
    ("token_stats", lambda x, y, g: token_stats_from_logits(
        x, y, logit_scale=1.3, softcap=5.0, entropy=True, sum_sq_probs=True, process_group=g
    )[:3]),
    ("sum_sq_probs alone", lambda x, y, g: token_stats_from_logits(
        x, y, sum_sq_probs=True, process_group=g
    )[0:3:2]),
)


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        columns = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
        # the interpreter is slow: the Triton path runs each kernel once, in fp32, on the 4 rows of
        # _full_inputs' first sequence (every special case is there)
        for backend, dtype, cases in (("torch", torch.float32, CASES), ("torch", torch.bfloat16, CASES),
                                      ("triton", torch.float32, CASES[::3])):
            logits, labels = _full_inputs(dtype)
            if backend == "triton":
                logits, labels = logits[:1], labels[:1]
            for name, run in cases:
                what = f"rank {rank} {backend} {dtype} {name}"
                if name == "ignore_index=3":
                    labels3 = torch.where(labels < 0, 3, labels).int()  # int32 labels too
                    _compare(backend, run, logits, labels3, columns, dtype, what)
                else:
                    _compare(backend, run, logits, labels, columns, dtype, what)

        logits, labels = _full_inputs(torch.float32)
        group = dist.group.WORLD
        mine = logits[..., columns]
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 58\)"):
            logprobs_from_logits(mine, torch.full_like(labels, 58), process_group=group)
        with pytest.raises(ValueError, match=r"logits.shape\[-1\] \(the shard width V\) differ across ranks"):
            logprobs_from_logits(logits[..., : LOCAL_VOCAB + rank], labels.clamp(0, 50), process_group=group)
        other = labels.clone()
        other[1, 2] = 7 + rank
        with pytest.raises(ValueError, match="the labels differ across ranks"):
            logprobs_from_logits(mine, other, process_group=group)
        with pytest.raises(ValueError, match="the number of rows differ across ranks"):
            logprobs_from_logits(mine[: 2 + rank], labels[: 2 + rank], process_group=group)
        with pytest.raises(ValueError, match="inplace_backward=True is not supported with process_group"):
            logprobs_from_logits(mine, labels, inplace_backward=True, process_group=group)
        with pytest.raises(ValueError, match="with process_group, token_stats_from_logits computes"):
            token_stats_from_logits(mine, labels, top_k=2, process_group=group)
    finally:
        dist.destroy_process_group()


def test_vocab_sharded_logits_two_processes(monkeypatch):
    run_gloo_workers(_worker, WORLD, "vocabulary-sharded", monkeypatch)


def test_process_group_must_be_a_process_group():
    logits, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    message = "process_group must be a torch.distributed.ProcessGroup or None; got str"
    with pytest.raises(TypeError, match=message):
        logprobs_from_logits(logits, labels, process_group="tp")
    with pytest.raises(TypeError, match=message):
        entropy_from_logits(logits, process_group="tp")
    with pytest.raises(TypeError, match=message):
        token_stats_from_logits(logits, labels, sum_sq_probs=True, process_group="tp")
