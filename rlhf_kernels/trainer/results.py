"""The documented figures of the default run, generated from a real run (never typed by hand).

    make demo                                                  # writes runs/tiny/summary.json
    python -m rlhf_kernels.trainer.results runs/tiny --write   # rewrites the blocks below from it
    python -m rlhf_kernels.trainer.results runs/tiny           # checks them (exit 1 on a difference)

The comparison of every algorithm (``python -m rlhf_kernels.trainer compare``, ``make compare``) has its own
blocks, ``README.md`` → ``compare-results`` (inserted after ``demo-results`` when absent) and
``docs/trainer.md`` → ``trainer-compare``, written from ``runs/compare/compare.json`` by
``python -m rlhf_kernels.trainer.results --compare runs/compare --write`` (without ``--write``: checked).
They are not checked by the test suite (the comparison takes minutes).

After a code change, redo the run first: ``python -m rlhf_kernels.trainer --overwrite`` (``make demo``
leaves a finished run of the same flags as it is).

Blocks, between ``<!-- BEGIN generated:NAME {...} -->`` and ``<!-- END generated:NAME -->``:
``README.md`` → ``demo-results`` (the table under "Quick start" and the paragraph after it),
``docs/trainer.md`` → ``trainer-results`` ("Results of a default run") and ``trainer-presets``.
The BEGIN line records the run's machine-dependent figures (timings, core count) as JSON: everything
else in a block follows from the code alone, which is what ``tests/test_trainer.py`` checks by running
the default configuration and rendering the blocks again (:func:`check`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

from .config import PRESET_NOTES, PRESETS, make_config, parse_reward_models
from .rundir import config_record, differences, identity_of

ROOT = Path(__file__).resolve().parents[2]  # the source checkout
FILES = {
    "demo-results": "README.md",
    "trainer-results": "docs/trainer.md",
    "trainer-presets": "docs/trainer.md",
}
# `compare`'s table (trainer/compare.py): README.md → compare-results, docs/trainer.md → trainer-compare.
COMPARE_FILES = {"compare-results": "README.md", "trainer-compare": "docs/trainer.md"}
COMPARE_COMMAND = "python -m rlhf_kernels.trainer.results --compare runs/compare --write"
MEASURED = ("cpu_count", "tokens_per_s", "wall_s", "startup_s", "timings_s")  # what depends on the machine
COMMAND = "python -m rlhf_kernels.trainer.results runs/tiny --write"
WIDTH = 105
_BLOCK = re.compile(
    r"<!-- BEGIN generated:(?P<name>[\w-]+) (?P<data>\{.*?\}) -->\n"
    r"(?P<body>.*?)<!-- END generated:(?P=name) -->\n",
    re.S,
)


def default_identity() -> dict:
    return identity_of(config_record(make_config("tiny"), "cpu", 1))


def _table(s: dict) -> str:
    return (
        f"| sft_gold | ppo_gold | best_of_n_gold (N={s['best_of_n']}) | rm_heldout_accuracy "
        "| final_kl (nats/response) | tokens/s | wall_s |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {s['sft_gold']:.3f} | {s['ppo_gold']:.3f} | {s['best_of_n_gold']:.3f} "
        f"| {s['rm_heldout_accuracy']:.3f} | {s['final_kl']:.2f} "
        f"| {s['tokens_per_s']:.0f} | {s['wall_s']:.1f} |\n"
    )


def _machine(s: dict) -> str:
    return f"a {s['cpu_count']}-core CPU shared with other jobs"


def _startup(s: dict) -> str:
    if s.get("startup_s") is None:
        return ""
    return (
        f" (the process also took {s['startup_s']:.1f} s to start: Python, torch and the trainer's imports)"
    )


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, WIDTH, break_on_hyphens=False, break_long_words=False) + "\n"


def render(name: str, s: dict) -> str:
    """The body of block ``name`` from the default run's summary ``s``."""
    if name == "trainer-presets":
        return render_presets()
    n, t = s["best_of_n"], s["timings_s"]
    if name == "demo-results":
        gain, best, labels = s["gold_gain"], s["best_of_n_gold"], s["rm_heldout_label_accuracy"]
        paragraph = (
            f"Gold is the hidden labeler rule itself (0–1): PPO raises it by {gain:+.3f} over the SFT policy "
            f"and beats best-of-{n} ({best:.3f}). `rm_heldout_accuracy` is the reward models' agreement with "
            "the true order on held-out comparisons (agreement with the noisy labels themselves: "
            f"{labels:.3f}). These figures are the same on every CPU run of `make demo` (seed 0; rendered "
            f"from its `runs/tiny/summary.json` by `{COMMAND}`; `tests/test_trainer.py` checks them against "
            f"the code), except tokens/s and wall_s, measured on {_machine(s)}{_startup(s)}. The first run "
            "on a machine also builds the C++ GAE extension (once; the trainer reports how long it took). "
            "The commands in this README and in `docs/` run inside the project's virtual environment: "
            "`. .venv/bin/activate` first, or prefix them with `.venv/bin/`. See "
            "[docs/trainer.md](docs/trainer.md)."
        )
        return "\n".join([_table(s), _wrap(paragraph)])
    if name != "trainer-results":
        raise KeyError(name)
    sft, ppo = s["sft_eval"], s["ppo_eval"]
    models = "; ".join(
        f"{m['aspect']} {m['heldout_accuracy']:.3f} (labels {m['heldout_label_accuracy']:.3f})"
        for m in s["reward_models"]
    )
    ppo_time = sum(v for k, v in t.items() if k.startswith("ppo_") or k == "checkpoint")
    introduction = (
        f"`make demo` (`python -m rlhf_kernels.trainer`: preset tiny, seed 0) on {_machine(s)}; the figures "
        f"below come from its `runs/tiny/summary.json` through `{COMMAND}`:"
    )
    quality = (
        f"PPO raises the gold score by {s['gold_gain']:+.3f} (helpfulness {sft['helpful']:.2f} → "
        f"{ppo['helpful']:.2f}, harmlessness {sft['harmless']:.2f} → {ppo['harmless']:.2f}, response length "
        f"{sft['response_len']:.1f} → {ppo['response_len']:.1f} tokens) and beats best-of-{n} "
        f"({s['best_of_n_gold']:.3f}), even the best-of-{n} a perfect reward model would pick "
        f"({s['best_of_n_oracle_gold']:.3f}). The demonstrations SFT learned from score "
        f"{s['demo_gold']:.3f}. "
        "Held-out pairwise accuracy of each reward model against the true order (and against the noisy "
        f"labels, whose noise caps it): {models}; the ensemble agrees with the noisy labels on "
        f"{s['rm_heldout_label_accuracy']:.3f} of held-out pairs."
    )
    time = (
        f"Where the time went (s): SFT {t['sft']:.1f}, reward models {t['reward_model']:.1f} "
        f"(+{t['reward_model_eval']:.1f} evaluation), SFT and PPO evaluations "
        f"{t['eval_sft'] + t['eval_ppo']:.1f}, best-of-{n} {t['best_of_n']:.1f}, PPO {ppo_time:.1f} "
        f"(update {t['ppo_update']:.1f}, score {t['ppo_score']:.1f}, generate {t['ppo_generate']:.1f}, "
        f"advantages {t['ppo_advantages']:.1f}, checkpoints {t['checkpoint']:.1f}); the run took "
        f"{s['wall_s']:.1f} s{_startup(s)}. PPO processed {s['tokens_per_s']:.0f} tokens/s (prompt and "
        "response tokens of the rollouts per second of the PPO stage). Only the timings depend on the "
        "machine: the other figures are the same on every CPU run of this command, and "
        "`tests/test_trainer.py` fails when they no longer match the code."
    )
    return "\n".join([_wrap(introduction), _table(s), _wrap(quality), _wrap(time)])


def render_presets() -> str:
    lines = []
    for name in PRESETS:
        c = make_config(name)
        n_rm = len(parse_reward_models(c.reward_models))
        lines.append(
            f"- `{name}`{' (default)' if name == 'tiny' else ''}: {c.n_layer} layer{'s' * (c.n_layer > 1)} × "
            f"{c.d_model} wide, "
            f"{c.n_head} heads, vocabulary {c.vocab_size}, {c.sft_steps} SFT steps of {c.sft_batch}, {n_rm} "
            f"reward models × {c.rm_steps} steps, {c.ppo_steps} PPO steps of {c.rollout_batch} rollouts, "
            f"{c.ppo_epochs} epochs of minibatch {c.minibatch} — {PRESET_NOTES[name]}.\n"
        )
    return "".join(lines)


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def blocks(text: str) -> dict[str, tuple[dict, str]]:
    """{name: (recorded measurements, body)} of the generated blocks in ``text``."""
    return {m["name"]: (json.loads(m["data"]), m["body"]) for m in _BLOCK.finditer(text)}


def _replace(text: str, name: str, data: dict, body: str) -> str:
    begin = f"<!-- BEGIN generated:{name} {json.dumps(data, separators=(',', ':'))} -->\n"
    block = begin + body + f"<!-- END generated:{name} -->\n"
    new, count = _BLOCK.subn(lambda m: block if m["name"] == name else m[0], text)
    if count == 0 or name not in blocks(new):
        raise ValueError(f"no generated:{name} block to replace")
    return new


def load_run(run_dir: Path) -> dict:
    """The summary of a default run in ``run_dir`` (ValueError for another configuration)."""
    config = json.loads((run_dir / "config.json").read_text())
    diff = differences(identity_of(config), default_identity())
    if diff:
        raise ValueError(f"{run_dir} is not a run of the default configuration on the CPU ({diff})")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("resumed_from"):
        raise ValueError(f"{run_dir} was resumed: its timings cover only the last process; rerun it whole")
    return summary


def check(summary: dict, root: Path = ROOT) -> list[str]:
    """Differences between the documented blocks and ``summary`` rendered with the documented
    measurements (empty when the documentation matches the code)."""
    problems = []
    for name, file in FILES.items():
        found = blocks((root / file).read_text()).get(name)
        if found is None:
            problems.append(f"{file}: no generated:{name} block")
            continue
        measured, body = found
        expected = render(name, {**summary, **{k: v for k, v in measured.items() if k in MEASURED}})
        if body != expected:
            problems.append(
                f"{file}: generated:{name} differs from the code's run:\n{expected}\nvs documented:\n{body}"
            )
    return problems


def write(summary: dict, root: Path = ROOT) -> None:
    measured = {k: _rounded(summary.get(k)) for k in MEASURED}
    for name, file in FILES.items():
        path = root / file
        data = {} if name == "trainer-presets" else measured
        path.write_text(_replace(path.read_text(), name, data, render(name, {**summary, **measured})))


def load_compare(run_dir: Path) -> dict:
    """The comparison in ``run_dir`` (compare.json), checked to be the default one (preset tiny, seed 0,
    every algorithm, the default flags)."""
    from .algos import ALGORITHMS
    from .compare import default_budget

    result = json.loads((run_dir / "compare.json").read_text())
    default = make_config("tiny")
    expected = {"preset": "tiny", "seed": 0, "ppo_steps": default.ppo_steps}
    expected["gen_token_budget"] = default_budget(default)
    diff = {k: result.get(k) for k, v in expected.items() if result.get(k) != v}
    algos = [r["algo"] for r in result["rows"]]
    if diff or algos != list(ALGORITHMS):
        raise ValueError(f"{run_dir} is not the default comparison (differs in {diff or 'its algorithms'})")
    config = json.loads((run_dir / algos[0] / "config.json").read_text())
    identity = identity_of({**config, "algo": "ppo"})
    differ = differences(
        {k: v for k, v in identity.items() if k not in ("gen_token_budget",)},
        {k: v for k, v in default_identity().items() if k not in ("gen_token_budget",)},
    )
    if differ:
        raise ValueError(f"{run_dir} ran with other flags than the default ({differ})")
    return result


def render_compare(name: str, result: dict) -> str:
    """The body of block ``name`` (README.md or docs/trainer.md) from ``compare.json``."""
    from .compare import table

    rows = {r["algo"]: r for r in result["rows"]}
    worse = [a for a, r in rows.items() if r["gain"] <= 0]
    best = max(rows.values(), key=lambda r: r["gold"])
    intro = (
        "`make compare` (`python -m rlhf_kernels.trainer compare`: preset tiny, seed 0, one SFT model and "
        f"one pair of reward models for all; SFT gold {result['sft_gold']:.3f}, reward ensemble held-out "
        f"accuracy {result['rm_heldout_accuracy']:.3f}). Every sampling algorithm stops at "
        f"{result['gen_token_budget']:,} generated response tokens; the preference algorithms take "
        f"{result['ppo_steps']} steps of {result['rollout_batch']} pairs and generate nothing; best-of-N's "
        f"cost is its evaluation samples. Rendered from `runs/compare/compare.json` by `{COMPARE_COMMAND}`:"
    )
    outro = (
        f"Best gold: {best['algo']} ({best['gold']:.3f}). "
        + (
            "Every algorithm improves gold over SFT with its default settings."
            if not worse
            else f"Not above SFT with the default settings: {', '.join(worse)} (see docs/trainer.md)."
        )
        + " KL is Σ_t log π/π_SFT per response on the evaluation prompts (best-of-N: the analytic bound "
        "log N − (N−1)/N). Wall time and tokens/s are stage 3's alone, measured on a "
        f"{result.get('cpu_count', '?')}-core CPU shared with other jobs (the whole comparison: "
        f"{_minutes(result.get('wall_s'))} of wall time, {_minutes(result.get('cpu_s'))} of CPU time); the "
        "other columns depend only on the code and the seed. The gold of every rollout against the "
        "generated tokens is `runs/compare/compare.png`."
    )
    return "\n".join([_wrap(intro), table(result), _wrap(outro)])


def _minutes(seconds) -> str:
    return "not recorded" if seconds is None else f"{seconds / 60:.1f} min"


def write_compare(result: dict, root: Path = ROOT) -> None:
    """Writes the comparison's blocks; README.md's is inserted after the demo-results block when absent."""
    for name, file in COMPARE_FILES.items():
        path = root / file
        text = path.read_text()
        body = render_compare(name, result)
        if name not in blocks(text):
            end = "<!-- END generated:demo-results -->\n"
            if end not in text:
                raise ValueError(f"{file}: no generated:{name} block, nor a demo-results block to follow")
            empty = f"\n<!-- BEGIN generated:{name} {{}} -->\n<!-- END generated:{name} -->\n"
            text = text.replace(end, end + empty, 1)
        path.write_text(_replace(text, name, {}, body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_kernels.trainer.results", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "run_dir", type=Path, help="the output folder of a default run (make demo: runs/tiny)"
    )
    parser.add_argument("--write", action="store_true", help="rewrite the blocks (default: check them)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout holding README.md and docs/")
    parser.add_argument(
        "--compare", action="store_true", help="run_dir is a `compare` output folder (runs/compare)"
    )
    args = parser.parse_args(argv)
    if args.compare:
        try:
            result = load_compare(args.run_dir)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.write:
            write_compare(result, args.root)
            print(f"wrote {', '.join(sorted(set(COMPARE_FILES.values())))} from {args.run_dir}")
            return 0
        problems = [
            f"{file}: generated:{name} differs from {args.run_dir}"
            for name, file in COMPARE_FILES.items()
            if blocks((args.root / file).read_text()).get(name, ({}, ""))[1] != render_compare(name, result)
        ]
        print("\n".join(problems) if problems else "the documented comparison matches the run")
        return 1 if problems else 0
    try:
        summary = load_run(args.run_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.write:
        write(summary, args.root)
        print(f"wrote {', '.join(sorted(set(FILES.values())))} from {args.run_dir}")
        return 0
    problems = check(summary, args.root)
    print("\n".join(problems) if problems else "the documented figures match the run")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
