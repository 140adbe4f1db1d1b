"""The real peers, imported once per session (TRL first and without placeholders, then verl and OpenRLHF
with :mod:`peers.placeholders`), and their originals captured before any test patches them."""

from __future__ import annotations

import importlib
import types
import warnings

import pytest

from peers.placeholders import import_peer

INSTALL_HINT = "the peer-parity suite needs the pinned peers: run `make test` (or `make peers`)"


def _imported(module: str, placeholders: bool) -> types.ModuleType:
    try:
        with warnings.catch_warnings():  # the peers' own import-time deprecation notices
            warnings.simplefilter("ignore")
            return import_peer(module) if placeholders else importlib.import_module(module)
    except ImportError as error:  # a missing peer is a failure, never a skip
        raise RuntimeError(f"cannot import {module} ({error}); {INSTALL_HINT}") from error


@pytest.fixture(scope="session")
def trl_peer() -> types.SimpleNamespace:
    utils = _imported("trl.trainer.utils", placeholders=False)
    kernels = _imported("trl.kernels.chunked_logprob", placeholders=False)
    return types.SimpleNamespace(
        utils=utils,
        ChunkedLogProbFunction=kernels.ChunkedLogProbFunction,
        selective_log_softmax=utils.selective_log_softmax,
        selective_log_softmax_and_entropy=utils.selective_log_softmax_and_entropy,
        entropy_from_logits=utils.entropy_from_logits,
    )


@pytest.fixture(scope="session")
def verl_peer(trl_peer) -> types.SimpleNamespace:  # TRL (and transformers) first, without placeholders
    core = _imported("verl.trainer.ppo.core_algos", placeholders=True)
    functional = _imported("verl.utils.torch_functional", placeholders=True)
    losses = _imported("verl.workers.utils.losses", placeholders=True)
    actor_config = _imported("verl.workers.config.actor", placeholders=True)
    originals = {name: getattr(core, name) for name in dir(core) if not name.startswith("_")}
    originals.update(
        {name: getattr(functional, name) for name in dir(functional) if not name.startswith("_")}
    )
    return types.SimpleNamespace(
        core=core,
        functional=functional,
        losses=losses,
        ActorConfig=actor_config.ActorConfig,
        original=types.SimpleNamespace(**originals),
        policy_losses=dict(core.POLICY_LOSS_REGISTRY),
        estimators=dict(core.ADV_ESTIMATOR_REGISTRY),
    )


@pytest.fixture(scope="session")
def openrlhf_peer(trl_peer) -> types.SimpleNamespace:
    loss = _imported("openrlhf.models.loss", placeholders=True)
    utils = _imported("openrlhf.models.utils", placeholders=True)
    maker = _imported("openrlhf.trainer.ppo_utils.experience_maker", placeholders=True)
    actor = _imported("openrlhf.trainer.ray.ppo_actor", placeholders=True)
    rm_trainer = _imported("openrlhf.trainer.rm_trainer", placeholders=True)
    cls = maker.RemoteExperienceMaker
    return types.SimpleNamespace(
        loss=loss,
        utils=utils,
        maker=maker,
        ppo_actor=actor,
        rm_trainer=rm_trainer,
        PolicyLoss=loss.PolicyLoss,
        ValueLoss=loss.ValueLoss,
        PairWiseLoss=loss.PairWiseLoss,
        LogExpLoss=loss.LogExpLoss,
        aggregate_loss=loss.aggregate_loss,
        compute_approx_kl=utils.compute_approx_kl,
        compute_reward=utils.compute_reward,
        masked_mean=utils.masked_mean,
        masked_normalize=utils.masked_normalize,
        log_probs_from_logits=utils.log_probs_from_logits,
        compute_entropy=utils.compute_entropy,
        get_advantages_and_returns=cls.get_advantages_and_returns,
        get_cumulative_returns=cls.get_cumulative_returns,
    )
