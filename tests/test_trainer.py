"""The end-to-end trainer: model, generation, task, checkpoints, flags, the output folder's rules, and
short runs of the whole pipeline (micro preset): end to end, host syncs, resume equivalence, kills at
every stage, Ctrl-C, the NaN guard, two DDP processes; and the documented default run's figures."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.trainer import (
    PRESETS,
    CheckpointError,
    NonFiniteError,
    TrainConfig,
    make_config,
    pipeline,
    results,
    train,
)
from rlhf_kernels.trainer import checkpoint as ckpt
from rlhf_kernels.trainer.cli import main as trainer_main
from rlhf_kernels.trainer.cli import resume_command
from rlhf_kernels.trainer.config import build_parser, config_from_args, parse_reward_models
from rlhf_kernels.trainer.model import (
    IGNORE_INDEX,
    PolicyValueModel,
    generate,
    last_token_values,
    response_labels,
)
from rlhf_kernels.trainer.report import HOT_PATH_OPS, op_family, read_metrics
from rlhf_kernels.trainer.rundir import identity_of
from rlhf_kernels.trainer.runtime import Runtime, estimate_cpu_seconds
from rlhf_kernels.trainer.task import BOS, EOS, FIRST_CONTENT, PAD, SEP, LabelerTask, join

REPO = Path(__file__).resolve().parents[1]
# Wall-clock measurements differ between runs; everything else in a record or summary must match exactly.
TIMING_KEYS = {"step_s"}
SUMMARY_TIMING_KEYS = {"tokens_per_s", "wall_s", "timings_s", "startup_s", "resumed_from", "stage3_s"}


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
    gs = cfg.topic_size
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
    for weight in ("0", "-1", "nan", "x"):
        with pytest.raises(ValueError, match="the weight of 'helpful' must be a number > 0"):
            parse_reward_models(f"helpful:{weight}")
    with pytest.raises(ValueError, match="invalid trainer config"):
        make_config("micro", d_model=30, n_head=4)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def test_checkpoint_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "ppo.pt"
    gen = torch.Generator().manual_seed(5)
    payload = {"step": 3, "policy": {"w": torch.randn(4)}, "optimizer": {}, "kl_ctl": {}, "tokens": 0}
    state = ckpt.stamp({**payload, "rng": [ckpt.rng_state({"g": gen})], "world": 1}, "ppo", {"seed": 0}, {})
    ckpt.save_atomic(state, path)
    loaded = ckpt.load(path)
    assert loaded["step"] == 3 and torch.equal(loaded["policy"]["w"], state["policy"]["w"])
    assert loaded["run"] == state["run"] and len(loaded["run"]["id"]) == 32
    expected = torch.rand(3, generator=gen)
    other = torch.Generator().manual_seed(99)
    ckpt.restore_rng_state(loaded["rng"][0], {"g": other})
    assert torch.equal(torch.rand(3, generator=other), expected)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({**state, "step": 4}, path)
    assert ckpt.load(path)["step"] == 3  # the old checkpoint survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["ppo.pt"]  # no temporary left behind


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", r"EOFError reading 0 bytes"),
        (bytes(range(256)) * 8, r"reading 2048 bytes"),
    ],
    ids=["empty", "random-bytes"],
)
def test_a_corrupt_checkpoint_is_named_with_what_to_do(tmp_path, content, expected):
    path = tmp_path / "checkpoints" / "ppo.pt"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        ckpt.load(path)
    message = str(exc.value)
    assert re.search(expected, message) and str(path) in message and "\n" not in message
    assert "delete it and rerun with --resume (PPO restarts from rm.pt)" in message
    assert "weights_only" not in message  # torch's advice (load untrusted code) is wrong for a bad file


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def test_cli_flags_override_the_preset(capsys):
    cfg = config_from_args(
        ["--preset", "micro", "--ppo_steps", "7", "--clip", "0.1", "--resume", "--plot", "false"]
        + ["--reward_models", "overall:1", "--score_clip", "inf"]
    )
    assert (cfg.preset, cfg.ppo_steps, cfg.clip, cfg.resume, cfg.plot) == ("micro", 7, 0.1, True, False)
    assert cfg.score_clip == math.inf
    assert cfg.out_dir == "runs/micro" and cfg.n_layer == make_config("micro").n_layer
    assert config_from_args([]).preset == "tiny"
    for argv in (["--no_such_flag", "1"], ["--ppo_step", "3"]):  # no abbreviations either
        with pytest.raises(SystemExit) as exc:
            config_from_args(argv)
        assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1

    from rlhf_kernels.__main__ import main as cli

    assert cli(["--help"]) == 0 and "rlhf-kernels train" in capsys.readouterr().out
    assert cli(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as exc:
        cli(["train", "--help"])
    assert exc.value.code == 0 and "--ppo_steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli(["bench", "--help"])
    assert exc.value.code == 0 and "--families" in capsys.readouterr().out


# Each flag the issue found checked late, cryptically or not at all (issue 17), and more: (flag value,
# the allowed range the one-line error must state).
BAD_FLAGS = [
    ("--ppo_lr", "-1", "in (0, 1]"),
    ("--temperature", "-1", ">= 0"),
    ("--rollout_batch", "0", ">= 1"),
    ("--best_of_n", "0", ">= 1"),
    ("--eval_prompts", "0", ">= 1"),
    ("--ckpt_every", "0", ">= 1"),
    ("--minibatch", "0", ">= 1"),
    ("--rm_batch", "0", ">= 1"),
    ("--max_grad_norm", "-1", "> 0 or inf"),
    ("--sft_batch", "0", ">= 1"),
    ("--ppo_steps", "-5", ">= 1"),
    ("--top_k", "-3", ">= 0"),
    ("--threads", "-1", ">= 0"),
    ("--score_clip", "0", "> 0 or inf"),
    ("--vf_clip", "-1", ">= 0"),
    ("--gamma", "1.5", "in [0, 1]"),
    ("--lam", "nan", "in [0, 1]"),
    ("--clip", "1", "in (0, 1)"),
    ("--dual_clip", "0.5", "0 or > 1"),
    ("--seed", "-1", "in [0, 4294967295]"),
    ("--kl_ctl", "sometimes", "one of adaptive, fixed"),
    ("--kl_estimator", "k9", "one of k1, "),
    ("--top_k", "100", "in [0, 13]"),
    ("--rm_batch", "1", "leaves no room for a ranked comparison"),
    ("--rollout_batch", "20", "must be a multiple of --minibatch 8"),
    ("--demo_max_len", "6", "must be <= --max_new_tokens 6"),
    ("--reward_models", "helpful:-2", "must be a number > 0"),
    ("--ppo_steps", "x", "expected an integer"),
    ("--resume", "maybe", "expected true or false"),
    ("--preset", "huge", "must be one of tiny, micro, small"),
]


@pytest.mark.parametrize("flag,value,allowed", BAD_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_its_range_and_value(capsys, flag, value, allowed):
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--preset", "micro", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("python -m rlhf_kernels.trainer: error: "), err
    assert flag in err and allowed in err and value in err, err
    assert "Traceback" not in err


def _exit_status(argv: list[str]) -> int:
    """The CLI's exit status (argparse exits, the run returns)."""
    try:
        return trainer_main(argv)
    except SystemExit as exc:
        return exc.code


def test_what_the_machine_cannot_do_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (
            ["--out_dir", str(blocker / "run")],
            f"--out_dir {blocker / 'run'} cannot be created: {blocker} is not a folder",
        ),
        (["--out_dir", str(blocker)], "is not a folder"),
        (
            ["--out_dir", str(tmp_path / "r"), "--device", "cpu", "--dtype", "bfloat16"],
            "--dtype bfloat16 needs a CUDA device",
        ),
        (
            ["--out_dir", str(tmp_path / "r"), "--resume", "--overwrite"],
            "--resume and --overwrite exclude each other",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (["--out_dir", str(tmp_path / "r"), "--device", "cuda"], "--device cuda: no CUDA device")
        )
    for argv, message in cases:
        assert _exit_status(["--preset", "micro", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing was created


def test_help_describes_every_flag_with_the_chosen_presets_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag
    for preset in PRESETS:
        with pytest.raises(SystemExit) as exc:
            config_from_args(["--preset", preset, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert exc.value.code == 0
        cfg = make_config(preset)
        for f in dataclasses.fields(TrainConfig):
            entry = out.split(f" --{f.name} ", 1)[1][:400]  # the flag's line(s) in --help
            assert entry.split(" ", 1)[1].startswith(" ".join(f.metadata["help"].split())), f.name
            assert f"(default {getattr(cfg, f.name)}" in entry, (preset, f.name)
        assert f"preset {preset}" in out
    assert "(default 4; >= 1)" in " ".join(build_parser(preset="micro").format_help().split())  # ppo_steps


def test_a_gpu_sized_preset_on_the_cpu_says_how_long_it_will_take(tmp_path, monkeypatch, capsys):
    class Stop(Exception):
        pass

    def stop(rt):
        raise Stop

    # The estimate times one training step; a fake clock that advances one second per reading makes
    # every timed step take exactly 1 s, so the printed figure is deterministic (no timed test).
    from rlhf_kernels.trainer import runtime as runtime_module

    ticks = iter(range(10**6))
    monkeypatch.setattr(runtime_module.time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setattr(pipeline, "_warm_up_ops", stop)  # the first work after the start-up lines
    small = make_config("small", out_dir=str(tmp_path), device="cpu", progress=False)
    with pytest.raises(Stop):
        train(small)
    out = capsys.readouterr().out
    minutes = re.search(
        r"preset small is sized for a GPU; on this CPU the run will take about (\d+) minutes", out
    )
    assert minutes, out
    assert int(minutes[1]) == round(estimate_cpu_seconds(small) / 60), out
    # the same clock: small counts more sequences through the model than the default preset
    assert estimate_cpu_seconds(small) > 5 * estimate_cpu_seconds(make_config("tiny"))


def test_phase_timings_synchronise_only_when_profiling(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    for profile, expected in ((False, 0), (True, 2)):
        calls.clear()
        rt = Runtime(make_config("micro", profile=profile), torch.device("cuda", 0))
        with rt.timed("phase"):
            pass
        assert len(calls) == expected and rt.timings["phase"] >= 0


# --------------------------------------------------------------------------------------------------
# The pipeline (micro preset)
# --------------------------------------------------------------------------------------------------
def _records(out_dir, stage="ppo"):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_metrics(Path(out_dir) / "metrics.jsonl")
        if stage is None or r["stage"] == stage
    ]


def _same_run(out_dir, reference, *, exact=True):
    """The run in ``out_dir`` equals ``reference``: every metrics record, summary figure and policy weight
    (bit for bit, or within float tolerance where the device does not promise determinism)."""
    got, expected = _records(out_dir, None), _records(reference, None)
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in expected]
    summaries = [json.loads((Path(d) / "summary.json").read_text()) for d in (out_dir, reference)]
    summaries = [{k: v for k, v in s.items() if k not in SUMMARY_TIMING_KEYS} for s in summaries]
    weights = [ckpt.load(Path(d) / "checkpoints" / "ppo.pt")["policy"] for d in (out_dir, reference)]
    if exact:
        assert got == expected
        assert summaries[0] == summaries[1]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    else:
        for record, reference_record in zip(got, expected):
            assert record.keys() == reference_record.keys()
            for key, value in record.items():
                if isinstance(value, float):
                    assert value == pytest.approx(reference_record[key], rel=1e-4, abs=1e-5), (record, key)
                else:
                    assert value == reference_record[key], (record, key)
        assert summaries[0]["ppo_eval"] == pytest.approx(summaries[1]["ppo_eval"], rel=1e-4, abs=1e-5)
        for k in weights[1]:
            torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def finished_micro(tmp_path_factory):
    """A finished micro run (seed 0), to copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_micro(out, device="cpu"))
    return out


def test_hot_path_ops_report_their_modules_family():
    assert [op_family(op) for op in HOT_PATH_OPS] == [
        "logprobs",
        "linear_logprobs",
        "kl",
        "token_rewards",
        "gae",
        "whiten",
        "ppo_losses",
        "ppo_losses",
        "kl",
        "reward_losses",
        "reward_losses",
    ]
    for op in HOT_PATH_OPS:
        module = importlib.import_module(getattr(rlhf_kernels, op).__module__)
        assert module.__name__ == f"rlhf_kernels.ops.{op_family(op)}" and module.FAMILY == op_family(op)


def test_end_to_end_micro(tmp_path):
    # The fixed KL controller, the kl_loss term and the entropy bonus here; the resume test runs the
    # adaptive controller without them.  Whatever device the trainer picks (CUDA when present).
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
    assert list(backends) == list(HOT_PATH_OPS)
    for op in HOT_PATH_OPS:  # the family the op's module declares, on the device the run used
        assert backends[op] == rlhf_kernels.backend_for(op_family(op), summary["device"]), op
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
    states = {name: ckpt.load(tmp_path / "checkpoints" / f"{name}.pt") for name in ("sft", "rm", "ppo")}
    assert states["ppo"]["step"] == cfg.ppo_steps - 1
    identity = json.loads((tmp_path / "config.json").read_text())
    assert all(state["run"]["identity"]["seed"] == identity["seed"] == 0 for state in states.values())
    assert states["rm"]["run"]["parents"] == {"sft": states["sft"]["run"]["id"]}
    assert states["ppo"]["run"]["parents"] == {
        "sft": states["sft"]["run"]["id"],
        "rm": states["rm"]["run"]["id"],
    }


def test_every_host_sync_of_the_trainer_is_marked(tmp_path, monkeypatch):
    """Runs the pipeline with every tensor → Python conversion recorded where the trainer's own code calls
    it; each such line must carry a ``# host sync: <why>`` comment (or ``no device sync: ...`` for CPU
    data), on the line or in the comment lines just above it."""
    trainer_dir = Path(pipeline.__file__).parent
    sites = set()

    def recording(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            caller = sys._getframe(1)
            if Path(caller.f_code.co_filename).parent == trainer_dir:
                sites.add((caller.f_code.co_filename, caller.f_lineno))
            return original(self, *args, **kwargs)

        return method

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    train(_micro(tmp_path, ppo_steps=3, ckpt_every=2))
    monkeypatch.undo()
    assert len(sites) >= 5  # the step transfers, the evaluations, generation
    for file, line in sorted(sites):
        lines = Path(file).read_text().splitlines()
        context = [lines[line - 1]]
        above = line - 2
        while above >= 0 and lines[above].strip().startswith("#"):
            context.append(lines[above])
            above -= 1
        assert any(re.search(r"# (host sync|no device sync): \S", text) for text in context), (
            f"{Path(file).name}:{line} converts a tensor to Python without a '# host sync: <why>' mark"
        )


def test_greedy_sampling_runs_the_whole_pipeline(tmp_path):
    summary = train(_micro(tmp_path, temperature=0.0, ppo_steps=2))  # docs: temperature 0 = greedy
    assert all(math.isfinite(summary[k]) for k in ("sft_gold", "ppo_gold", "final_kl"))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, device):
    """Halted after PPO step 2, resumed with fewer steps (3, an allowed change: it finishes), then with
    the full 5: bit-identical to the uninterrupted run on the CPU.  On CUDA, kernels (cuBLAS, SDPA's
    memory-efficient backward, Triton atomics) do not promise determinism: equal within tolerance."""
    common = dict(device=device, ckpt_every=2, kl_ctl="adaptive")
    full = _micro(tmp_path / "full", ppo_steps=5, **common)
    train(full)

    cut = _micro(tmp_path / "cut", ppo_steps=5, halt_after_step=2, **common)
    with pytest.raises(SystemExit, match="halted after PPO step 2"):
        train(cut)
    assert [r["step"] for r in _records(cut.out_dir)] == [0, 1, 2]
    assert ckpt.load(Path(cut.out_dir) / "checkpoints" / "ppo.pt")["step"] == 1  # step 2 is redone

    shorter = train(_micro(tmp_path / "cut", ppo_steps=3, resume=True, **common))
    assert shorter["resumed_from"] == "ppo" and shorter["ppo_steps"] == 3
    assert [r["step"] for r in _records(cut.out_dir)] == [0, 1, 2]
    summary = train(_micro(tmp_path / "cut", ppo_steps=5, resume=True, **common))
    assert summary["resumed_from"] == "ppo"
    _same_run(cut.out_dir, full.out_dir, exact=device == "cpu")
    _same_run(cut.out_dir, full.out_dir, exact=False)  # (the CUDA comparison, exercised everywhere)


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
    assert [r["step"] for r in _records(tmp_path)] == [0, 1]
    assert not (tmp_path / "summary.json").exists()


# --------------------------------------------------------------------------------------------------
# The output folder: whose run it holds (issue 17)
# --------------------------------------------------------------------------------------------------
def _snapshot(out_dir):
    return {p: p.read_bytes() for p in sorted(Path(out_dir).rglob("*")) if p.is_file()}


def _copy(finished, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(finished, out)
    return out


def _cli(out_dir, *flags):
    return _exit_status([*MICRO_FLAGS, "--out_dir", str(out_dir), *flags])


MICRO_FLAGS = ["--preset", "micro", "--device", "cpu", "--progress", "false", "--plot", "false"]


def test_rerunning_without_resume_never_starts_over_silently(finished_micro, tmp_path, capsys):
    out = _copy(finished_micro, tmp_path)
    before = _snapshot(out)
    assert _cli(out) == 0  # this very run, finished: nothing to do, nothing touched
    assert "already holds this run, finished" in capsys.readouterr().out and _snapshot(out) == before

    assert _cli(out, "--seed", "1") == 2  # another run's outputs
    err = capsys.readouterr().err
    assert (
        len(err.splitlines()) == 1 and "holds another run's outputs" in err and "seed: 0 there, 1 here" in err
    )
    assert "--overwrite" in err and _snapshot(out) == before

    assert _cli(out, "--ppo_steps", "6") == 2  # this run, unfinished for 6 steps: --resume continues it
    err = capsys.readouterr().err
    assert "already holds this run, unfinished" in err and "--resume" in err and _snapshot(out) == before

    (out / "config.json").unlink()  # outputs nobody can vouch for
    assert _cli(out, "--seed", "1") == 2
    assert "another run's outputs" in capsys.readouterr().err  # the checkpoints still say whose run it is

    assert _cli(out, "--seed", "1", "--overwrite") == 0
    assert "--overwrite: removed the earlier run's outputs" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["seed"] == 1
    seeds = {
        ckpt.load(out / "checkpoints" / f"{s}.pt")["run"]["identity"]["seed"] for s in ("sft", "rm", "ppo")
    }
    assert seeds == {1}


def test_resume_refuses_changed_flags_before_touching_a_file(finished_micro, tmp_path, capsys):
    out = _copy(finished_micro, tmp_path)
    before = _snapshot(out)
    assert _cli(out, "--resume", "--seed", "7", "--ppo_lr", "0.002", "--kl_ctl", "fixed") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "belongs to another run" in err
    for diff in (
        "seed: 0 there, 7 here",
        "ppo_lr: 0.0005 there, 0.002 here",
        "kl_ctl: 'adaptive' there, 'fixed' here",
    ):
        assert diff in err
    assert "only ppo_steps, " in err  # what may change is said
    assert _cli(out, "--resume", "--d_model", "64") == 2
    err = capsys.readouterr().err
    assert "d_model: 32 there, 64 here" in err and "Traceback" not in err
    assert _cli(out, "--resume", "--ppo_steps", "2") == 2  # below what ppo.pt has done
    assert "--ppo_steps must be >= 4 on --resume" in capsys.readouterr().err
    assert _snapshot(out) == before  # config.json included


def test_resume_refuses_stale_checkpoints_of_another_run(finished_micro, tmp_path, capsys):
    # Issue 17's folder: seed 0 finished, then seed 1 (--overwrite) killed during the reward models: seed
    # 1's sft.pt and config.json beside seed 0's rm.pt and ppo.pt, as the old trainer left it.
    seed1 = tmp_path / "seed1"
    train(_micro(seed1, device="cpu", seed=1, ppo_steps=1))
    stale = _copy(finished_micro, tmp_path, "stale")
    for name in ("config.json", "checkpoints/sft.pt"):
        shutil.copy(seed1 / name, stale / name)
    before = _snapshot(stale)
    assert _cli(stale, "--resume", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "checkpoints/rm.pt belongs to another run" in err and "seed: 0 there, 1 here" in err
    assert "resuming" not in err and _snapshot(stale) == before

    # The same flags, but rm.pt built from another sft.pt: the lineage, not the flags, tells.
    mixed = _copy(finished_micro, tmp_path, "mixed")
    shutil.copy(seed1 / "checkpoints" / "rm.pt", mixed / "checkpoints" / "rm.pt")
    state = ckpt.load(mixed / "checkpoints" / "rm.pt")
    state["run"]["identity"] = ckpt.load(mixed / "checkpoints" / "sft.pt")["run"]["identity"]
    ckpt.save_atomic(state, mixed / "checkpoints" / "rm.pt")
    assert _cli(mixed, "--resume") == 2
    assert "checkpoints/rm.pt was not built from the sft.pt beside it" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["empty ppo.pt", "random ppo.pt", "truncated sft.pt", "foreign ppo.pt"])
def test_resume_names_a_corrupt_checkpoint_and_what_to_do(finished_micro, tmp_path, capsys, damage):
    out = _copy(finished_micro, tmp_path)
    name = damage.split()[1]
    path = out / "checkpoints" / name
    content = {
        "empty": b"",
        "random": bytes(random.Random(0).randrange(256) for _ in range(4096)),
        "truncated": path.read_bytes()[:5000],
    }
    if damage.startswith("foreign"):
        torch.save({"step": 3}, path)  # loads, but is not one of this trainer's checkpoints
    else:
        path.write_bytes(content[damage.split()[0]])
    before = _snapshot(out)
    assert _cli(out, "--resume") == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and f"checkpoints/{name}" in captured.err
    assert "resuming" not in captured.out + captured.err and "weights_only" not in captured.err
    assert ckpt.REDO[name[:-3]] in captured.err and "--overwrite" in captured.err
    assert _snapshot(out) == before
    if name == "ppo.pt":  # doing what it says works
        path.unlink()
        assert _cli(out, "--resume") == 0
        _same_run(out, finished_micro)


def test_a_killed_checkpoint_write_leaves_the_old_one(finished_micro, tmp_path):
    out = _copy(finished_micro, tmp_path)
    leftover = out / "checkpoints" / ".ppo.pt.tmp-12345"
    leftover.write_bytes(b"half a checkpoint")
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"stage": "ppo", "st')
    assert _cli(out, "--resume") == 0  # the partial record and the temporary file are a crash's, not news
    assert not leftover.exists()
    _same_run(out, finished_micro)


# --------------------------------------------------------------------------------------------------
# Killed at any point, resumed: the same run (real SIGKILL / SIGINT in a subprocess)
# --------------------------------------------------------------------------------------------------
MICRO_CLI = ["--preset", "micro", "--device", "cpu", "--progress", "false", "--plot", "false"]
MICRO_CLI += ["--ppo_steps", "5", "--ckpt_every", "2"]
# RLHF_TRAINER_KILL_TEST=full: three seeds, ten kills each, plus kills at random times (minutes).
FULL_KILL_TEST = os.environ.get("RLHF_TRAINER_KILL_TEST", "") == "full"


def _trainer(args, timeout=300, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_TRAINER_CRASH")}
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env}
    cmd = args if args[0] == sys.executable else [sys.executable, "-m", "rlhf_kernels.trainer", *args]
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # never hang the suite
        pytest.fail(f"{' '.join(cmd)} did not finish in {exc.timeout} s")


def _stage_of(point: str) -> str:
    if point.startswith("sft"):
        return "sft"
    if point.startswith("rm") or point in ("SFT policy evaluated", "best-of-N evaluated"):
        return "rm"
    if point.lower().startswith("ppo"):
        return "ppo"
    return "outputs"  # config.json, metrics.jsonl, summary.json


@pytest.fixture(scope="module")
def micro_reference(tmp_path_factory):
    """An uninterrupted subprocess run per seed: its folder, its crash points, its duration."""
    runs = {}

    def reference(seed: int):
        if seed not in runs:
            out = tmp_path_factory.mktemp(f"reference{seed}") / "run"
            trace = out.parent / "trace.txt"
            started = time.perf_counter()
            proc = _trainer(
                [*MICRO_CLI, "--seed", str(seed), "--out_dir", str(out)], RLHF_TRAINER_CRASH_TRACE=str(trace)
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[seed] = out, trace.read_text().splitlines(), time.perf_counter() - started
        return runs[seed]

    return reference


def _kill_points(trace: list[str], rng: random.Random, per_stage: int) -> list[str]:
    """``per_stage`` random points of every stage and one checkpoint write caught between its temporary
    file and the move into place, in the order a run passes them."""
    chosen = set(rng.sample([p for p in trace if "pt" in p and "not yet in place" in p], 1))
    for stage in ("sft", "rm", "ppo", "outputs"):
        points = [p for p in trace if _stage_of(p) == stage]
        chosen |= set(rng.sample(points, min(per_stage, len(points))))
    return sorted(chosen, key=trace.index)


@pytest.mark.parametrize("seed", [0, 1, 2] if FULL_KILL_TEST else [0])
def test_killed_at_any_point_and_resumed_equals_the_uninterrupted_run(micro_reference, tmp_path, seed):
    reference, trace, duration = micro_reference(seed)
    assert {_stage_of(p) for p in trace} == {"sft", "rm", "ppo", "outputs"}
    points = _kill_points(trace, random.Random(seed), per_stage=3 if FULL_KILL_TEST else 1)
    out = tmp_path / "run"
    args = [*MICRO_CLI, "--seed", str(seed), "--out_dir", str(out)]
    for i, point in enumerate(points):  # each process is killed at its point, the next one resumes
        proc = _trainer(args + (["--resume"] if i else []), RLHF_TRAINER_CRASH_AT=point)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {point!r}: {proc.stderr[-2000:]}"
    proc = _trainer(args + ["--resume"])
    assert proc.returncode == 0, f"after kills at {points}: {proc.stderr[-3000:]}"
    _same_run(out, reference)
    configs = [json.loads((d / "config.json").read_text()) for d in (out, reference)]
    assert identity_of(configs[0]) == identity_of(configs[1])

    if FULL_KILL_TEST:  # SIGKILL at random times too, not only at the named points
        timed = tmp_path / "timed"
        _kill_at_random_times([*MICRO_CLI, "--seed", str(seed), "--out_dir", str(timed)], duration, seed)
        _same_run(timed, reference)


def _kill_at_random_times(args: list[str], duration: float, seed: int, attempts: int = 30) -> None:
    """Runs, SIGKILLed after a random share of ``duration`` (start-up included), then resumed, until a
    process finishes."""
    rng = random.Random(seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_TRAINER_CRASH")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for attempt in range(attempts):
        cmd = [sys.executable, "-m", "rlhf_kernels.trainer", *args, *(["--resume"] if attempt else [])]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, stderr = proc.communicate(timeout=rng.uniform(0.5, 1.3) * duration)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), stderr.decode()[-2000:]
        if proc.returncode == 0:
            return
    pytest.fail(f"{attempts} kills at random times and the run never finished")


def test_ctrl_c_prints_where_it_stopped_and_the_command_that_resumes(micro_reference, tmp_path):
    reference, _, _ = micro_reference(0)
    out = tmp_path / "run"
    proc = _trainer(
        [*MICRO_CLI, "--seed", "0", "--out_dir", str(out)],
        RLHF_TRAINER_CRASH_AT="rm_harmless step 3 done",
        RLHF_TRAINER_CRASH_SIGNAL="INT",
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    expected = (
        f"interrupted during reward model 2 (harmless) step 4/8 (the last checkpoint is "
        f"{out / 'checkpoints' / 'sft.pt'}); resume with: "
    )
    assert last.startswith(expected), last
    command = shlex.split(last[len(expected) :])
    assert command[:3] == [sys.executable, "-m", "rlhf_kernels.trainer"] and command[-1] == "--resume"
    proc = _trainer(command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_run(out, reference)


def test_resume_command_drops_overwrite_and_keeps_every_other_flag():
    argv = ["--preset", "micro", "--overwrite", "--seed=3", "--out_dir", "runs/my run", "--plot", "false"]
    command = resume_command(argv, "python -m rlhf_kernels.trainer")
    assert shlex.split(command) == [
        sys.executable,
        "-m",
        "rlhf_kernels.trainer",
        "--preset",
        "micro",
        "--seed=3",
        "--out_dir",
        "runs/my run",
        "--plot",
        "false",
        "--resume",
    ]
    assert (
        resume_command(["--overwrite", "true", "--resume"], "rlhf-kernels train")
        == "rlhf-kernels train --resume"
    )


# --------------------------------------------------------------------------------------------------
# Data parallelism (issue 13: NCCL needs one GPU per process)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs 2 GPUs"),
        ),
    ],
)
def test_two_process_ddp_run_stays_in_sync(tmp_path, backend):
    out = tmp_path / "ddp"
    device = "cpu" if backend == "gloo" else "cuda"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "rlhf_kernels.trainer", "--preset", "micro", "--device", device, "--out_dir", str(out)]
    cmd += ["--progress", "false", "--plot", "false", "--ppo_steps", "3"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:  # never hang the suite
        pytest.fail(f"the 2-process run did not finish in {exc.timeout} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["device"].startswith(device)
    assert summary["ddp"] == {"world_size": 2, "max_param_diff": 0.0, "in_sync": True}
    ppo = _records(out)
    assert [r["step"] for r in ppo] == [0, 1, 2]
    assert all(r["tokens"] > 0 for r in ppo)


# --------------------------------------------------------------------------------------------------
# The documented figures (README, docs/trainer.md) are the code's
# --------------------------------------------------------------------------------------------------
def test_documented_default_run_numbers_match_the_code(tmp_path):
    """Runs the default configuration (``make demo``: tiny, seed 0) on the CPU and renders the generated
    blocks of README.md and docs/trainer.md from it: they must equal what is documented (the timings,
    which depend on the machine, are taken from the documentation's record of them)."""
    summary = train(make_config("tiny", out_dir=str(tmp_path), device="cpu", progress=False, plot=False))
    problems = results.check(summary)
    assert not problems, (
        "\n".join(problems) + "\nregenerate: python -m rlhf_kernels.trainer --overwrite && " + results.COMMAND
    )
