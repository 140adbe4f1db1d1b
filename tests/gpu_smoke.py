"""The GPU smoke selection: ``pytest -m gpu_smoke`` (docs/gpu.md).

On a lent H100/H200 there are minutes, not hours: the whole suite launches ~600 distinct Triton
specialisations, each a native compile.  This selection runs every kernel natively at least once in
every dtype it serves (fp32, bf16, fp16 where the family takes it, fp64) and every layout family
(contiguous, strided/sliced rows, a transposed vocabulary axis), through the launcher tests (NaN-poisoned
outputs, every element checked) and a few oracle tests, plus opcheck of every routing op on its Triton
path, two ``torch.compile(fullgraph=True, dynamic=True)`` cases and the CUDA-graph capture of a whole
training step.  ``python -m bench.static --help`` has the static (compile-only) check.

Used two ways:
- as a plugin: ``pytest -p tests.gpu_smoke -m gpu_smoke tests`` (what ``bench/gpu_validate.sh`` runs);
- from ``tests/conftest.py``, so that a bare ``pytest -m gpu_smoke`` works::

      from gpu_smoke import mark_smoke
      def pytest_collection_modifyitems(config, items): mark_smoke(items)

``--count-specializations FILE`` (plugin only) counts the distinct native specialisations the selected
tests launch — in Triton's interpreter on a CPU machine, with the binder ``JITFunction.run`` uses — and
writes the counts to FILE (JSON) and the launches to FILE.launches.pkl (``python -m bench.static
--compile-launches`` compiles them for sm_90 and times it).  The CUDA-only tests (opcheck, compile, CUDA
graph) skip on a CPU machine; their launches are estimated by running the same ops eagerly at the same
shapes (samples and cases imported from tests/test_registration.py, the graph step's calls at its shapes).
"""

from __future__ import annotations

import functools
import json
import pickle
import re

import pytest

MARKER = "gpu_smoke"

# Node-id patterns (``*`` matches anything; brackets are literal), grouped by family; each comment says
# what its lines add natively.
SMOKE: tuple[str, ...] = (
    # logprobs: fwd in fp32/bf16/fp64 with and without entropy (launcher), fp16 and bf16 fwd + bwd
    # (oracle); bwd out of place and in place; rows through two strided dims; a non-unit vocab stride.
    "tests/test_logprobs.py::test_fwd_launcher_writes_every_output[*]",
    "tests/test_logprobs.py::test_bwd_launcher_writes_every_element[*-triton]",
    "tests/test_logprobs.py::test_matches_oracle[triton-shape1-dtype1]",
    "tests/test_logprobs.py::test_matches_oracle[triton-shape1-dtype2]",
    "tests/test_logprobs.py::test_sliced_time_axis_without_copy[triton]",
    "tests/test_logprobs.py::test_transposed_vocab_axis[triton]",
    "tests/test_logprobs.py::test_no_host_sync_on_cuda",
    # token_stats: the fwd launcher in fp32 and fp64, the bwd launcher (all statistics, log-probs only),
    # bf16 / fp16 with a softcap over a long row (oracle), the top-k path.
    "tests/test_token_stats.py::test_fwd_launcher_writes_every_output[*]",
    "tests/test_token_stats.py::test_bwd_launcher_writes_every_element[*-triton]",
    "tests/test_token_stats.py::test_matches_oracle[triton-shape2-*]",
    "tests/test_token_stats.py::test_each_output_alone[triton-top_k]",
    # linear_logprobs: both launchers (entropy; every gradient, none); fp32/bf16/fp16 with bias and
    # temperature; strided inputs; fp64.
    "tests/test_linear_logprobs.py::test_stats_launcher_writes_every_output[*]",
    "tests/test_linear_logprobs.py::test_bwd_launcher_writes_every_output[needs0-True]",
    "tests/test_linear_logprobs.py::test_bwd_launcher_writes_every_output[needs2-False]",
    "tests/test_linear_logprobs.py::test_matches_oracle[triton-(7,)-H33-V97-bias1-t0.7-*]",
    "tests/test_linear_logprobs.py::test_strided_inputs[triton]",
    "tests/test_linear_logprobs.py::test_float64_with_temperature_matches_oracle[triton-True]",
    "tests/test_linear_logprobs.py::test_no_host_sync_on_cuda",
    # gae: both mask modes (launcher, fp32), bf16 and fp16, strided inputs.
    "tests/test_gae.py::test_launcher_writes_every_element[5-37-*]",
    "tests/test_gae.py::test_gae_dtypes[triton-dtype1-carry]",
    "tests/test_gae.py::test_gae_dtypes[triton-dtype2-zero]",
    "tests/test_gae.py::test_gae_strided_inputs[triton-carry]",
    # whiten: the three kernels, global and per row (launchers, fp32); bf16 and fp16 with weights.
    "tests/test_whiten.py::test_launchers_write_every_element[*]",
    "tests/test_whiten.py::test_whiten_dtypes_shapes_and_weights[triton-dtype1]",
    "tests/test_whiten.py::test_whiten_dtypes_shapes_and_weights[triton-dtype2]",
    # token_rewards: the kernel without and with a score clip (k1, k3).
    "tests/test_token_rewards.py::test_launcher_writes_every_element[9-37]",
    "tests/test_token_rewards.py::test_token_rewards_match_oracle[triton-None-k1]",
    "tests/test_token_rewards.py::test_token_rewards_match_oracle[triton-0.5-k3]",
    # kl: every estimator fwd and bwd (launcher, fp32); bf16 and fp16 fwd + bwd; fp64.
    "tests/test_kl.py::test_launchers_write_every_element[dtype0-37]",
    "tests/test_kl.py::test_values_and_gradients_match_oracle[triton-dtype1-k3]",
    "tests/test_kl.py::test_values_and_gradients_match_oracle[triton-dtype2-k3]",
    "tests/test_kl.py::test_float64_inputs_are_computed_in_float64[triton-k3]",
    # ppo_losses: the four kernels with and without dual / value clip (launchers); bf16 and fp16 policy,
    # bf16 value; float and int masks with strided inputs; fp64.
    "tests/test_ppo_losses.py::test_policy_launchers_write_every_element[*]",
    "tests/test_ppo_losses.py::test_value_launchers_write_every_element[*]",
    "tests/test_ppo_losses.py::test_policy_matches_oracle[triton-token-mean-shape1-dtype1]",
    "tests/test_ppo_losses.py::test_policy_matches_oracle[triton-token-mean-shape1-dtype2]",
    "tests/test_ppo_losses.py::test_value_matches_oracle[triton-token-mean-shape1-dtype1]",
    "tests/test_ppo_losses.py::test_policy_float_and_int_masks_and_strided_inputs[triton]",
    "tests/test_ppo_losses.py::test_float64_inputs_are_computed_in_float64[triton-token-mean]",
    # policy_losses: every verl variant's forward and backward (launchers, fp32); bf16; fp64.
    "tests/test_policy_losses.py::test_launchers_write_every_output[*]",
    "tests/test_policy_losses.py::test_bf16_inputs_compute_in_fp32[triton]",
    "tests/test_policy_losses.py::test_fp64_with_scalars_not_representable_in_fp32[triton-gspo]",
    # reward_losses: pairwise with a margin tensor, ranking with mask and hinge at K = 70 (two pair
    # tiles), pointwise, each in fp32/bf16/fp64 (launchers); fp16 pairwise and ranking; strided scores.
    "tests/test_reward_losses.py::test_pairwise_launchers_write_every_output[tensor-2500-*]",
    "tests/test_reward_losses.py::test_ranking_launchers_write_every_output[True-True-shape2-*]",
    "tests/test_reward_losses.py::test_pointwise_launchers_write_every_output[2500-*]",
    "tests/test_reward_losses.py::test_pairwise_matches_oracle[triton-shape2-dtype2]",
    "tests/test_reward_losses.py::test_ranking_half_precision[triton-True-dtype1]",
    "tests/test_reward_losses.py::test_ranking_strided_scores_float_mask_and_one_prompt[triton]",
    # linear_logprobs (issue 15): every statistic with a softcap; the batch-invariant kernels.
    "tests/test_linear_logprobs.py::test_token_stats_match_oracle[triton-*]",
    "tests/test_linear_logprobs.py::test_batch_invariant_bitwise[triton-*]",
    # sampling_logprobs: both kernels (launchers), the oracle in every setting, bf16, vLLM's kept set.
    "tests/test_sampling_logprobs.py::test_launchers_write_every_output[*]",
    "tests/test_sampling_logprobs.py::test_matches_oracle[triton-*]",
    "tests/test_sampling_logprobs.py::test_bf16[triton]",
    "tests/test_sampling_logprobs.py::test_kept_set_matches_vllm_without_ties[triton-*]",
    # the fused linear losses: cuBLAS fp32-output products + the logprobs / policy / distill kernels.
    "tests/test_linear_policy_loss.py::test_every_variant_matches_oracle[triton-*]",
    "tests/test_linear_policy_loss.py::test_driver_gradients[triton-*]",
    "tests/test_linear_preference_loss.py::test_triton_path[*]",
    "tests/test_linear_distill_loss.py::test_row_kernel_against_torch_path[*]",
    "tests/test_linear_distill_loss.py::test_fp64_to_1e12[triton]",
    # ratings: the Elo scan (launcher, fp32 / fp64), against the float64 loop.
    "tests/test_ratings.py::test_elo_kernel_writes_every_rating[*]",
    "tests/test_ratings.py::test_elo_matches_float64_loop[triton-*]",
    # Registration: opcheck of every routing op on its Triton path; torch.compile of two public
    # functions forward and backward; a PPO step captured in a CUDA graph (no host sync anywhere).
    "tests/test_registration.py::test_opcheck_triton_path_cuda[*]",
    "tests/test_registration.py::test_compile_fullgraph_dynamic_cuda[logprobs_from_logits(entropy, *)]",
    "tests/test_registration.py::test_compile_fullgraph_dynamic_cuda[ppo_policy_loss(dual clip, *)]",
    "tests/test_registration.py::test_cuda_graph_capture_of_a_training_step",
)


@functools.cache
def _regex(pattern: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")) + r"\Z")


def matches(nodeid: str, pattern: str) -> bool:
    return _regex(pattern).match(nodeid) is not None


def selected(nodeid: str) -> bool:
    return any(matches(nodeid, pattern) for pattern in SMOKE)


def mark_smoke(items: list) -> list[str]:
    """Marks the selected items ``gpu_smoke``; returns the patterns that matched no item."""
    matched = set()
    for item in items:
        for pattern in SMOKE:
            if matches(item.nodeid, pattern):
                matched.add(pattern)
                if MARKER not in item.keywords:
                    item.add_marker(getattr(pytest.mark, MARKER))
                break
    collected_files = {item.nodeid.split("::")[0] for item in items}
    return [p for p in SMOKE if p not in matched and p.split("::")[0] in collected_files]


# ---------------------------------------------------------------------------------------------------
# Plugin hooks (active with -p tests.gpu_smoke)
# ---------------------------------------------------------------------------------------------------
_state: dict = {}


def pytest_addoption(parser):
    parser.addoption(
        "--count-specializations",
        default=None,
        metavar="FILE",
        help="count the distinct native Triton specialisations the run launches (JSON to FILE)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}: the GPU smoke selection (tests/gpu_smoke.py)")
    path = config.getoption("--count-specializations", default=None)
    if path:
        from bench.static.record import count_interpreted

        context = count_interpreted()
        _state.update(path=path, context=context, launches=context.__enter__(), keys={}, per_test={})


def pytest_collection_modifyitems(config, items):
    unmatched = mark_smoke(items)
    if unmatched:
        _state["unmatched"] = unmatched
    _state["items"] = items


def pytest_sessionfinish(session):
    if "launches" in _state:
        import torch

        if not torch.cuda.is_available():
            _state["cuda_only_errors"] = _estimate_cuda_only(_state.get("items", []))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if "launches" not in _state:
        yield
        return
    start = len(_state["launches"])
    yield
    _collect(item.nodeid, start)


def _collect(test: str, start: int) -> None:
    mine = _state["per_test"].setdefault(test, set())
    for launch in _state["launches"][start:]:
        key = launch.key()
        mine.add(key)
        if key not in _state["keys"]:
            _state["keys"][key] = (launch.kernel, test)
            _state.setdefault("unique", []).append(launch)
    del _state["launches"][start:]  # keep memory flat: only the keys matter


# The CUDA-only tests, estimated on the CPU (see the module docstring).
def _backward(outputs) -> None:
    import torch
    from torch.utils._pytree import tree_leaves

    outs = [o for o in tree_leaves(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def _shadow_opcheck(module, name: str) -> None:
    for args in module._op_args(name, "cpu"):
        _backward(getattr(module.OPS, name)(*args))


def _shadow_compile(module, name: str) -> None:
    fn, make = module.COMPILE_CASES[name]
    for b, t in module.SHAPES:
        args, diff = make(b, t, "cpu")
        _backward(fn(*[a.clone().requires_grad_(i in diff) for i, a in enumerate(args)]))


def _shadow_graph_step(module, name) -> None:
    import torch

    import rlhf_kernels as rk

    b, t, h, v = 4, 33, 64, 257  # test_cuda_graph_capture_of_a_training_step's step, on the CPU
    head, critic = torch.nn.Linear(h, v, bias=False), torch.nn.Linear(h, 1)
    hidden, labels = torch.randn(b, t, h), torch.randint(0, v, (b, t))
    old, ref_lp, old_values = -torch.rand(b, t) * 5, -torch.rand(b, t) * 5, torch.randn(b, t)
    mask = torch.rand(b, t) < 0.8
    rewards, _ = rk.token_level_rewards(torch.randn(b), old, ref_lp, mask, kl_coef=0.05)
    advantages, returns = rk.compute_gae(rewards, old_values, mask, 1.0, 0.95)
    advantages = rk.masked_whiten(advantages, mask)
    logprobs, entropy = rk.logprobs_from_logits(head(hidden), labels, return_entropy=True)
    policy, _ = rk.ppo_policy_loss(logprobs, old, advantages, mask, clip_low=0.2, dual_clip=3.0)
    value, _ = rk.ppo_value_loss(critic(hidden).squeeze(-1), old_values, returns, mask, clip=0.5)
    kl = rk.kl_loss(logprobs, ref_lp, mask, estimator="k3")
    (policy + 0.5 * value + 0.01 * kl - 0.001 * rk.agg_loss(entropy, mask)).backward()


_SHADOWS = {
    "test_opcheck_triton_path_cuda": _shadow_opcheck,
    "test_compile_fullgraph_dynamic_cuda": _shadow_compile,
    "test_cuda_graph_capture_of_a_training_step": _shadow_graph_step,
}


def _estimate_cuda_only(items) -> dict[str, str]:
    """Runs the shadows of the selected CUDA-only tests; {nodeid: error} for those that failed."""
    from rlhf_kernels import _dispatch

    errors = {}
    for item in items:
        shadow = _SHADOWS.get(getattr(item, "originalname", ""))
        if shadow is None or MARKER not in item.keywords:
            continue
        start = len(_state["launches"])
        try:
            with _dispatch.use_backend("triton"):
                shadow(item.module, getattr(getattr(item, "callspec", None), "params", {}).get("name"))
        except Exception as exc:  # an estimate only: say so, keep the rest
            errors[item.nodeid] = f"{type(exc).__name__}: {exc}"
        _collect(item.nodeid + " (estimated on CPU)", start)
    return errors


def pytest_runtest_logreport(report):
    """Prints a failure the moment it happens: a run stopped at its time limit keeps its failures."""
    if report.failed and _state.get("reporter") is not None:
        text = report.longreprtext[-3000:]
        _state["reporter"].write_line(f"\nFAILED {report.nodeid} ({report.when}):\n{text}")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    _state["reporter"] = session.config.pluginmanager.get_plugin("terminalreporter")


def pytest_terminal_summary(terminalreporter):
    unmatched = _state.get("unmatched")
    if unmatched:
        terminalreporter.write_line(
            f"gpu_smoke: {len(unmatched)} pattern(s) matched no collected test (renamed?): {unmatched}",
            yellow=True,
        )
    if "keys" in _state:
        keys = _state["keys"]
        by_kernel: dict[str, int] = {}
        for kernel, _ in keys.values():
            by_kernel[kernel] = by_kernel.get(kernel, 0) + 1
        with open(_state["path"], "w") as f:
            new = {}
            for _, test in keys.values():
                new[test] = new.get(test, 0) + 1
            per_test = {
                test: {"launched": len(mine), "new": new.get(test, 0)}
                for test, mine in _state["per_test"].items()
            }
            estimated = sum(n for test, n in new.items() if test.endswith("(estimated on CPU)"))
            json.dump(
                {
                    "specializations": len(keys),
                    "of_which_cuda_only_estimated": estimated,
                    "cuda_only_errors": _state.get("cuda_only_errors", {}),
                    "by_kernel": by_kernel,
                    "per_test": per_test,
                },
                f,
                indent=1,
            )
        with open(_state["path"] + ".launches.pkl", "wb") as f:
            pickle.dump(_state.get("unique", []), f)
        terminalreporter.write_line(
            f"gpu_smoke: {len(keys)} distinct Triton specialisations "
            f"({len(by_kernel)} kernels; {estimated} of them estimated for the "
            f"CUDA-only tests) -> {_state['path']}"
        )
        for test, error in _state.get("cuda_only_errors", {}).items():
            terminalreporter.write_line(f"gpu_smoke: no estimate for {test}: {error}", yellow=True)
