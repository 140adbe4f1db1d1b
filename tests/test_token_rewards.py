"""token_level_rewards on every backend (PyTorch, Triton) against the float64 oracle and verl's
apply_kl_penalty; the launcher writing every element."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_compiles_for_sm90, backend_device
from test_gae import pattern_mask

from bench.baselines.token_rewards import verl_token_level_rewards
from rlhf_kernels import _dispatch
from rlhf_kernels.ops import token_rewards as token_rewards_ops
from rlhf_kernels.ops.token_rewards import token_level_rewards
from rlhf_kernels.reference import token_rewards as ref
from rlhf_kernels.reference.kl import kl_penalty

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("score_clip", [None, 0.5])
def test_token_rewards_match_oracle(backend, device, estimator, score_clip):
    gen = torch.Generator().manual_seed(15)
    B, T = 7, 61
    scores = (torch.randn(B, generator=gen) * 2).to(device)
    lp = torch.randn(B, T, generator=gen).to(torch.bfloat16).to(device)
    ref_lp = torch.randn(B, T, generator=gen).to(device)
    mask = pattern_mask(B, T, gen).to(device)
    rewards, kl_mean = token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.07, estimator=estimator,
                                               score_clip=score_clip)
    e_rewards, e_kl = ref.token_level_rewards(scores.cpu(), lp.cpu(), ref_lp.cpu(), mask.cpu(), kl_coef=0.07,
                                              estimator=estimator, score_clip=score_clip)
    assert rewards.dtype == torch.float32 and kl_mean.dtype == torch.float32 and kl_mean.shape == ()
    torch.testing.assert_close(rewards.cpu().double(), e_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_mean.cpu().double(), e_kl, rtol=1e-5, atol=1e-6)


def test_token_rewards_score_placement(backend, device):
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], device=device)
    lp = torch.randn(4, 5, device=device)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    rewards, _ = token_level_rewards(scores, lp, lp, mask, kl_coef=0.3)  # KL = 0: only scores
    expected = torch.zeros(4, 5, device=device)
    expected[0, 2], expected[1, 4], expected[2, 2] = 1.0, 2.0, 3.0  # the row without tokens gets none
    assert torch.equal(rewards, expected)
    long_mask = torch.zeros(2, 3000, dtype=torch.bool, device=device)
    long_mask[0, :2999] = True
    long_mask[1, 5] = True  # last valid position in the first of several chunks
    rewards, _ = token_level_rewards(scores[:2], torch.zeros(2, 3000, device=device),
                                         torch.zeros(2, 3000, device=device), long_mask, kl_coef=1.0)
    assert rewards[0, 2998].item() == 1.0 and rewards[1, 5].item() == 2.0
    assert rewards.abs().sum().item() == 3.0


def test_token_rewards_kl_mean_matches_verl():
    gen = torch.Generator().manual_seed(16)
    scores = torch.randn(6, generator=gen)
    lp, ref_lp = torch.randn(6, 40, generator=gen), torch.randn(6, 40, generator=gen)
    lengths = torch.tensor([40, 1, 17, 33, 2, 25])
    mask = torch.arange(40)[None, :] < lengths[:, None]
    rewards, kl_mean = token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.1)
    v_rewards, v_kl = verl_token_level_rewards(scores, lp, ref_lp, mask, 0.1)
    torch.testing.assert_close(rewards, v_rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_mean, v_kl, rtol=1e-5, atol=1e-6)


def test_token_rewards_errors():
    lp, m = torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"scores must have shape logprobs.shape\[:1\]"):
        token_level_rewards(torch.randn(3), lp, lp, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="score_clip must be > 0"):
        token_level_rewards(torch.randn(2), lp, lp, m, kl_coef=0.1, score_clip=0.0)
    with pytest.raises(TypeError, match="kl_coef must be a Python float"):
        token_level_rewards(torch.randn(2), lp, lp, m, kl_coef=torch.tensor(0.1))
    with pytest.raises(ValueError, match="estimator must be one of"):
        token_level_rewards(torch.randn(2), lp, lp, m, kl_coef=0.1, estimator="mse")
    with pytest.raises(ValueError, match="mask must have shape logprobs.shape"):
        token_level_rewards(torch.randn(2), lp, lp, m[:, :3], kl_coef=0.1)


def test_token_rewards_float64_is_refused():
    lp = torch.randn(2, 5)
    with pytest.raises(TypeError, match="logprobs must be a floating tensor"):
        token_level_rewards(torch.randn(2), lp.double(), lp, torch.ones(2, 5), kl_coef=0.1)


# --------------------------------------------------------------------------------------------------
# The launcher, called directly
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("B,T", [(1, 1), (9, 37), (3, 1500), (4, 0)])
def test_launcher_writes_every_element(B, T):
    """Outputs filled with NaN before the launch: every element written (several row tiles, rows longer
    than one chunk, strided inputs, T = 0), and right."""
    device = backend_device("triton")
    gen = torch.Generator().manual_seed(25)
    scores = torch.randn(2 * B, generator=gen)[::2]
    lp = torch.randn(B, 2 * T, generator=gen)[:, ::2]
    ref_lp = torch.randn(B, T, generator=gen)
    mask = pattern_mask(B, T, gen) if T else torch.zeros(B, 0, dtype=torch.bool)
    rewards = torch.full((B, T), float("nan"), device=device)
    row_kl = torch.full((B,), float("nan"), device=device)
    token_rewards_ops._launch_fwd_out(rewards, row_kl, scores.to(device), lp.to(device), ref_lp.to(device),
                                      mask.to(device), 0.3, "k3", 1.5, True)
    expected, _ = ref.token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.3, estimator="k3",
                                          score_clip=1.5)
    torch.testing.assert_close(rewards.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    m = mask.double()
    kl = kl_penalty(lp, ref_lp, "k3")
    expected_row_kl = torch.where(m.sum(-1) > 0, (kl * m).sum(-1) / m.sum(-1).clamp_min(1), 0.0)
    torch.testing.assert_close(row_kl.cpu().double(), expected_row_kl, rtol=1e-5, atol=1e-6)


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_kernels.ops import token_rewards

kernel = token_rewards._token_rewards_fwd_kernel
types = (["*fp32", "*bf16", "*fp32", "*i64", "*fp32", "*fp32"] + ["i64"] * 7 + ["i32"] * 2 + ["fp32"] * 6
         + ["constexpr"] * 5)
for estimator in range(4):
    triton.compile(
        ASTSource(fn=kernel, signature=dict(zip(kernel.arg_names, types)),
                  constexprs={"ESTIMATOR": estimator, "HAS_CLIP": True, "ACC": triton.language.float32,
                              "BLOCK_B": 2, "BLOCK_T": 1024}),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels run natively in the other tests")
@pytest.mark.skipif(triton is None, reason="needs triton")
def test_triton_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter checks the math, not the lowering: compile the kernel (every estimator) to PTX
    for sm_90 (Triton's bundled ptxas; no device needed), in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_AOT_SCRIPT)


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------
def test_opcheck():
    gen = torch.Generator().manual_seed(26)
    lp, ref_lp = torch.randn(3, 11, generator=gen), torch.randn(3, 11, generator=gen)
    mask = pattern_mask(3, 11, gen)
    with _dispatch.use_backend("torch"):
        torch.library.opcheck(torch.ops.rlhf_kernels.token_level_rewards.default,
                              (torch.randn(3), lp, ref_lp, mask, 0.1, "k3", 2.0, True))
    torch.library.opcheck(torch.ops.rlhf_kernels.token_rewards_torch.default,
                          (torch.randn(3), lp, ref_lp, mask.float(), 0.1, "k1", 0.0, False))
