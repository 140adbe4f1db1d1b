"""One runner for every op family.

    python -m bench                      # every family, on CUDA when present, else the CPU paths
    python -m bench --families logprobs  # a subset
    python -m bench --cpu --quick        # CPU paths, shorter repeats and smaller shapes
    python -m bench --cold-l2            # flush L2 before every timed call (CUDA)
    python -m bench --budget 300         # at most 300 s: the time left is shared among the families left
    python -m bench --compile-baselines none   # no torch.compile peers (their compiles take minutes)

Each ``bench/bench_<family>.py`` exposes ``FAMILY`` and ``run(bench)``.  Rows go to
``bench/results/<device>-<date>.{csv,md}`` as each is measured (``--append`` continues existing files of
the same tag, e.g. one process per family), and a PNG chart at the end when matplotlib is installed.
A family that fails or runs out of its share of ``--budget`` is reported and skipped; the others run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from .harness import Bench, RowWriter, device_tag, md_preamble, measure_ceilings, read_rows

RESULTS = Path(__file__).resolve().parent / "results"
# --compile-baselines short: torch.compile of verl's GAE loop (one graph of T unrolled steps; its compile
# time grows with T) only up to this T.
SHORT_COMPILE_MAX_T = 128


class FamilyTimeout(Exception):
    pass


def family_modules() -> tuple[dict[str, object], dict[str, str]]:
    """({family: module}, {family: import error}): one family that fails to import costs only itself."""
    modules, errors = {}, {}
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        if info.name.startswith("bench_"):
            try:
                module = importlib.import_module(f"bench.{info.name}")
            except Exception as exc:
                errors[info.name[len("bench_") :]] = f"{type(exc).__name__}: {exc}"
                continue
            modules[module.FAMILY] = module
    return modules, errors


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raises FamilyTimeout in this (main) thread after ``seconds``; None: no limit."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise FamilyTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _apply_compile_baselines(mode: str, bench: Bench) -> None:
    bench.compile_baselines = mode != "none"
    if mode != "all":  # read by bench_gae at each case
        os.environ["RLHF_KERNELS_BENCH_COMPILE_MAX_T"] = "0" if mode == "none" else str(SHORT_COMPILE_MAX_T)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--families", default="", help="comma-separated families, run in this order (default: all)"
    )
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU paths even if CUDA is present")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes")
    parser.add_argument("--cold-l2", action="store_true", help="flush L2 before every timed call (CUDA)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--tag", default="", help="file-name tag (default: <device>-<date>)")
    parser.add_argument("--append", action="store_true", help="continue existing files of the same tag")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="wall-clock limit: each family gets the time left divided by the families left",
    )
    parser.add_argument(
        "--compile-baselines",
        choices=("all", "short", "none"),
        default="all",
        help=f"torch.compile peers: all; short (verl's GAE loop only up to T={SHORT_COMPILE_MAX_T}); none",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    modules, import_errors = family_modules()
    wanted = [f for f in args.families.split(",") if f] or sorted(modules)
    unknown = [f for f in wanted if f not in modules and f not in import_errors]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(modules)}")
    for family in [f for f in wanted if f in import_errors]:
        print(f"{family}: cannot be imported ({import_errors[family]}); skipped", flush=True)
    failed = [f for f in wanted if f in import_errors]
    wanted = [f for f in wanted if f in modules]

    ceilings = measure_ceilings(device)
    print(
        f"device {device}: copy {ceilings.copy_gbps:.0f} GB/s"
        + (f", bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s" if ceilings.matmul_tflops else ""),
        flush=True,
    )
    tag = args.tag or device_tag(device) + ("-quick" if args.quick else "")
    writer = RowWriter(args.out, tag, md_preamble(tag, device, ceilings, args.cold_l2), append=args.append)
    bench = Bench(device=device, ceilings=ceilings, cold_l2=args.cold_l2, quick=args.quick, writer=writer)
    _apply_compile_baselines(args.compile_baselines, bench)

    for i, family in enumerate(wanted):
        share = None
        if args.budget is not None:
            left = args.budget - (time.monotonic() - start)
            if left <= 1:
                print(f"{family}: skipped, the {args.budget:.0f} s budget is spent", flush=True)
                failed.append(family)
                continue
            share = left / (len(wanted) - i)
        family_start, rows_before = time.monotonic(), len(bench.rows)
        try:
            with time_limit(share):
                modules[family].run(bench)
        except FamilyTimeout:
            failed.append(family)
            print(
                f"{family}: stopped at its {share:.0f} s share; its {len(bench.rows) - rows_before} rows "
                "are written",
                flush=True,
            )
        except Exception:
            failed.append(family)
            traceback.print_exc()
            print(
                f"{family}: failed after {len(bench.rows) - rows_before} rows (written); continuing",
                flush=True,
            )
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        print(f"{family}: {time.monotonic() - family_start:.0f} s", flush=True)

    if not bench.rows:
        print("no results")
        return 1
    print(f"wrote {writer.csv_path} and {writer.md_path}")
    try:
        from .chart import write_chart

        rows = read_rows(writer.csv_path)  # with --append: every process's rows, not only this one's
        print(f"wrote {write_chart(rows, args.out / f'{tag}.png')}")
    except ImportError as exc:
        print(f"no chart ({exc})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
