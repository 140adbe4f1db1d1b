"""``--rm_labels elo``: the labeler's rankings turned into Elo scalar labels per response, and a reward
model trained on them with pointwise_reward_loss (micro preset, CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.reference import ratings as ref_ratings
from rlhf_kernels.trainer import make_config
from rlhf_kernels.trainer import reward as rm
from rlhf_kernels.trainer.config import config_from_args
from rlhf_kernels.trainer.model import PolicyValueModel
from rlhf_kernels.trainer.report import MetricsLog
from rlhf_kernels.trainer.runtime import plan_runtime, shutdown_runtime, start_runtime
from rlhf_kernels.trainer.task import LabelerTask


def _prefs(valid: torch.Tensor) -> rm.PreferenceSet:
    n, K = valid.shape
    empty = torch.zeros(n, K, 1, dtype=torch.long)
    return rm.PreferenceSet(ids=empty, mask=empty.bool(), labels=empty, valid=valid, gold=torch.zeros(n, K))


def test_elo_labels_are_a_scan_over_each_prompts_pairs():
    valid = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    labels = rm.elo_labels(_prefs(valid), seed=3)
    assert labels.shape == (3, 4)
    assert bool((labels[~valid] == 0).all())
    # ranked best → worst: the labels decrease along each prompt's valid prefix
    for row, k in zip(labels, valid.sum(1).tolist()):
        assert all(row[i] > row[i + 1] for i in range(k - 1))
    # and equal the float64 Elo loop over the same pairs in the same (seeded) order
    first, second = torch.triu_indices(4, 4, offset=1)
    order = torch.rand(3, first.numel(), generator=torch.Generator().manual_seed(3)).argsort(1)
    for b in range(3):
        w, l = first[order[b]], second[order[b]]
        keep = valid[b, l]
        ratings = ref_ratings.elo_ratings(w[keep], l[keep], 4, k=rm.RM_ELO_K)
        expected = torch.where(valid[b], (ratings - 1000) * math.log(10) / 400, 0.0)
        torch.testing.assert_close(labels[b].double(), expected, rtol=1e-6, atol=1e-6)
    # a pair: the winner gets +k/2 Elo points on the Bradley–Terry scale
    assert labels[1, 0].item() == pytest.approx(16 * math.log(10) / 400, rel=1e-6)


def test_rm_labels_flag():
    assert make_config("micro").rm_labels == "pairwise"
    assert config_from_args(["--preset", "micro", "--rm_labels", "elo"]).rm_labels == "elo"
    with pytest.raises(SystemExit):
        config_from_args(["--preset", "micro", "--rm_labels", "bt"])


@pytest.mark.parametrize("labels", ["elo", "pairwise"])
def test_reward_model_trains_on_elo_labels(tmp_path, monkeypatch, labels):
    cfg = make_config("micro", out_dir=str(tmp_path), progress=False, plot=False, device="cpu",
                      rm_labels=labels, rm_steps=6)
    calls = {"pointwise": 0, "ranking": 0}
    pointwise, ranking = rlhf_kernels.pointwise_reward_loss, rlhf_kernels.ranking_reward_loss

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rlhf_kernels, "pointwise_reward_loss", counting("pointwise", pointwise))
    monkeypatch.setattr(rlhf_kernels, "ranking_reward_loss", counting("ranking", ranking))
    rt = start_runtime(plan_runtime(cfg))
    try:
        torch.manual_seed(0)
        model = PolicyValueModel(cfg)
        log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
        reward_model, stats = rm.train_reward_model(rt, cfg, model, LabelerTask(cfg), "helpful", 0, log)
    finally:
        shutdown_runtime(rt)
    assert stats["labels"] == labels
    assert 0.0 <= stats["heldout_accuracy"] <= 1.0 and math.isfinite(stats["score_std"])
    assert reward_model.value_head.weight.abs().sum() > 0  # trained from its zero initialisation
    if labels == "elo":
        assert calls["pointwise"] == cfg.rm_steps
    else:
        assert calls["pointwise"] == 0 and calls["ranking"] == (cfg.rm_steps if cfg.rm_max_k > 2 else 0)


def test_elo_reward_loss_ignores_invalid_responses():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    prefs = _prefs(valid)
    targets = [torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])]
    index = torch.tensor([0, 1])
    scores = torch.tensor([0.7, -0.1, 123.0, 0.2, -9.0, 4.0], requires_grad=True)
    loss = rm.elo_reward_loss(scores, [(prefs, index)], targets)
    expected = ((0.7 - 0.5) ** 2 + (-0.1 + 0.5) ** 2 + 0.2**2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert scores.grad[[2, 4, 5]].abs().sum() == 0
