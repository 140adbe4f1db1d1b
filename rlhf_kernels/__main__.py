"""The ``rlhf-kernels`` command.

rlhf-kernels train [trainer flags]   # the end-to-end RLHF trainer (python -m rlhf_kernels.trainer)
rlhf-kernels bench [bench flags]     # the benchmark runner (python -m bench), from a source checkout
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = "usage: rlhf-kernels {train,bench} [options]   (rlhf-kernels train --help for the trainer's flags)"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from .trainer import main as train_main

        return train_main(rest, prog="rlhf-kernels train")
    if command == "bench":
        bench_main = _bench_main()
        if bench_main is None:
            print(
                "rlhf-kernels bench needs the repository's bench/ package (an editable install or a source "
                "checkout as the working directory)",
                file=sys.stderr,
            )
            return 2
        return bench_main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


def _bench_main():
    """bench.__main__.main, found on sys.path, in the working directory or next to this package (an
    editable install's checkout); None when there is no bench/ package."""
    for root in (None, Path.cwd(), Path(__file__).resolve().parents[1]):
        if root is not None:
            if not (root / "bench" / "__main__.py").is_file():
                continue
            sys.path.insert(0, str(root))
        try:
            from bench.__main__ import main
        except ImportError:
            continue
        return main
    return None


if __name__ == "__main__":
    sys.exit(main())
