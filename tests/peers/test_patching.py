"""install() / patch() against the real peers: they pass the version gate, patching twice is harmless,
and unpatch() restores every original, in the defining modules, the registries and the modules that
imported the originals by name."""

from __future__ import annotations

import sys

import pytest

from rlhf_kernels.compat import openrlhf as co
from rlhf_kernels.compat import trl as ct
from rlhf_kernels.compat import verl as cv


def _snapshot(root: str) -> dict:
    """Every module-level binding of the peer's loaded modules, and the verl registries' entries."""
    state = {}
    for name, module in list(sys.modules.items()):
        if module is not None and (name == root or name.startswith(root + ".")):
            state.update({(name, key): id(value) for key, value in list(vars(module).items())})
    return state


FRAMEWORKS = [
    ("verl", cv.install, cv.unpatch, "verl_peer"),
    ("trl", ct.patch, ct.unpatch, "trl_peer"),
    ("openrlhf", co.patch, co.unpatch, "openrlhf_peer"),
]


@pytest.mark.parametrize(("root", "patch", "unpatch", "peer"), FRAMEWORKS, ids=[f[0] for f in FRAMEWORKS])
def test_patch_twice_then_unpatch_restores_everything(request, root, patch, unpatch, peer):
    request.getfixturevalue(peer)
    before = _snapshot(root)
    registries = None
    if root == "verl":
        core = sys.modules["verl.trainer.ppo.core_algos"]
        registries = (dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY))
    try:
        first = patch()
        after_first = _snapshot(root)
        assert first and after_first != before
        assert patch() == first and _snapshot(root) == after_first  # a second patch changes nothing
    finally:
        unpatch()
    assert _snapshot(root) == before
    if registries is not None:
        assert (dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY)) == registries
    unpatch()  # unpatching twice is harmless too
    assert _snapshot(root) == before


def test_trl_patch_reaches_the_fused_head_lookup(trl_peer):
    ct.patch()
    try:
        assert trl_peer.utils._ChunkedLogProbFunction is ct.ChunkedLogProbFunction
        assert trl_peer.utils.selective_log_softmax is ct.selective_log_softmax
        assert sys.modules["trl.kernels"].ChunkedLogProbFunction is ct.ChunkedLogProbFunction
        # where it is defined, TRL's own class keeps its name
        assert (
            sys.modules["trl.kernels.chunked_logprob"].ChunkedLogProbFunction
            is trl_peer.ChunkedLogProbFunction
        )
    finally:
        ct.unpatch()
    assert trl_peer.utils._ChunkedLogProbFunction is trl_peer.ChunkedLogProbFunction
