"""What ``import rlhf_kernels`` costs on top of ``import torch``, in fresh interpreters.

    python -m bench.import_time [--repeats 7]

Each case runs in its own ``python -c`` process (so nothing is cached in the interpreter), ``repeats``
times, and reports the median wall time of the statements after ``import torch``, measured inside the
process with ``time.perf_counter``:

    import rlhf_kernels               the package (every family's module is imported on first use)
    + first op (CPU)                  the package, then one CPU call of ``kl_penalty``: imports that
                                      family's module, registers its ops, runs the PyTorch path
    + every family                    the package, then every public name resolved (all families)

and whether ``torch._dynamo`` / ``torch._inductor`` were imported by then: on a machine without CUDA
nothing imports them until something is compiled (``rlhf_kernels._registration``).  For the breakdown
by module, run ``python -X importtime -c "import rlhf_kernels"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys, time
import torch
start = time.perf_counter()
{statements}
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "dynamo": "torch._dynamo" in sys.modules,
                  "inductor": "torch._inductor" in sys.modules}}))
"""

CASES = {
    "import rlhf_kernels": "import rlhf_kernels",
    "+ first op (CPU)": (
        "import rlhf_kernels as rk\n"
        "x = torch.randn(4, 8)\n"
        "rk.kl_penalty(x, x.flip(0), 'k3')"
    ),
    "+ every family": "import rlhf_kernels as rk\nfor name in rk.__all__: getattr(rk, name)",
}


def measure(statements: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE.format(statements=statements)],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "median_s": statistics.median(r["seconds"] for r in runs),
        "min_s": min(r["seconds"] for r in runs),
        "dynamo": any(r["dynamo"] for r in runs),
        "inductor": any(r["inductor"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.import_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print("| after `import torch` | median s | min s | torch._dynamo imported | torch._inductor imported |")
    print("|---|---|---|---|---|")
    for name, statements in CASES.items():
        r = measure(statements, args.repeats)
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['dynamo']} | {r['inductor']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
