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
        (
            ["--algo", "grpo", "--policy_loss", "gspo", "--fused_loss", "true"],
            "--policy_loss gspo cannot be fused (its ratio is per sequence)",
        ),
        (
            ["--algo", "rloo", "--policy_loss", "clip_cov", "--fused_loss", "true"],
            "--policy_loss clip_cov cannot be fused",
        ),
        (
            ["--algo", "rloo", "--policy_loss", "bypass_mode", "--fused_loss", "true"],
            "--policy_loss bypass_mode cannot be fused",
        ),
        (["--algo", "dpo", "--fused_loss", "true"], "--fused_loss applies to ppo and the critic-free"),
        (
            ["--algo", "grpo", "--rollout_rs", "token_k1", "--rollout_rs_threshold", "0.5"],
            "--rollout_rs token_k1 keeps ratios in [1/u, u]: --rollout_rs_threshold must be > 1; got 0.5",
        ),
        (["--algo", "dpo", "--rollout_rs", "seq_mean_k3"], "--rollout_rs applies to ppo and the critic-free"),
        (["--rollout_rs", "token_k9"], "--rollout_rs must be one of none, token_k1"),
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


# --------------------------------------------------------------------------------------------------
# --fused_loss: rlhf_kernels.linear_policy_loss in the trainer
# --------------------------------------------------------------------------------------------------
def _minibatch(cfg, model, B=6, seed=0):
    """A minibatch as the trainer slices it from a rollout: sampled responses of ``model``, perturbed old
    and reference log-probs (ratios away from 1, some clipped), random advantages, returns, IS weights."""
    from rlhf_kernels.trainer.model import generate

    gen = torch.Generator().manual_seed(seed)
    prompts = LabelerTask(cfg).sample_prompts(B, gen)
    responses, response_mask = generate(
        model, prompts.ids, prompts.mask, max_new_tokens=cfg.max_new_tokens, generator=gen
    )
    ids, mask = join(prompts, responses, response_mask)
    labels = response_labels(responses, response_mask)
    with torch.no_grad():
        out = model(ids, mask, labels, return_values=True)
    noise = lambda scale: torch.randn(labels.shape, generator=gen) * scale  # noqa: E731
    return dict(
        ids=ids,
        mask=mask,
        labels=labels,
        response_mask=response_mask,
        old_logprobs=torch.where(response_mask, out.logprobs + noise(0.3), 0.0),
        ref_logprobs=torch.where(response_mask, out.logprobs + noise(0.2), 0.0),
        old_values=out.values[:, -labels.shape[1] - 1 : -1] + noise(0.1),
        advantages=noise(1.0),
        returns=noise(1.0),
        is_weights=torch.rand(labels.shape, generator=gen) + 0.5,
    )


@pytest.mark.parametrize(
    "algo, overrides",
    [
        ("ppo", dict(clip_high=0.28, dual_clip=3.0)),
        ("grpo", dict(loss_agg="seq-mean-token-mean")),
        ("grpo", dict(policy_loss="cispo")),
        ("reinforce", dict(loss_agg="seq-mean-token-sum")),  # gpg
    ],
)
def test_fused_loss_gives_the_unfused_loss_terms_and_gradients(algo, overrides):
    """One minibatch from one state: ``--fused_loss`` (linear_policy_loss from the hidden states) against
    the log-probs path (lm_head → logprobs_from_logits → the policy loss, entropy, kl_loss): loss and every
    logged term within 1e-5 relative, every gradient within 1e-4 relative + 1e-6 of the largest (fp32 on
    CPU: both paths sum the same fp32 products in a different order, ~1e-7 per op, and the loss is a mean
    over a few hundred tokens; the gradients of the attention key bias are 0 in exact arithmetic — softmax
    ignores a shift — so both paths hold rounding noise there, hence the absolute part)."""
    from rlhf_kernels.trainer.critic_free import critic_free_loss, fused_critic_free_loss
    from rlhf_kernels.trainer.ppo import fused_loss_kwargs, ppo_loss

    cfg = make_config("micro", algo=algo, ent_coef=0.01, kl_loss_coef=0.1, rollout_is="token", **overrides)
    assert algorithm_problems(cfg) == []
    torch.manual_seed(0)
    model = PolicyValueModel(cfg)
    mb = _minibatch(cfg, model)
    ppo = algo == "ppo"
    default = {"ppo": "ppo", "reinforce": "gpg"}.get(algo, "vanilla")
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        kwargs = dict(policy_loss=fused_loss_kwargs(cfg, mb, default)) if fused else dict(return_entropy=True)
        out = model(mb["ids"], mb["mask"], mb["labels"], return_values=ppo, **kwargs)
        if ppo:
            loss, terms = ppo_loss(cfg, out, mb)
        elif fused:
            loss, terms = fused_critic_free_loss(cfg, out, mb, default)
        else:
            loss, terms = critic_free_loss(cfg, out.logprobs, out.entropy, mb, default)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: v.detach() for k, v in terms.items()}, grads))
    (loss, terms, grads), (fused_loss, fused_terms, fused_grads) = results
    assert list(fused_terms) == list(terms)  # the same metrics, in the same order
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-7)
    for key in terms:
        torch.testing.assert_close(fused_terms[key], terms[key], rtol=1e-5, atol=1e-7, msg=key)
    assert terms["kl_loss"] > 0 and terms["entropy"] > 0 and grads.keys() == fused_grads.keys()
    assert ("value_head.weight" in grads) == ppo
    largest = max(g.abs().max() for g in grads.values())
    for key in grads:
        torch.testing.assert_close(fused_grads[key], grads[key], rtol=1e-4, atol=1e-6 * largest, msg=key)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_fused_loss_step_updates_the_parameters_as_the_unfused_one(base, tmp_path, algo):
    """One PPO step (4 AdamW updates on 2 minibatches × 2 epochs) from the same SFT/reward state, with and
    without --fused_loss: the same rollout, the step's metrics within 5e-5 relative (+1e-7: approx_kl is a
    mean of near-cancelling terms) — the later minibatches start from parameters that already differ by
    the first update's rounding — and the parameter updates within 1e-3 of each tensor's largest update.
    Excluded: the attention key bias, whose gradient is 0 in exact arithmetic (so AdamW scales each path's
    rounding noise up to a step of order lr·|noise|/(|noise| + eps); its difference is bounded by lr)."""
    overrides = dict(algo=algo, ppo_steps=1, ent_coef=0.01, kl_loss_coef=0.1)
    if algo == "grpo":
        overrides["rollout_is"] = "token"
    _run_from(base, tmp_path / "plain", **overrides)
    _run_from(base, tmp_path / "fused", fused_loss=True, **overrides)
    (plain,), (fused,) = _records(tmp_path / "plain"), _records(tmp_path / "fused")
    assert plain.keys() == fused.keys()
    for key in plain.keys() - TIMING:
        if isinstance(plain[key], float):
            assert fused[key] == pytest.approx(plain[key], rel=5e-5, abs=1e-7), key
        else:
            assert fused[key] == plain[key], key
    for key in ("score", "gold", "kl", "tokens"):  # the rollout itself is the same code path: bit-identical
        assert fused[key] == plain[key]
    sft = ckpt.load(tmp_path / "plain" / "checkpoints" / "sft.pt")["model"]
    after = [ckpt.load(tmp_path / d / "checkpoints" / "ppo.pt")["policy"] for d in ("plain", "fused")]
    cfg = make_config("micro")
    D = cfg.d_model
    for key, start in sft.items():
        if not start.is_floating_point():
            continue
        moved_plain, moved_fused = after[0][key] - start, after[1][key] - start
        if key.endswith("attn.qkv.bias"):
            assert (moved_fused - moved_plain).abs().max() <= 2 * cfg.ppo_lr * 4  # 4 steps of at most ~lr
            keep = torch.ones(3 * D, dtype=torch.bool)
            keep[D : 2 * D] = False  # the key bias
            moved_plain, moved_fused = moved_plain[keep], moved_fused[keep]
        scale = moved_plain.abs().max()
        assert (moved_fused - moved_plain).abs().max() <= 1e-3 * scale, key


def test_a_fused_loss_run_resumes_bit_identically(base, tmp_path):
    """--fused_loss on the micro preset (grpo): halted after step 2, resumed, the same as uninterrupted."""
    full = _run_from(base, tmp_path / "full", algo="grpo", fused_loss=True, ent_coef=0.01)
    start_from(base[0], tmp_path / "cut")
    with pytest.raises(SystemExit, match="halted after PPO step 2"):
        train(
            _micro(
                tmp_path / "cut", resume=True, algo="grpo", fused_loss=True, ent_coef=0.01, halt_after_step=2
            )
        )
    cut = train(_micro(tmp_path / "cut", resume=True, algo="grpo", fused_loss=True, ent_coef=0.01))
    assert cut["resumed_from"] == "ppo" and math.isfinite(full["ppo_gold"])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    records = _records(tmp_path / "full")
    assert strip(_records(tmp_path / "cut")) == strip(records) and all("entropy" in r for r in records)
    weights = [ckpt.load(tmp_path / d / "checkpoints" / "ppo.pt")["policy"] for d in ("cut", "full")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --------------------------------------------------------------------------------------------------
# The Σπ² estimators and gdpo
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused_lm_head", [True, False])
def test_the_model_returns_sum_pi_squared_from_its_log_prob_pass(fused_lm_head):
    cfg = make_config("micro", fused_lm_head=fused_lm_head)
    torch.manual_seed(0)
    model = PolicyValueModel(cfg).eval()
    mb = _minibatch(cfg, model, B=5)
    with torch.no_grad():
        out = model(mb["ids"], mb["mask"], mb["labels"], temperature=0.7, return_sum_sq_probs=True)
        plain = model(mb["ids"], mb["mask"], mb["labels"], temperature=0.7)
        R = mb["labels"].shape[1]
        hidden = model.backbone(mb["ids"], mb["mask"])[:, -R - 1 : -1]
        probs = (model.lm_head(hidden).double() / 0.7).softmax(-1)
    expected = torch.where(mb["response_mask"], probs.square().sum(-1), 0.0)
    torch.testing.assert_close(out.sum_sq_probs.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.logprobs, plain.logprobs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["optimal_token_baseline", "tir_optimal_token_baseline", "gdpo"])
def test_the_sum_pi_squared_estimators_and_gdpo_train(base, tmp_path, estimator, monkeypatch):
    """The estimators that needed Σπ² (or one score per reward model) run on the micro preset, with the
    rollout's own inputs: Σπ² of the old-log-prob pass, the IS weights, the reward models' scores."""
    seen = {}
    original = rlhf_kernels.compute_advantages

    def recording(name, *args, **kwargs):
        seen[name] = kwargs
        return original(name, *args, **kwargs)

    monkeypatch.setattr(rlhf_kernels, "compute_advantages", recording)
    summary = _run_from(base, tmp_path, algo="grpo", adv_estimator=estimator, rollout_is="token", ppo_steps=2)
    assert math.isfinite(summary["ppo_gold"]) and len(_records(tmp_path)) == 2
    kwargs = seen[estimator]
    if estimator == "gdpo":
        scores = kwargs["reward_scores"]
        assert (
            scores.shape == (16, 2) and len(kwargs["reward_weights"]) == 2 and bool(scores.isfinite().all())
        )
        assert not torch.equal(scores[:, 0], scores[:, 1])  # two reward models, two components
    else:
        cfg = make_config("micro")
        sum_sq, old = kwargs["sum_pi_squared"], kwargs["old_log_probs"]
        assert old.shape == sum_sq.shape == (16, cfg.max_new_tokens)
        assert kwargs["rollout_is_weights"].shape == old.shape  # --rollout_is token reaches the estimator
        tokens = sum_sq > 0  # the response tokens (Σπ² is 0 at padded positions)
        assert int(tokens.sum()) >= 16 and bool((sum_sq[~tokens] == 0).all())
        # 1/V ≤ Σπ² ≤ 1 on the response tokens, and Σπ² ≥ π(label)².
        on = sum_sq[tokens]
        assert bool(((on >= 1 / cfg.vocab_size - 1e-6) & (on <= 1 + 1e-6)).all())
        assert bool((on + 1e-6 >= old[tokens].exp().square()).all())


# --------------------------------------------------------------------------------------------------
# --rollout_rs: rollout_correction's rejection
# --------------------------------------------------------------------------------------------------
def test_rollout_rejection_drops_the_rejected_tokens_from_the_loss(base, tmp_path, monkeypatch):
    """The generation's log-probs of every other response are shifted by 0.5 (|log ratio| 0.5 > log 1.5):
    ``--rollout_rs token_k1 --rollout_rs_threshold 1.5`` rejects exactly those responses' tokens, logs the
    fractions, and the step's loss is that of the kept half (it changes; without --rollout_is the shifted
    log-probs reach nothing else)."""
    from rlhf_kernels.trainer.ppo import PPOTrainer

    original = PPOTrainer.generate_rollout

    def shifted(self, step):
        prompts, responses, response_mask, logprobs = original(self, step)
        shift = torch.where(torch.arange(len(responses))[:, None] % 2 == 0, 0.5, 0.0)
        return prompts, responses, response_mask, torch.where(response_mask, logprobs + shift, 0.0)

    monkeypatch.setattr(PPOTrainer, "generate_rollout", shifted)
    _run_from(base, tmp_path / "plain", algo="grpo", ppo_steps=1)
    _run_from(
        base, tmp_path / "rs", algo="grpo", ppo_steps=1, rollout_rs="token_k1", rollout_rs_threshold=1.5
    )
    (plain,), (rs,) = _records(tmp_path / "plain"), _records(tmp_path / "rs")
    assert "rc_rollout_rs_masked_fraction" not in plain
    assert rs["rc_rollout_rs_seq_masked_fraction"] == 0.5
    assert 0.2 < rs["rc_rollout_rs_masked_fraction"] < 0.8
    assert rs["score"] == plain["score"] and rs["loss"] != plain["loss"]
