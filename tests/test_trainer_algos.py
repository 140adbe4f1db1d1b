"""Stage 3's algorithms (trainer/algos.py): every one trains from one shared SFT and reward-model fixture
(micro preset), checkpoints and resumes like PPO, logs the rollout mismatch; their losses against plain
math; bad flags; and ``compare``."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.trainer import checkpoint as ckpt
from rlhf_kernels.trainer import make_config, pipeline, results, train
from rlhf_kernels.trainer.algos import ALGORITHMS, algorithm_problems
from rlhf_kernels.trainer.cli import main as trainer_main
from rlhf_kernels.trainer.compare import start_from
from rlhf_kernels.trainer.model import IGNORE_INDEX, PolicyValueModel, generate, response_labels
from rlhf_kernels.trainer.preference import preference_pairs
from rlhf_kernels.trainer.report import read_metrics
from rlhf_kernels.trainer.rrhf import rrhf_loss
from rlhf_kernels.trainer.task import LabelerTask, join

REPO = Path(__file__).resolve().parents[1]
TIMING = {"step_s"}
SUMMARY_TIMING = {"tokens_per_s", "wall_s", "timings_s", "startup_s", "resumed_from", "stage3_s"}


def _micro(out, **overrides):
    return make_config("micro", out_dir=str(out), progress=False, plot=False, **overrides)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One micro run of the whole pipeline (PPO): its sft.pt and rm.pt start every other algorithm."""
    out = tmp_path_factory.mktemp("base")
    return out, train(_micro(out))


def _run_from(base, out, **overrides):
    start_from(base[0], out)
    return train(_micro(out, resume=True, **overrides))


def _records(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["stage"] == "ppo"]


@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if a != "ppo"])
def test_every_algorithm_trains_from_the_shared_sft_and_reward_models(base, tmp_path, algo):
    summary = _run_from(base, tmp_path, algo=algo)
    spec = ALGORITHMS[algo]
    assert summary["algo"] == algo and summary["resumed_from"] == "rm"
    assert summary["sft_gold"] == base[1]["sft_gold"]  # the same SFT policy, evaluated once
    assert all(math.isfinite(summary[k]) for k in ("ppo_gold", "final_kl"))
    records = _records(tmp_path)
    if spec.family == "best_of_n":
        assert records == [] and summary["ppo_gold"] == base[1]["best_of_n_gold"]
        assert summary["final_kl"] == pytest.approx(math.log(2) - 0.5)  # N = 2: the bound log N − (N−1)/N
        return
    cfg = make_config("micro")
    assert [r["step"] for r in records] == list(range(cfg.ppo_steps))
    state = ckpt.load(tmp_path / "checkpoints" / "ppo.pt")
    sft = ckpt.load(tmp_path / "checkpoints" / "sft.pt")["model"]
    assert state["step"] == cfg.ppo_steps - 1
    changed = [k for k in sft if not torch.equal(sft[k], state["policy"][k])]
    assert any(k.startswith("backbone.") for k in changed)  # it trained
    # No value head in the optimizer: its weights never move and it holds no AdamW state.
    assert not any(k.startswith("value_head.") for k in changed)
    n_params = len(list(PolicyValueModel(cfg).parameters()))
    assert len(state["optimizer"]["state"]) == n_params - 2  # every parameter but value_head.{weight,bias}
    if spec.family in ("critic_free", "rrhf"):
        assert all(r["gen_tokens"] > 0 for r in records)
        assert (
            records[-1]["total_gen_tokens"] == summary["gen_tokens"] == sum(r["gen_tokens"] for r in records)
        )
    if spec.family == "critic_free":
        # The rollout's log-probs (KV-cache generation) against the training forward's: a float32 mismatch.
        assert all(0 <= r["rc_log_ppl_abs_diff"] < 1e-4 for r in records)
    if spec.family == "preference":
        assert summary["gen_tokens"] == 0 and all(r["gen_tokens"] == 0 for r in records)


def test_ppo_logs_the_rollout_mismatch_and_keeps_its_value_head(base):
    records = _records(base[0])
    assert all(abs(r["rc_kl"]) < 1e-4 and "vf_loss" in r for r in records)
    assert base[1]["algo"] == "ppo" and base[1]["models_in_memory"] == {
        "policy": 1,
        "reference": 1,
        "reward_models": 2,
    }


@pytest.mark.parametrize(
    "algo, overrides",
    [
        ("grpo", dict(norm_adv_by_std=False, policy_loss="gspo")),  # Dr. GRPO with GSPO's loss
        ("rloo", dict(rollout_is="token", policy_loss="bypass_mode")),
        ("reinforce", dict(rollout_is="sequence")),
        ("dpo", dict(dpo_loss_type="ipo")),
    ],
)
def test_algorithm_options_reach_the_ops(base, tmp_path, algo, overrides):
    summary = _run_from(base, tmp_path, algo=algo, **overrides)
    assert math.isfinite(summary["ppo_gold"])
    record = _records(tmp_path)[-1]
    if overrides.get("rollout_is") and algo != "dpo":
        assert 0.5 < record["rc_rollout_is_mean"] < 2.0


@pytest.mark.parametrize("algo", ["grpo", "reinforce", "dpo"])  # reinforce: its moving baseline is state
def test_resume_reproduces_the_uninterrupted_run(base, tmp_path, algo):
    """Halted after step 2 (checkpoint at step 1), resumed: bit-identical to the uninterrupted run."""
    full = _run_from(base, tmp_path / "full", algo=algo)
    start_from(base[0], tmp_path / "cut")
    with pytest.raises(SystemExit, match="halted after PPO step 2"):
        train(_micro(tmp_path / "cut", resume=True, algo=algo, halt_after_step=2))
    cut = train(_micro(tmp_path / "cut", resume=True, algo=algo))
    assert cut["resumed_from"] == "ppo"
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(_records(tmp_path / "cut")) == strip(_records(tmp_path / "full"))
    same = lambda s: {k: v for k, v in s.items() if k not in SUMMARY_TIMING}  # noqa: E731
    assert same(cut) == same(full)
    weights = [ckpt.load(tmp_path / d / "checkpoints" / "ppo.pt")["policy"] for d in ("cut", "full")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_every_host_sync_of_the_algorithms_is_marked(base, tmp_path, monkeypatch):
    """As tests/test_trainer.py's check for PPO, over the other algorithms' code."""
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
    for algo in ("remax", "rrhf", "kto"):
        _run_from(base, tmp_path / algo, algo=algo, ppo_steps=2)
    monkeypatch.undo()
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


def test_sft_and_rm_checkpoints_are_shared_only_between_runs_of_the_same_stages_1_and_2(base, tmp_path):
    start_from(base[0], tmp_path)
    with pytest.raises(ckpt.RunDirError, match="sft.pt belongs to another run .*seed: 0 there, 1 here"):
        train(_micro(tmp_path, resume=True, algo="grpo", seed=1))


# --------------------------------------------------------------------------------------------------
# The pieces against plain math
# --------------------------------------------------------------------------------------------------
def test_generation_returns_the_log_probs_it_sampled_from():
    cfg = make_config("micro")
    torch.manual_seed(0)
    model = PolicyValueModel(cfg).eval()
    task = LabelerTask(cfg)
    prompts = task.sample_prompts(5, torch.Generator().manual_seed(1))
    for temperature, top_k in ((1.0, 0), (0.7, 3), (0.0, 0)):
        gen = torch.Generator().manual_seed(2)
        responses, mask, logprobs = generate(
            model,
            prompts.ids,
            prompts.mask,
            max_new_tokens=cfg.max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=gen,
            return_logprobs=True,
        )
        again = generate(
            model,
            prompts.ids,
            prompts.mask,
            max_new_tokens=cfg.max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=torch.Generator().manual_seed(2),
        )
        assert torch.equal(again[0], responses)  # asking for log-probs draws nothing more
        ids, full_mask = join(prompts, responses, mask)
        hidden = model.backbone(ids, full_mask)[:, -responses.shape[1] - 1 : -1]
        logits = model.lm_head(hidden).double() / (temperature or 1.0)
        if top_k:
            kth = logits.topk(top_k, -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        expected = logits.log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1)
        expected = torch.where(mask, expected, 0.0)
        torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=0)


def test_rrhf_loss_is_the_hinge_over_length_normalised_log_probs_plus_the_best_nll():
    torch.manual_seed(0)
    n, K, R = 3, 4, 5
    lengths = torch.tensor([[5, 2, 3, 1], [4, 4, 1, 2], [1, 5, 5, 3]])
    labels = torch.where(torch.arange(R) < lengths[..., None], 7, IGNORE_INDEX).view(n * K, R)
    logprobs = (-torch.rand(n * K, R, dtype=torch.float64) * 3).requires_grad_()
    cfg = make_config("micro", rrhf_nll_coef=0.7)
    loss, terms = rrhf_loss(cfg, logprobs, labels, n, K)

    lp = logprobs.view(n, K, R)
    p = torch.stack(
        [torch.stack([lp[b, k, : lengths[b, k]].sum() / lengths[b, k] for k in range(K)]) for b in range(n)]
    )
    hinge = (
        sum(torch.relu(p[b, j] - p[b, i]) for b in range(n) for i in range(K) for j in range(i + 1, K)) / n
    )
    nll = -torch.cat([lp[b, 0, : lengths[b, 0]] for b in range(n)]).mean()
    expected = hinge + 0.7 * nll
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(terms["rank_loss"], hinge, atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(loss, logprobs)
    logprobs2 = logprobs.detach().clone().requires_grad_()
    lp2 = logprobs2.view(n, K, R)
    p2 = torch.stack(
        [torch.stack([lp2[b, k, : lengths[b, k]].sum() / lengths[b, k] for k in range(K)]) for b in range(n)]
    )
    e2 = sum(torch.relu(p2[b, j] - p2[b, i]) for b in range(n) for i in range(K) for j in range(i + 1, K)) / n
    e2 = e2 - 0.7 * torch.cat([lp2[b, 0, : lengths[b, 0]] for b in range(n)]).mean()
    (g2,) = torch.autograd.grad(e2, logprobs2)
    torch.testing.assert_close(g, g2, atol=1e-12, rtol=0)


def test_preference_pairs_are_the_reward_models_comparisons():
    cfg = make_config("micro", reward_models="overall:1")
    task = LabelerTask(cfg)
    pairs = preference_pairs(cfg, task)
    from rlhf_kernels.trainer.reward import RM_SEED, make_preferences

    sets = make_preferences(
        cfg, task, "overall", cfg.rm_items, cfg.seed * 1009 + RM_SEED, torch.device("cpu")
    )
    expected = sum(int((s.valid.sum(1) - 1).sum()) for s in sets if s is not None)
    assert pairs["ids"].shape[:2] == (expected, 2)
    # The first pairs are the pairwise comparisons themselves, chosen first.
    n = len(sets[0])
    assert torch.equal(pairs["ids"][:n], sets[0].ids)
    R = cfg.max_new_tokens
    assert torch.equal(pairs["labels"][:n, 0], sets[0].labels[:, 0])
    assert torch.equal(
        pairs["labels"][:n, 1], response_labels(sets[0].ids[:, 1, -R:], sets[0].mask[:, 1, -R:])
    )


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--algo", "sac"], "--algo must be one of ppo, grpo, rloo, remax"),
        (["--adv_estimator", "magic"], "--adv_estimator must be one of auto, gae, grpo"),
        (
            ["--algo", "grpo", "--group_size", "1"],
            "--group_size 1 leaves --adv_estimator grpo a group of one",
        ),
        (
            ["--algo", "rloo", "--group_size", "1"],
            "--group_size 1 leaves --adv_estimator rloo a group of one",
        ),
        (
            ["--algo", "ppo", "--adv_estimator", "grpo"],
            "--adv_estimator grpo is for the critic-free algorithms",
        ),
        (["--algo", "grpo", "--adv_estimator", "gae"], "--adv_estimator gae needs a value head"),
        (
            ["--algo", "reinforce", "--adv_estimator", "rloo"],
            "--algo reinforce uses its moving-average baseline",
        ),
        (
            ["--algo", "grpo", "--policy_loss", "dro"],
            "--policy_loss dro needs beta, which the trainer does not set",
        ),
        (
            ["--algo", "dpo", "--rollout_is", "token"],
            "--rollout_is applies to ppo and the critic-free algorithms",
        ),
        (["--algo", "grpo", "--group_size", "3"], "--rollout_batch 16 must be a multiple of --group_size 3"),
        (["--algo", "dpo", "--dpo_loss_type", "nope"], "--dpo_loss_type must be one of sigmoid"),
    ],
)
def test_a_bad_algorithm_flag_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        trainer_main(["--preset", "micro", "--out_dir", str(out), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and message in err and err.startswith("python -m rlhf_kernels.trainer: error: ")
    )
    assert not out.exists()


def test_remax_and_reinforce_plus_plus_accept_one_sample_per_prompt():
    for algo in ("remax", "reinforce_plus_plus", "reinforce"):
        assert algorithm_problems(make_config("micro", algo=algo, group_size=1)) == []


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------
def test_compare_trains_stages_1_and_2_once_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "micro", "--algos", "grpo,dpo,best_of_n", "--out_dir", str(out)]
    assert trainer_main([*argv, "--progress", "false", "--ppo_steps", "2"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [r["algo"] for r in result["rows"]] == ["grpo", "dpo", "best_of_n"]
    ids = {ckpt.load(out / a / "checkpoints" / "sft.pt")["run"]["id"] for a in ("grpo", "dpo", "best_of_n")}
    assert len(ids) == 1  # one SFT model for all
    table = (out / "compare.md").read_text()
    assert table.count("\n") == 2 + 3 and "| dpo |" in table
    budget = result["gen_token_budget"]
    assert budget == 2 * 16 * 3  # ppo_steps × rollout_batch × target_len
    assert budget <= rows_of(result)["grpo"]["gen_tokens"] < budget + 16 * 6  # stops in the step crossing it
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = rows_of(result)
    assert rows["dpo"]["gen_tokens"] == 0 and rows["grpo"]["gen_tokens"] > 0
    assert rows["best_of_n"]["kl_is_bound"] and rows["dpo"]["models"]["reward_models"] == 0
    # The generator puts the table into README.md (after the demo block) and docs/trainer.md.
    root = tmp_path / "root"
    (root / "docs").mkdir(parents=True)
    for name in ("README.md", "docs/trainer.md"):
        (root / name).write_text((REPO / name).read_text())
    readme = (root / "README.md").read_text()
    if "generated:compare-results" in readme:  # start from a README without the block: it is inserted
        (root / "README.md").write_text(
            re.sub(
                r"\n<!-- BEGIN generated:compare-results.*?END generated:compare-results -->\n",
                "",
                readme,
                flags=re.S,
            )
        )
    results.write_compare(result, root)
    for name, block in results.COMPARE_FILES.items():
        body = results.blocks((root / block).read_text())[name][1]
        assert table in body and "SFT gold" in body
    # A second run reuses every finished folder.
    capsys.readouterr()
    assert trainer_main([*argv, "--progress", "false", "--ppo_steps", "2"]) == 0
    assert capsys.readouterr().out.count("nothing to do") == 3


def rows_of(result):
    return {r["algo"]: r for r in result["rows"]}


def test_compare_checks_every_algorithms_flags_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        trainer_main(["compare", "--preset", "micro", "--group_size", "3", "--out_dir", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "--algo grpo: --rollout_batch 16 must be a multiple of --group_size 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        trainer_main(["compare", "--algos", "ppo,sac"])
    assert "--algos must name algorithms among ppo" in capsys.readouterr().err


def test_the_ops_the_algorithms_use_exist():
    names = ("compute_advantages", "get_policy_loss", "rollout_correction", "dpo_loss", "simpo_loss")
    names += ("orpo_loss", "kto_loss", "ranking_hinge_loss", "broadcast_to_tokens", "bypass_mode_policy_loss")
    assert all(callable(getattr(rlhf_kernels, n)) for n in names)
