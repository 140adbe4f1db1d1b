"""One runner for every op family.

    python -m bench                      # every family, on CUDA when present, else the CPU paths
    python -m bench --families logprobs  # a subset
    python -m bench --cpu --quick        # CPU paths, shorter repeats and smaller shapes
    python -m bench --cold-l2            # flush L2 before every timed call (CUDA)

Each ``bench/bench_<family>.py`` exposes ``FAMILY`` and ``run(bench)``.  Results go to
``bench/results/<device>-<date>.{csv,md}`` (and a PNG chart when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

from .harness import Bench, device_tag, measure_ceilings

RESULTS = Path(__file__).resolve().parent / "results"


def family_modules() -> dict[str, object]:
    modules = {}
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        if info.name.startswith("bench_"):
            module = importlib.import_module(f"bench.{info.name}")
            modules[module.FAMILY] = module
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="", help="comma-separated families (default: all)")
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU paths even if CUDA is present")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes")
    parser.add_argument("--cold-l2", action="store_true", help="flush L2 before every timed call (CUDA)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--tag", default="", help="file-name tag (default: <device>-<date>)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    modules = family_modules()
    wanted = [f for f in args.families.split(",") if f] or sorted(modules)
    unknown = [f for f in wanted if f not in modules]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(modules)}")

    ceilings = measure_ceilings(device)
    print(f"device {device}: copy {ceilings.copy_gbps:.0f} GB/s"
          + (f", bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s" if ceilings.matmul_tflops else ""))
    bench = Bench(device=device, ceilings=ceilings, cold_l2=args.cold_l2, quick=args.quick)
    for family in wanted:
        modules[family].run(bench)
    if not bench.rows:
        print("no results")
        return 1
    tag = args.tag or device_tag(device) + ("-quick" if args.quick else "")
    csv_path, md_path = bench.write(args.out, tag)
    print(f"wrote {csv_path} and {md_path}")
    try:
        from .chart import write_chart

        print(f"wrote {write_chart(bench.rows, args.out / f'{tag}.png')}")
    except ImportError as exc:
        print(f"no chart ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
