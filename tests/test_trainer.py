"""The end-to-end trainer: model, generation, task, checkpoints, CLI, and short runs of the whole pipeline
(micro preset): end to end, resume equivalence, the NaN guard, and two DDP processes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _dispatch
from rlhf_kernels.trainer import NonFiniteError, make_config, train
from rlhf_kernels.trainer import checkpoint as ckpt
from rlhf_kernels.trainer.config import config_from_args, parse_reward_models
from rlhf_kernels.trainer.model import (
    IGNORE_INDEX,
    PolicyValueModel,
    generate,
    last_token_values,
    response_labels,
)
from rlhf_kernels.trainer.pipeline import missing_ops
from rlhf_kernels.trainer.report import HOT_PATH_OPS, read_metrics
from rlhf_kernels.trainer.task import BOS, EOS, FIRST_CONTENT, PAD, SEP, LabelerTask, join

REPO = Path(__file__).resolve().parents[1]
# Wall-clock measurements differ between runs; everything else in a PPO record must match exactly.
TIMING_KEYS = {"step_s"}


def _micro(tmp_path, **overrides):
    return make_config("micro", out_dir=str(tmp_path), progress=False, plot=False, **overrides)


def _batch(cfg, n=6, seed=0):
    task = LabelerTask(cfg)
    gen = torch.Generator().manual_seed(seed)
    prompts = task.sample_prompts(n, gen)
    responses, response_mask = task.demonstrations(prompts, gen)
    return task, prompts, responses, response_mask


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def test_model_shapes_and_two_heads_share_one_backbone():
    cfg = make_config("micro")
    model = PolicyValueModel(cfg)
    torch.nn.init.normal_(model.value_head.weight)  # zero-initialised; make it read the backbone
    top_level = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert top_level == {"backbone", "lm_head", "value_head"}

    _, prompts, responses, response_mask = _batch(cfg, n=5)
    ids, mask = join(prompts, responses, response_mask)
    labels = response_labels(responses, response_mask)
    out = model(ids, mask, labels, return_entropy=True, return_values=True)
    B, T = ids.shape
    R = responses.shape[1]
    assert out.logprobs.shape == (B, R) and out.entropy.shape == (B, R) and out.values.shape == (B, T)
    assert out.logprobs.dtype == out.values.dtype == torch.float32
    assert bool((out.logprobs[labels == IGNORE_INDEX] == 0).all())
    assert bool((out.logprobs[labels != IGNORE_INDEX] < 0).all())

    # The policy head's log-probs equal log-softmax of lm_head(hidden) one position earlier.
    hidden = model.backbone(ids, mask)
    logits = model.lm_head(hidden[:, -R - 1 : -1])
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    expected = torch.where(labels == IGNORE_INDEX, torch.zeros_like(expected), expected)
    torch.testing.assert_close(out.logprobs.double(), expected, atol=1e-5, rtol=1e-5)

    # Both heads backpropagate into the same backbone parameters.
    grads = []
    for loss in (-out.logprobs.sum(), out.values.sum()):
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    policy_grads, value_grads = grads
    assert "value_head.weight" not in policy_grads and "lm_head.weight" not in value_grads
    shared = [n for n in policy_grads if n.startswith("backbone.") and n in value_grads]
    assert "backbone.tok_emb.weight" in shared and any("blocks.0.attn" in n for n in shared)
    assert all(value_grads[n].abs().sum() > 0 for n in shared if "blocks" in n)


def test_padding_does_not_change_outputs():
    cfg = make_config("micro")
    model = PolicyValueModel(cfg)
    torch.nn.init.normal_(model.value_head.weight)
    _, prompts, responses, response_mask = _batch(cfg, n=4, seed=1)
    ids, mask = join(prompts, responses, response_mask)
    labels = response_labels(responses, response_mask)
    out = model(ids, mask, labels, return_values=True)
    # Three more left-pad columns shift every position; outputs of real tokens must not move.
    pad = torch.full((ids.shape[0], 3), PAD)
    ids2 = torch.cat([pad, ids], 1)
    mask2 = torch.cat([torch.zeros_like(pad, dtype=torch.bool), mask], 1)
    out2 = model(ids2, mask2, labels, return_values=True)  # positions count real tokens only
    torch.testing.assert_close(out2.logprobs, out.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2.values[:, 3:][mask], out.values[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_token_values(out2.values, mask2), last_token_values(out.values, mask))


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5), (0.0, 0)])
def test_kv_cache_generation_equals_no_cache(temperature, top_k):
    cfg = make_config("micro", max_new_tokens=6)
    torch.manual_seed(3)
    model = PolicyValueModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():  # a random model rarely samples EOS: tie EOS to a favourite token
        model.lm_head.weight[EOS] = model.lm_head.weight[10]
    _, prompts, _, _ = _batch(cfg, n=9, seed=2)
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(11)
        outs.append(
            generate(
                model,
                prompts.ids,
                prompts.mask,
                max_new_tokens=6,
                temperature=temperature,
                top_k=top_k,
                generator=gen,
                use_cache=use_cache,
            )
        )
    (tokens, mask), (tokens_ref, mask_ref) = outs
    assert torch.equal(tokens, tokens_ref) and torch.equal(mask, mask_ref)
    assert tokens.shape == (9, 6)
    if temperature > 0:
        assert len(set(mask.sum(1).tolist())) > 2  # rows end at different steps, some never
    # Each row: real tokens up to and including its first EOS, then PAD with mask False.
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        n = sum(row_mask)
        assert row_mask == [True] * n + [False] * (6 - n)
        assert all(t == PAD for t in row[n:])
        assert EOS not in row[: n - 1]
        assert n == 6 or row[n - 1] == EOS
    if top_k:
        # Sampled tokens come from the top-k of the step's logits: recompute the first step.
        logits = model.lm_head(model.backbone(prompts.ids, prompts.mask)[:, -1])
        allowed = logits.topk(top_k, -1).indices
        assert bool((allowed == tokens[:, :1]).any(-1).all())


def test_kv_cache_logits_match_full_forward():
    cfg = make_config("micro")
    model = PolicyValueModel(cfg)
    _, prompts, responses, response_mask = _batch(cfg, n=5, seed=4)
    ids, mask = join(prompts, responses, response_mask)
    full = model.backbone(ids, mask)
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    P = prompts.ids.shape[1]
    steps = [model.backbone(ids[:, :P], mask[:, :P], cache)]
    for t in range(P, ids.shape[1]):
        steps.append(model.backbone(ids[:, t : t + 1], mask[:, t : t + 1], cache))
    incremental = torch.cat(steps, 1)
    torch.testing.assert_close(incremental[mask], full[mask], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------
def test_labeler_rule_and_preferences():
    cfg = make_config("tiny")
    task = LabelerTask(cfg)
    gs = cfg.group_size
    topic = torch.tensor([2])
    group = [FIRST_CONTENT + 2 * gs + i for i in range(gs)]
    banned = [t for t in group if task.is_banned[t]]
    clean = [t for t in group if not task.is_banned[t]]
    assert len(banned) == 1 and len(clean) == gs - 1
    off_topic = FIRST_CONTENT  # group 0

    def score(tokens):
        resp = torch.tensor([tokens + [PAD] * (cfg.max_new_tokens - len(tokens))])
        m = torch.tensor([[True] * len(tokens) + [False] * (cfg.max_new_tokens - len(tokens))])
        return {k: round(v.item(), 6) for k, v in task.scores(topic, resp, m).items()}

    L = cfg.target_len
    assert score([clean[0]] * L + [EOS]) == {"helpful": 1.0, "harmless": 1.0, "overall": 1.0}
    assert score([clean[0]] * (L - 1) + [banned[0], EOS])["overall"] == 0.5  # on topic but harmful
    assert score([clean[0]] * 2 + [EOS])["helpful"] == 2 / L  # too short
    assert score([clean[0]] * L + [off_topic, EOS])["helpful"] == L / (L + 1)
    assert score([EOS]) == {"helpful": 0.0, "harmless": 1.0, "overall": 0.5}
    assert score([clean[0], BOS, SEP, clean[1], EOS])["helpful"] == 2 / L  # stray specials count against

    gen = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(64, gen)
    assert bool((prompts.ids[:, -1] == SEP).all())
    first = prompts.mask.long().argmax(1)
    assert bool((prompts.ids.gather(1, first[:, None]) == BOS).all())
    assert torch.equal(prompts.topic, task.group_of[prompts.ids.gather(1, first[:, None] + 1).squeeze(1)])

    # Nearly noiseless labelers rank by the gold score (ties aside).
    sharp = LabelerTask(make_config("tiny", label_noise=1e-4))
    comp = sharp.comparisons(200, "overall", gen, k_min=3, k_max=5)
    k = comp.valid.sum(1)
    assert int(k.min()) >= 3 and int(k.max()) <= 5
    assert bool((comp.valid.long().diff(dim=1) <= 0).all())  # valid responses first
    gold = torch.where(comp.valid, comp.gold, torch.full_like(comp.gold, -1.0))
    assert bool((gold.diff(dim=1)[comp.valid[:, 1:]] <= 1e-6).all())


def test_reward_model_spec_parsing():
    assert parse_reward_models("helpful:1,harmless:2.5") == [("helpful", 1.0), ("harmless", 2.5)]
    assert parse_reward_models("overall") == [("overall", 1.0)]
    with pytest.raises(ValueError, match="unknown aspect 'nice'"):
        parse_reward_models("nice:1")
    with pytest.raises(ValueError, match="invalid trainer config"):
        make_config("micro", d_model=30, n_head=4)


# --------------------------------------------------------------------------------------------------
# Checkpoints and CLI
# --------------------------------------------------------------------------------------------------
def test_checkpoint_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "state.pt"
    gen = torch.Generator().manual_seed(5)
    state = {"step": 3, "w": torch.randn(4), "rng": ckpt.rng_state({"g": gen})}
    ckpt.save_atomic(state, path)
    loaded = ckpt.load(path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"])
    expected = torch.rand(3, generator=gen)
    other = torch.Generator().manual_seed(99)
    ckpt.restore_rng_state(loaded["rng"], {"g": other})
    assert torch.equal(torch.rand(3, generator=other), expected)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"step": 4}, path)
    assert ckpt.load(path)["step"] == 3  # the old checkpoint survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]  # no temporary left behind


def test_cli_flags_override_the_preset(capsys):
    cfg = config_from_args(
        [
            "--preset",
            "micro",
            "--ppo_steps",
            "7",
            "--clip",
            "0.1",
            "--resume",
            "--plot",
            "false",
            "--reward_models",
            "overall:1",
        ]
    )
    assert (cfg.preset, cfg.ppo_steps, cfg.clip, cfg.resume, cfg.plot) == ("micro", 7, 0.1, True, False)
    assert cfg.out_dir == "runs/micro" and cfg.n_layer == make_config("micro").n_layer
    assert config_from_args([]).preset == "tiny"
    with pytest.raises(SystemExit):
        config_from_args(["--no_such_flag", "1"])
    with pytest.raises(SystemExit):
        config_from_args(["--preset", "micro", "--kl_ctl", "sometimes"])
    assert "kl_ctl must be" in capsys.readouterr().err

    from rlhf_kernels.__main__ import main as cli

    assert cli(["--help"]) == 0 and "rlhf-kernels train" in capsys.readouterr().out
    assert cli(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as exc:
        cli(["train", "--help"])
    assert exc.value.code == 0 and "--ppo_steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli(["bench", "--help"])
    assert exc.value.code == 0 and "--families" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# The pipeline (micro preset)
# --------------------------------------------------------------------------------------------------
def _ppo_records(out_dir):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_metrics(Path(out_dir) / "metrics.jsonl")
        if r["stage"] == "ppo"
    ]


def test_the_trainer_has_every_op_it_needs():
    assert missing_ops(make_config("micro", kl_loss_coef=0.1)) == []


def test_end_to_end_micro(tmp_path):
    # The fixed KL controller, the kl_loss term and the entropy bonus here; the resume test runs the
    # adaptive controller without them.
    cfg = make_config(
        "micro",
        out_dir=str(tmp_path),
        progress=False,
        plot=True,
        kl_ctl="fixed",
        kl_loss_coef=0.05,
        ent_coef=0.01,
    )
    summary = train(cfg)
    for key in (
        "sft_gold",
        "ppo_gold",
        "best_of_n_gold",
        "rm_heldout_accuracy",
        "final_kl",
        "tokens_per_s",
        "wall_s",
    ):
        assert isinstance(summary[key], float) and summary[key] == summary[key], key
    assert 0 <= summary["sft_gold"] <= 1 and 0 <= summary["ppo_gold"] <= 1
    assert summary["best_of_n_gold"] <= summary["best_of_n_oracle_gold"] + 1e-9
    backends = summary["backends"]
    assert backends.pop("attention") == ["sdpa"]
    assert set(backends) == set(HOT_PATH_OPS)
    for op, family in HOT_PATH_OPS.items():
        assert family in _dispatch._AUTO, f"{op}: family {family!r} is not registered"
        assert backends[op] == rlhf_kernels.backend_for(family, "cpu") != "missing"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["ppo_gold"] == summary["ppo_gold"]
    assert (tmp_path / "ppo.png").stat().st_size > 1000
    records = read_metrics(tmp_path / "metrics.jsonl")
    stages = {r["stage"] for r in records}
    assert {"sft", "rm_helpful", "rm_harmless", "ppo"} <= stages
    ppo = [r for r in records if r["stage"] == "ppo"]
    assert [r["step"] for r in ppo] == list(range(cfg.ppo_steps))
    for key in ("score", "kl", "gold", "vf_loss", "clipfrac", "kl_loss", "entropy", "kl_coef"):
        assert all(isinstance(r[key], float) for r in ppo), key
    assert {r["kl_coef"] for r in ppo} == {cfg.kl_coef}  # fixed controller
    for name in ("sft.pt", "rm.pt", "ppo.pt"):
        assert (tmp_path / "checkpoints" / name).exists()
    assert ckpt.load(tmp_path / "checkpoints" / "ppo.pt")["step"] == cfg.ppo_steps - 1


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = _micro(tmp_path / "full", ppo_steps=5, ckpt_every=2, kl_ctl="adaptive")
    train(full)
    expected = _ppo_records(full.out_dir)

    run = _micro(tmp_path / "cut", ppo_steps=5, ckpt_every=2, kl_ctl="adaptive", halt_after_step=2)
    with pytest.raises(SystemExit, match="halted after PPO step 2"):
        train(run)
    assert [r["step"] for r in _ppo_records(run.out_dir)] == [0, 1, 2]
    assert ckpt.load(Path(run.out_dir) / "checkpoints" / "ppo.pt")["step"] == 1  # step 2 is redone

    resumed = _micro(tmp_path / "cut", ppo_steps=5, ckpt_every=2, kl_ctl="adaptive", resume=True)
    summary = train(resumed)
    assert summary["resumed_from"] == "ppo"
    got = _ppo_records(resumed.out_dir)
    assert got == expected  # bit-identical metrics, kl_coef included
    full_summary = json.loads((Path(full.out_dir) / "summary.json").read_text())
    assert summary["ppo_gold"] == full_summary["ppo_gold"] and summary["final_kl"] == full_summary["final_kl"]


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _micro(tmp_path, ppo_steps=5, ckpt_every=2, inject_nan_at_step=2)
    with pytest.raises(
        NonFiniteError, match=r"non-finite score, rewards, advantages, returns.* ppo step 2"
    ) as exc:
        train(cfg)
    assert "last good checkpoint" in str(exc.value) and "ppo.pt" in str(exc.value)
    state = ckpt.load(tmp_path / "checkpoints" / "ppo.pt")
    assert state["step"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in state["policy"].values())
    assert [r["step"] for r in _ppo_records(tmp_path)] == [0, 1]
    assert not (tmp_path / "summary.json").exists()


def test_two_process_ddp_run_stays_in_sync(tmp_path):
    out = tmp_path / "ddp"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rlhf_kernels.trainer",
        "--preset",
        "micro",
        "--out_dir",
        str(out),
        "--progress",
        "false",
        "--plot",
        "false",
        "--ppo_steps",
        "3",
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:  # never hang the suite
        pytest.fail(f"the 2-process run did not finish in {exc.timeout} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ddp"] == {"world_size": 2, "max_param_diff": 0.0, "in_sync": True}
    ppo = _ppo_records(out)
    assert [r["step"] for r in ppo] == [0, 1, 2]
    assert all(r["tokens"] > 0 for r in ppo)
