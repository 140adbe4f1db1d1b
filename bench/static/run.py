"""Recording every case's launches, and compiling each distinct specialisation once."""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import pkgutil
import traceback
from dataclasses import dataclass, field

import torch

from . import sm90
from .record import Launch, record_launches
from .workloads import FAMILIES, Case


@dataclass
class CaseResult:
    case: Case
    launches: list[Launch] = field(default_factory=list)
    glue: list[tuple[str, int]] = field(default_factory=list)
    error: str | None = None


def import_families() -> dict[str, str]:
    """Imports every ``rlhf_kernels.ops`` module (registering their ops); {module: error} of failures."""
    import rlhf_kernels.ops

    failures = {}
    for info in pkgutil.walk_packages(rlhf_kernels.ops.__path__, prefix="rlhf_kernels.ops."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # a family mid-refactor: report it, keep the others
            failures[info.name] = f"{type(exc).__name__}: {exc}"
    return failures


def defined_kernels() -> set[str]:
    """Names of the Triton kernels (``_*_kernel`` JITFunctions) the ``rlhf_kernels.ops`` modules define."""
    import sys

    from triton.runtime.jit import JITFunction

    import_families()
    names = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("rlhf_kernels.ops.") or module is None:
            continue
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel") and value.__module__ == name:
                names.add(attr)
    return names


def record(families: list[str] | None = None, ci_only: bool = False) -> list[CaseResult]:
    """Runs each case's op on fake CUDA tensors and records its launches (nothing runs)."""
    from .fake_device import fake_h200

    import_families()
    results = []
    with fake_h200():
        for family, make_cases in FAMILIES.items():
            if families and family not in families:
                continue
            try:
                cases = make_cases()
            except Exception as exc:
                results.append(CaseResult(Case(family, "?", "(cases)", tuple, None, 0), error=_error(exc)))
                continue
            for case in cases:
                if ci_only and not case.ci:
                    continue
                results.append(_record_case(case))
    return results


def _record_case(case: Case) -> CaseResult:
    from .traffic import count_glue

    result = CaseResult(case)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.settings.get("allow_tf32", tf32)
    try:
        with record_launches():  # inputs may come from other ops (a forward's partials): not recorded
            args = case.make()
        with record_launches() as launches, count_glue(result.glue):
            case.run(*args)
        result.launches = list(launches)
        if not launches:
            result.error = "no Triton launch recorded (did the op route to another backend?)"
    except Exception as exc:
        result.error = _error(exc)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return result


def _error(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1]
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line} ({os.path.basename(where.filename)}:{where.lineno})"


def _compile_one(launch: Launch) -> sm90.Compiled | str:
    try:
        return sm90.compile_launch(launch)
    except Exception as exc:
        return _error(exc) + "\n" + traceback.format_exc()[-2000:]


def _init_worker() -> None:
    sm90.prepare_environment()
    import_families()


def compile_unique(results: list[CaseResult], jobs: int) -> dict[tuple, sm90.Compiled | str]:
    """Compiles every distinct specialisation once; {Launch.key(): Compiled or an error message}."""
    unique: dict[tuple, Launch] = {}
    for result in results:
        for launch in result.launches:
            unique.setdefault(launch.key(), launch)
    if jobs <= 1:
        _init_worker()
        return {key: _compile_one(launch) for key, launch in unique.items()}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool:
        futures = {key: pool.submit(_compile_one, launch) for key, launch in unique.items()}
        return {key: future.result() for key, future in futures.items()}
