"""``python -m bench.static``: compile every Triton kernel at its real launch configurations for sm_90.

    python -m bench.static                       # all cases -> bench/results/static-sm90.md
    python -m bench.static --ci --check          # the CI subset; exit 1 on a spill or exceeded budget
    python -m bench.static --json out.json       # also the rows as JSON (for --compare)
    python -m bench.static --compare other.json  # add another run's registers/spills (e.g. Triton 3.6)
    python -m bench.static --compile-launches F  # compile launches pickled by tests/gpu_smoke.py, timed

To compare with the GPU machine's Triton 3.6 here: ``pip install --no-deps --target /tmp/triton36
triton==3.6.0`` and run with ``PYTHONPATH=/tmp/triton36:.`` and ``--json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.static",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--families", default="", help="comma-separated families (default: all)")
    parser.add_argument(
        "--ci", action="store_true", help="only the CI subset of cases (see workloads.Case.ci)"
    )
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (default: bench/results/static-sm90.md; none with --ci)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--compare", type=Path, default=None, help="JSON of another run to show alongside")
    parser.add_argument(
        "--compile-launches",
        type=Path,
        default=None,
        metavar="PICKLE",
        help="compile the launches in PICKLE (tests/gpu_smoke.py --count-specializations) "
        "one after another, as a test run would, and report the time",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a case fails, a kernel fails to compile, spills or exceeds its budget",
    )
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # kernels must be JITFunctions here
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call(
            [sys.executable, "-m", "bench.static", *(argv if argv is not None else sys.argv[1:])], env=env
        )

    from . import report as report_module
    from . import run, sm90, sweep

    sm90.prepare_environment()
    if args.compile_launches:
        return _compile_launches(args.compile_launches)
    families = [f for f in args.families.split(",") if f] or None
    start = time.perf_counter()
    import_errors = run.import_families()
    results = run.record(families, ci_only=args.ci)
    n_launch = sum(len(r.launches) for r in results)
    print(
        f"recorded {n_launch} launches from {len(results)} cases in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    start = time.perf_counter()
    compiled = run.compile_unique(results, args.jobs)
    print(f"compiled {len(compiled)} specialisations in {time.perf_counter() - start:.1f} s", flush=True)
    report = report_module.build(results, compiled)
    report.import_errors = import_errors
    if not args.ci and (families is None or "linear_logprobs" in families):
        fwd = [s for s in report.specs if s.kernel == "_linear_logprobs_fwd_kernel" and not s.error]
        report.sweep = sweep.fused_head_sweep(fwd[0].ctas_per_sm if fwd else 1)

    for s in report.specs:
        status = "ok" if s.ok else ("COMPILE FAILED" if s.error else "SPILLS" if s.spills else "OVER BUDGET")
        print(
            f"{status:>14}  {s.id:34} {s.label:60} regs {s.regs:3} / {s.budget}  spill {s.spill_stores}/"
            f"{s.spill_loads}  smem {s.shared}  {s.ctas_per_sm} CTAs/SM  {s.seconds:.1f} s"
            + (f"  {s.error}" if s.error else "")
        )
    for c in report.cases:
        if c.error:
            print(f"  CASE FAILED  {c.family} {c.op} {c.label}: {c.error}")
    for module, error in import_errors.items():
        print(f"IMPORT FAILED  {module}: {error}")

    if args.json:
        args.json.write_text(report.to_json())
        print(f"wrote {args.json}")
    out = args.out or (None if args.ci or families else RESULTS / "static-sm90.md")
    if out:
        compare = report_module.Report.from_json(args.compare.read_text()) if args.compare else None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report_module.markdown(report, compare))
        print(f"wrote {out}")
    if args.check:
        bad = [s for s in report.specs if not s.ok] + [c for c in report.cases if c.error]
        uncovered = sorted(run.defined_kernels() - {s.kernel for s in report.specs}) if not families else []
        for kernel in uncovered:
            print(f"  NOT COVERED  {kernel}: no case in bench/static/workloads.py launches it")
        if bad or import_errors or uncovered:
            print(
                f"static check failed: {len(bad)} problems, {len(uncovered)} kernels not covered, "
                f"{len(import_errors)} import errors"
            )
            return 1
        print("static check passed")
    return 0


def _compile_launches(path: Path) -> int:
    """Compiles pickled launches serially (a pytest run compiles one at a time) and reports the time."""
    import pickle

    from . import run, sm90

    run.import_families()
    launches = pickle.loads(path.read_bytes())
    by_kernel: dict[str, list[float]] = {}
    start = time.perf_counter()
    failed = 0
    for launch in launches:
        try:
            by_kernel.setdefault(launch.kernel, []).append(sm90.compile_launch(launch).seconds)
        except Exception as exc:
            failed += 1
            print(f"{launch.kernel}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    total = time.perf_counter() - start
    for kernel, times in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1])):
        print(f"{kernel:34} {len(times):3} specialisations  {sum(times):6.1f} s  (max {max(times):.1f} s)")
    n = sum(len(t) for t in by_kernel.values())
    print(
        f"{n} specialisations compiled for sm_90 in {total:.1f} s ({total / max(n, 1):.2f} s each), "
        f"{failed} failed; Triton {report_version()}"
    )
    return 1 if failed else 0


def report_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
