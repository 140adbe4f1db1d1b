"""``python -m rlhf_kernels.trainer`` / ``rlhf-kernels train``: flags in, one line out for every refusal.

Exit status: 0 done, 2 a refusal before any work (a flag out of range, an output folder holding another
run, a corrupt checkpoint) or the NaN guard, 130 Ctrl-C (with the command that resumes).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from .checkpoint import RunDirError
from .config import ConfigError, config_from_args
from .pipeline import train
from .runtime import Interrupted, NonFiniteError

DEFAULT_PROG = "python -m rlhf_kernels.trainer"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or DEFAULT_PROG
    if argv[:1] == ["compare"]:  # every algorithm from one SFT and RM (compare.py)
        from .compare import main as compare_main

        return compare_main(argv[1:])
    cfg = config_from_args(argv, prog)
    age = process_age()  # the process is the CLI's: start-up and imports came before main
    try:
        train(cfg, process_started=None if age is None else time.perf_counter() - age)
    except ConfigError as exc:
        print("".join(f"{prog}: error: {line}\n" for line in exc.problems), end="", file=sys.stderr)
        return 2
    except (RunDirError, NonFiniteError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_message(exc, argv, prog), file=sys.stderr, flush=True)
        return 130
    return 0


def interrupted_message(exc: KeyboardInterrupt, argv: list[str], prog: str) -> str:
    where = exc.where if isinstance(exc, Interrupted) else "before the run started"
    kept = (
        f"the last checkpoint is {exc.checkpoint}"
        if getattr(exc, "checkpoint", None)
        else "no checkpoint yet"
    )
    return f"\ninterrupted during {where} ({kept}); resume with: {resume_command(argv, prog)}"


def resume_command(argv: list[str], prog: str) -> str:
    """The command line that continues this run: the same flags, --overwrite dropped, --resume added."""
    args, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--overwrite", "--resume"):
            # a bool flag may carry a value (--overwrite true): drop it too
            nxt = argv[i + 1] if i + 1 < len(argv) and "=" not in arg else ""
            skip = nxt.lower() in ("1", "0", "true", "false", "yes", "no", "on", "off")
            continue
        args.append(arg)
    if prog == DEFAULT_PROG:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        head = (
            ["torchrun", "--nproc_per_node", str(world), "-m", "rlhf_kernels.trainer"]
            if world > 1
            else [sys.executable, "-m", "rlhf_kernels.trainer"]
        )
    else:
        head = shlex.split(prog)
    return shlex.join([*head, *args, "--resume"])


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included); None where
    /proc is not available."""
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
