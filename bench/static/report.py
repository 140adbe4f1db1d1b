"""Results of a static run: rows per compiled specialisation and per case, JSON and the markdown report."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from . import sm90
from .budgets import budget_for
from .record import Launch, TensorArg, kernel_function, specialise
from .workloads import SHORT


@dataclass
class SpecRow:
    id: str  # kernel#n
    key: str  # stable hash of the specialisation (the same across Triton versions)
    family: str
    kernel: str
    label: str  # pointer dtypes and constexprs
    num_warps: int = 0
    num_stages: int = 0
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    ctas_per_sm: int = 0
    warps_per_sm: int = 0
    limiter: str = ""
    budget: int | None = None
    budget_reason: str = ""
    fp64: bool = False
    ci: bool = False
    seconds: float = 0.0
    error: str = ""
    cases: list[str] = field(default_factory=list)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def over_budget(self) -> bool:
        return self.budget is None or self.regs > self.budget

    @property
    def ok(self) -> bool:
        return not self.error and not self.spills and not self.over_budget


@dataclass
class LaunchRow:
    spec: str  # SpecRow.id
    grid: tuple[int, int, int]
    programs: int
    waves: float
    last_wave: float
    bytes: int  # distinct tensor arguments, each once


@dataclass
class CaseRow:
    family: str
    op: str
    label: str
    min_bytes: int
    glue_bytes: int = 0
    error: str = ""
    launches: list[LaunchRow] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.glue_bytes + sum(launch.bytes for launch in self.launches)


@dataclass
class Report:
    triton: str
    ptxas: str
    torch: str
    date: str
    specs: list[SpecRow]
    cases: list[CaseRow]
    import_errors: dict[str, str] = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        specs = [SpecRow(**row) for row in data.pop("specs")]
        cases = []
        for row in data.pop("cases"):
            launches = [LaunchRow(**launch) for launch in row.pop("launches")]
            cases.append(CaseRow(**row, launches=launches))
        return cls(**data, specs=specs, cases=cases)


def stable_key(launch: Launch) -> str:
    return hashlib.sha1(repr(launch.key()).encode()).hexdigest()[:12]


def _short(value) -> str:
    if isinstance(value, torch.dtype):
        return SHORT.get(value, str(value))
    name = getattr(value, "name", None)  # triton.language dtypes
    return {"fp32": "fp32", "fp64": "fp64"}.get(name, name) if name else repr(value)


def spec_label(launch: Launch) -> str:
    """'bf16,i64→fp32 BLOCK_V=4096 HAS_ENTROPY ACC=fp32': pointer dtypes, then constexprs."""
    names = kernel_function(launch.module, launch.kernel).arg_names
    dtypes: list[str] = []
    for value in launch.values:
        if isinstance(value, TensorArg) and _short(value.dtype) not in dtypes:
            dtypes.append(_short(value.dtype))
    _, constexprs, _, _ = specialise(launch)
    flags = []
    for (index,), value in sorted(constexprs.items()):
        name = names[index]
        if not name.isupper() and not name.startswith(("HAS_", "BLOCK_")):
            continue  # specialised runtime values (a stride of 1) are in the key, not the label
        if value is True:
            flags.append(name)
        elif value is not False and value is not None:
            flags.append(f"{name}={_short(value)}")
    return ",".join(dtypes) + " " + " ".join(flags)


def named_constexprs(launch: Launch) -> dict:
    """{parameter name: value} of the launch's constexprs."""
    names = kernel_function(launch.module, launch.kernel).arg_names
    return {names[index]: value for (index,), value in specialise(launch)[1].items()}


def launch_bytes(launch: Launch) -> int:
    seen = {}
    for _, arg in launch.tensors():
        seen[(arg.storage, arg.offset_bytes, arg.shape, arg.stride)] = arg.nbytes
    return sum(seen.values())


def build(results, compiled: dict, ci_keys: set | None = None) -> Report:
    """Report rows from run.record's results and run.compile_unique's output."""
    specs: dict[tuple, SpecRow] = {}
    counters: dict[str, int] = {}
    cases = []
    for result in results:
        case = result.case
        row = CaseRow(
            case.family,
            case.op,
            case.label,
            case.min_bytes,
            sum(b for _, b in result.glue),
            result.error or "",
        )
        for launch in result.launches:
            key = launch.key()
            spec = specs.get(key)
            if spec is None:
                counters[launch.kernel] = counters.get(launch.kernel, 0) + 1
                fp64 = any(isinstance(v, TensorArg) and v.dtype == torch.float64 for v in launch.values)
                budget = budget_for(launch.kernel, fp64, named_constexprs(launch))
                spec = SpecRow(
                    f"{launch.kernel}#{counters[launch.kernel]}",
                    stable_key(launch),
                    case.family,
                    launch.kernel,
                    spec_label(launch),
                    fp64=fp64,
                    budget=budget.registers if budget else None,
                    budget_reason=budget.reason if budget else "no budget set in bench/static/budgets.py",
                )
                done = compiled.get(key)
                if isinstance(done, sm90.Compiled):
                    occupancy = sm90.occupancy(done.regs, done.num_warps, done.shared)
                    spec.num_warps, spec.num_stages = done.num_warps, done.num_stages
                    spec.regs, spec.spill_stores, spec.spill_loads = (
                        done.regs,
                        done.spill_stores,
                        done.spill_loads,
                    )
                    spec.stack, spec.shared, spec.seconds = done.stack, done.shared, round(done.seconds, 2)
                    spec.ctas_per_sm, spec.warps_per_sm = occupancy.ctas_per_sm, occupancy.warps_per_sm
                    spec.limiter = occupancy.limiter
                else:
                    spec.error = (done or "not compiled").splitlines()[0]
                specs[key] = spec
            spec.ci = spec.ci or case.ci
            if f"{case.op} {case.label}" not in spec.cases:
                spec.cases.append(f"{case.op} {case.label}")
            waves, last = sm90.waves(launch.programs, spec.ctas_per_sm)
            row.launches.append(
                LaunchRow(
                    spec.id,
                    launch.grid,
                    launch.programs,
                    round(waves, 3),
                    round(last, 3),
                    launch_bytes(launch),
                )
            )
        cases.append(row)
    return Report(
        sm90_triton_version(),
        sm90.ptxas_version(),
        torch.__version__,
        time.strftime("%Y-%m-%d"),
        list(specs.values()),
        cases,
    )


def sm90_triton_version() -> str:
    import triton

    return triton.__version__


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------
def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n / 1e3:.3g} kB"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}".rstrip("0").rstrip(".")


def markdown(report: Report, compare: Report | None = None) -> str:
    out = []
    w = out.append
    spilled = [s for s in report.specs if s.spills]
    over = [s for s in report.specs if not s.error and s.over_budget]
    failed = [s for s in report.specs if s.error]
    w("# Static kernel report: sm_90 (H100 / H200), compiled without a GPU\n")
    w(
        f"Generated by `python -m bench.static` on {report.date}: Triton {report.triton} "
        f"(ptxas {report.ptxas}), torch {report.torch}. "
        'Target `GPUTarget("cuda", 90, 32)` (Triton emits sm_90a); occupancy and waves '
        f"for {sm90.SMS} SMs. The GPU machine runs Triton 3.6"
        + (
            f"; its figures are in the last columns (Triton {compare.triton}, ptxas {compare.ptxas})."
            if compare
            else "."
        )
        + "\n"
    )
    w(
        "How: every case below calls a public function (forwards) or a registered backward op on *fake* "
        "CUDA tensors of the real shapes (`bench/static/workloads.py`); Triton's launch is intercepted, so "
        "the kernels, constexprs, warps, stages and grids are the launchers' own. Each distinct "
        "specialisation is compiled once with `triton.compile` (Triton's own argument specialisation); "
        "`ptxas -v` gives registers and spills, the compiled metadata the shared memory. See "
        "`bench/static/__init__.py` for the method and its limits, and `docs/gpu.md` for what the findings "
        "mean and what was done about them.\n"
    )
    w("## Summary\n")
    n_launch = sum(len(c.launches) for c in report.cases)
    w(
        f"- {len(report.cases)} cases, {n_launch} launches, {len(report.specs)} distinct specialisations; "
        f"{len(failed)} failed to compile, {len(spilled)} spill, {len(over)} over their register budget."
    )
    if spilled:
        w(
            "- Spills: "
            + "; ".join(
                f"`{s.id}` {s.label} ({s.spill_stores} B stores / {s.spill_loads} B loads)" for s in spilled
            )
            + "."
        )
    if over:
        w("- Over budget: " + "; ".join(f"`{s.id}` {s.regs} > {s.budget}" for s in over) + ".")
    errors = [c for c in report.cases if c.error]
    for c in errors:
        w(f"- Case not recorded: {c.family} `{c.op}` {c.label}: {c.error}")
    for module, error in report.import_errors.items():
        w(f"- Import failed: `{module}`: {error}")
    if compare:
        c_spill = [s for s in compare.specs if s.spills]
        c_over = [s for s in compare.specs if not s.error and s.over_budget]
        w(
            f"- Triton {compare.triton}: {len(c_spill)} spill"
            + (
                " (" + "; ".join(f"`{s.kernel}` {s.label}: {s.spill_stores} B" for s in c_spill) + ")"
                if c_spill
                else ""
            )
            + f", {len(c_over)} over budget"
            + (
                " (" + "; ".join(f"`{s.kernel}` {s.label}: {s.regs} > {s.budget}" for s in c_over) + ")"
                if c_over
                else ""
            )
            + "."
        )
    w("")

    w("## Specialisations\n")
    w(
        "Registers per thread, spill stores/loads (bytes per thread), shared memory per CTA, resident CTAs "
        "and warps per SM and what limits them. Budget: `bench/static/budgets.py` (reasons below); CI: "
        "compiled by `tests/test_static.py`.\n"
    )
    other = {s.key: s for s in compare.specs} if compare else {}
    head = (
        "| spec | dtypes and constexprs | warps | stages | regs | budget | spill B | smem KiB | CTAs/SM "
        "| warps/SM | limiter | CI |"
    )
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|:-:|"
    if compare:
        head += f" regs {compare.triton} | spill {compare.triton} |"
        rule += "---:|---:|"
    w(head)
    w(rule)
    for s in report.specs:
        if s.error:
            w(
                f"| `{s.id}` | {s.label} | | | | | | | | | compile failed: {s.error} | |"
                + (" | |" if compare else "")
            )
            continue
        flag = " ⚠" if s.over_budget else ""
        spill = f"**{s.spill_stores}/{s.spill_loads}**" if s.spills else "0"
        line = (
            f"| `{s.id}` | {s.label} | {s.num_warps} | {s.num_stages} | {s.regs}{flag} | {s.budget or '—'} | "
            f"{spill} | {_kib(s.shared)} | {s.ctas_per_sm} | {s.warps_per_sm} | {s.limiter} | "
            f"{'✓' if s.ci else ''} |"
        )
        if compare:
            o = other.get(s.key)
            if o is None or o.error:
                line += " — | — |"
            else:
                o_flag = " ⚠" if o.budget is not None and o.regs > o.budget else ""
                line += (
                    f" {o.regs}{o_flag} | "
                    + (f"**{o.spill_stores}/{o.spill_loads}**" if o.spills else "0")
                    + " |"
                )
        w(line)
    w("")

    w("## Cases: grids, waves and bytes\n")
    w(
        f"Waves = programs / (CTAs per SM × {sm90.SMS}); last wave = how full the last one is (1 = full). "
        "Bytes: each distinct tensor argument of each launch counted once, plus the PyTorch glue around "
        "the kernels (merges, products, copies, aggregations), against the op's minimum (each input read "
        "once, each output written once). Kernels that re-read data from L2 or loop twice over a row count "
        "once here.\n"
    )
    w("| family | op | case | kernel launches: grid → waves (last-wave fill) | bytes | minimum | ratio |")
    w("|---|---|---|---|---:|---:|---:|")
    for c in report.cases:
        if c.error:
            w(f"| {c.family} | `{c.op}` | {c.label} | not recorded: {c.error} | | | |")
            continue
        groups: dict[tuple, int] = {}
        for launch in c.launches:
            k = (launch.spec, tuple(launch.grid), launch.waves, launch.last_wave)
            groups[k] = groups.get(k, 0) + 1
        text = "<br>".join(
            (f"{n}× " if n > 1 else "") + f"`{spec}` {_grid(grid)} → {waves:.2f} ({last:.0%})"
            for (spec, grid, waves, last), n in groups.items()
        )
        ratio = c.bytes / c.min_bytes if c.min_bytes else float("nan")
        sizes = f"{_gb(c.bytes)} | {_gb(c.min_bytes)} | {ratio:.2f}"
        w(f"| {c.family} | `{c.op}` | {c.label} | {text} | {sizes} |")
    w("")

    if report.sweep:
        w(_sweep_markdown(report.sweep))

    w("## Register budgets\n")
    w("| kernel | budget | reason |")
    w("|---|---:|---|")
    from .budgets import BUDGETS, FP64, Budget

    for kernel, budget in BUDGETS.items():
        if isinstance(budget, Budget):
            w(f"| `{kernel}` | {budget.registers} | {budget.reason} |")
        else:
            w(
                f"| `{kernel}` | {budget.otherwise.registers} / {budget.if_set.registers} | without / with "
                f"{budget.name}: {budget.otherwise.reason}; {budget.if_set.reason} |"
            )
    w(f"| any, fp64 inputs | {FP64.registers} | {FP64.reason} |")
    w("")
    return "\n".join(out) + "\n"


def _grid(grid) -> str:
    grid = [g for g in grid]
    while len(grid) > 1 and grid[-1] == 1:
        grid.pop()
    return "(" + ", ".join(str(g) for g in grid) + ")"


def _sweep_markdown(sweep: list[dict]) -> str:
    lines = [
        "## Fused head forward: last-wave waste by N\n",
        "`_linear_logprobs_fwd_kernel` (bf16, H = 4096, V = 151936) at 1 CTA per SM: each program runs "
        "`tiles_per_split` vocabulary tiles, so the time is modelled as ⌈programs / 132⌉ × tiles_per_split "
        "and the ideal as row blocks × vocabulary tiles / 132. *Now*: the launcher's split (recorded). "
        "*Balanced*: the split in [8, 64] minimising the model (`bench.static.sweep.balanced_splits`).\n",
        "| N | row blocks | now: splits | programs | waves | efficiency | balanced: splits | programs "
        "| waves | efficiency |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sweep:
        lines.append(
            f"| {r['n']} | {r['row_blocks']} | {r['splits']} | {r['programs']} | {r['waves']:.2f} | "
            f"{r['efficiency']:.0%} | {r['b_splits']} | {r['b_programs']} | {r['b_waves']:.2f} | "
            f"{r['b_efficiency']:.0%} |"
        )
    return "\n".join(lines) + "\n"
