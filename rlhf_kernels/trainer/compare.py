"""``python -m rlhf_kernels.trainer compare``: every stage-3 algorithm on the embedded task, from one SFT
model and one set of reward models, with the same seed and the same rollout budget.

    python -m rlhf_kernels.trainer compare                      # preset tiny, every algorithm, runs/compare
    python -m rlhf_kernels.trainer compare --algos ppo,grpo,dpo --preset micro --out_dir /tmp/c
    python -m rlhf_kernels.trainer.results --compare runs/compare --write   # the README's table from it

The first algorithm runs the whole pipeline in ``<out_dir>/<algo>``; every other one gets a copy of its
``sft.pt`` and ``rm.pt`` and resumes from them (the checkpoints' identity leaves out the flags only stage 3
reads: rundir.STAGE3_ONLY), so all start from the same weights and are judged by the same reward models
and gold score.  Budget: every sampling algorithm (ppo, the critic-free ones, rrhf) stops once it has
generated ``--gen_token_budget`` response tokens (default ppo_steps × rollout_batch × target_len; at most
3 × ppo_steps steps of ``rollout_batch`` responses; remax's greedy baselines count); the preference
algorithms (no generation) take ``ppo_steps`` steps of ``rollout_batch`` pairs; best-of-N costs its
``eval_prompts × best_of_n`` samples.  A finished algorithm folder is reused (``--overwrite`` redoes all).

Writes ``compare.md`` (the table), ``compare.json`` (its numbers) and ``compare.png`` (gold of the rollouts
against generated tokens) into ``<out_dir>``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .algos import ALGORITHMS
from .checkpoint import RunDirError, checkpoint_paths
from .config import ConfigError, OneLineParser, TrainConfig, config_from_args
from .report import read_metrics, write_atomic, write_json

PROG = "python -m rlhf_kernels.trainer compare"
COLUMNS = (
    "algo",
    "gold",
    "gain",
    "rm_score",
    "kl",
    "wall_s",
    "tokens_per_s",
    "gen_tokens",
    "models",
)


def parse(argv: list[str]) -> tuple[TrainConfig, list[str]]:
    """(the base config, the algorithms) of ``compare``'s command line; exits 2 on a bad flag."""
    pre = OneLineParser(prog=PROG, add_help=False, allow_abbrev=False)
    pre.add_argument("--algos", default=",".join(ALGORITHMS))
    known, rest = pre.parse_known_args(argv)
    algos = [a.strip() for a in known.algos.split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown or not algos:
        pre.error(f"--algos must name algorithms among {', '.join(ALGORITHMS)}; got {known.algos!r}")
    if "--out_dir" not in rest:
        preset = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--preset"), "tiny")
        rest = [*rest, "--out_dir", f"runs/compare-{preset}" if preset != "tiny" else "runs/compare"]
    base = config_from_args(rest, PROG)
    if base.gen_token_budget == 0:
        base.gen_token_budget = default_budget(base)
    for algo in algos:  # every algorithm's flags are checked before any work
        problems = algorithm_config(base, algo, Path(base.out_dir)).problems()
        if problems:
            pre.exit(2, "".join(f"{PROG}: error: --algo {algo}: {line}\n" for line in problems))
    return base, algos


def default_budget(cfg: TrainConfig) -> int:
    """compare's generated-token budget unless --gen_token_budget is given: ppo_steps × rollout_batch ×
    target_len (tiny: 60 × 64 × 4 = 15,360 response tokens)."""
    return cfg.ppo_steps * cfg.rollout_batch * cfg.target_len


def algorithm_config(base: TrainConfig, algo: str, folder: Path) -> TrainConfig:
    """``base`` for ``algo``: the sampling algorithms stop at the token budget (within 3 × ppo_steps); the
    preference algorithms, which generate nothing, take ppo_steps steps of rollout_batch pairs."""
    sampling = ALGORITHMS[algo].family in ("ppo", "critic_free", "rrhf")
    return TrainConfig(
        **{
            **_fields(base),
            "algo": algo,
            "out_dir": str(folder),
            "overwrite": False,
            "ppo_steps": 3 * base.ppo_steps if sampling else base.ppo_steps,
            "gen_token_budget": base.gen_token_budget if sampling else 0,
        }
    )


def _fields(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def run(base: TrainConfig, algos: list[str]) -> dict:
    """Trains every algorithm (the first one from scratch, the others from its SFT and RM checkpoints);
    returns the comparison, also written as compare.{md,json,png} under ``base.out_dir``."""
    from .pipeline import train

    out = Path(base.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    rows, summaries = [], {}
    first = out / algos[0]
    for i, algo in enumerate(algos):
        folder = out / algo
        cfg = algorithm_config(base, algo, folder)
        if base.overwrite and folder.exists():
            shutil.rmtree(folder)
        started = time.perf_counter()
        if i == 0 or (folder / "summary.json").exists():
            summary = train(cfg)
        else:
            start_from(first, folder)
            cfg.resume = True
            summary = train(cfg)
        summaries[algo] = summary
        print(
            f"compare: {algo} done in {time.perf_counter() - started:.1f} s (gold {summary['ppo_gold']:.3f})"
        )
    for algo, s in summaries.items():
        rows.append(row_of(algo, s, summaries[algos[0]]))
    result = {
        "preset": base.preset,
        "seed": base.seed,
        "ppo_steps": base.ppo_steps,
        "gen_token_budget": base.gen_token_budget,
        "rollout_batch": base.rollout_batch,
        "group_size": base.group_size,
        "sft_gold": summaries[algos[0]]["sft_gold"],
        "rm_heldout_accuracy": summaries[algos[0]]["rm_heldout_accuracy"],
        "rows": rows,
        "wall_s": time.perf_counter() - wall,  # all of it, this process (reused folders take no time)
        "cpu_s": time.process_time() - cpu,
        "cpu_count": os.cpu_count(),
    }
    write_json(result, out / "compare.json")
    write_atomic(table(result), out / "compare.md")
    plot(result, {algo: out / algo / "metrics.jsonl" for algo in algos}, out / "compare.png")
    return result


def start_from(source: Path, folder: Path) -> None:
    """Copies ``source``'s sft.pt and rm.pt into ``folder`` (where absent): a run there with ``--resume``
    starts stage 3 from them."""
    paths, given = checkpoint_paths(folder), checkpoint_paths(source)
    for stage in ("sft", "rm"):
        if not paths[stage].exists():
            paths[stage].parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(given[stage], paths[stage])


def row_of(algo: str, s: dict, first: dict) -> dict:
    final = s["ppo_eval"]
    if algo == "best_of_n":  # no stage 3: its cost is the sampling of the evaluation (timed in stage 2)
        wall = first["timings_s"].get("best_of_n", math.nan)
        tokens_per_s = math.nan
    else:
        wall = s["stage3_s"]
        tokens_per_s = s["tokens_per_s"]
    models = s["models_in_memory"]
    return {
        "algo": algo,
        "gold": s["ppo_gold"],
        "gain": s["ppo_gold"] - s["sft_gold"],
        "rm_score": final.get("score"),
        "kl": final.get("kl"),
        "kl_is_bound": bool(final.get("kl_is_bound", False)),
        "wall_s": wall,
        "tokens_per_s": tokens_per_s,
        "gen_tokens": s["gen_tokens"],
        "models": models,
    }


def _models(m: dict) -> str:
    parts = [f"policy{'+ref' if m['reference'] else ''}"]
    if m["reward_models"]:
        parts.append(f"{m['reward_models']} RM")
    return f"{m['policy'] + m['reference'] + m['reward_models']} ({' + '.join(parts)})"


def _num(value, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(result: dict) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| algo | gold | vs SFT | RM score | KL to SFT (nats) | stage-3 wall s | tokens/s | generated tokens "
        "| models in memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        kl = ("≤ " if r["kl_is_bound"] else "") + _num(r["kl"], ".2f")
        lines.append(
            f"| {r['algo']} | {r['gold']:.3f} | {r['gain']:+.3f} | {_num(r['rm_score'], '.2f')} | {kl} "
            f"| {_num(r['wall_s'], '.1f')} | {_num(r['tokens_per_s'], '.0f')} | {r['gen_tokens']:,} "
            f"| {_models(r['models'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, metrics: dict[str, Path], path: Path) -> Path | None:
    """Gold of each step's rollouts against the generated tokens so far; the preference algorithms (no
    generation) and best-of-N as their final gold."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for r in result["rows"]:
        algo = r["algo"]
        records = (
            [x for x in read_metrics(metrics[algo]) if x.get("stage") == "ppo" and "gold" in x]
            if (metrics[algo].exists())
            else []
        )
        if records:
            ax.plot(
                [x["total_gen_tokens"] for x in records], [x["gold"] for x in records], lw=1.3, label=algo
            )
        elif algo == "best_of_n":
            ax.scatter([r["gen_tokens"]], [r["gold"]], marker="*", s=90, color="black", label=algo)
        else:
            ax.axhline(
                r["gold"],
                ls=":",
                lw=1.2,
                label=f"{algo} (final; no generation)",
                color=plt.cm.tab20(list(ALGORITHMS).index(algo)),
            )
    ax.axhline(result["sft_gold"], ls="--", lw=1, color="gray", label=f"SFT {result['sft_gold']:.2f}")
    ax.set_xlabel("generated tokens (stage 3)")
    ax.set_ylabel("gold score of the rollouts")
    ax.set_title(f"compare: preset {result['preset']}, seed {result['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str]) -> int:
    base, algos = parse(argv)
    try:
        result = run(base, algos)
    except ConfigError as exc:
        print("".join(f"{PROG}: error: {line}\n" for line in exc.problems), end="", file=sys.stderr)
        return 2
    except RunDirError as exc:
        print(f"{PROG}: error: {exc} (compare --overwrite redoes every algorithm)", file=sys.stderr)
        return 2
    print(table(result), end="")
    print(f"compare: {Path(base.out_dir) / 'compare.md'}, compare.json, compare.png")
    print(json.dumps({r["algo"]: round(r["gold"], 3) for r in result["rows"]}))
    return 0
