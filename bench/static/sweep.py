"""The fused head's forward split across N: last-wave waste of the launcher's choice vs a balanced one.

The forward launches row blocks × vocab_splits programs, each owning ``tiles_per_split`` vocabulary
tiles; with one CTA per SM (the kernel uses > 128 registers) a program's time is proportional to its
tiles, so the kernel's time is modelled as ⌈programs / slots⌉ × tiles_per_split, against an ideal of
row blocks × vocabulary tiles / slots.  :func:`balanced_splits` is the heuristic this report proposes
instead of a fixed programs-per-SM target: the split in [MIN, MAX] that minimises that model.
"""

from __future__ import annotations

from .record import kernel_function, record_launches
from .sm90 import SMS

N_SWEEP = (512, 1024, 2048, 4096, 8192, 16384, 32768)
MIN_SPLITS, MAX_SPLITS = 8, 64


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def balanced_splits(
    row_blocks: int, vocab_tiles: int, slots: int, low: int = MIN_SPLITS, high: int = MAX_SPLITS
) -> tuple[int, int]:
    """(splits, tiles per split) minimising ⌈row_blocks·splits / slots⌉ · tiles_per_split (fewest splits on
    ties: fewer partial results to merge)."""
    best = None
    for wanted in range(min(low, vocab_tiles), min(high, vocab_tiles) + 1):
        per = cdiv(vocab_tiles, wanted)
        splits = cdiv(vocab_tiles, per)
        cost = cdiv(row_blocks * splits, slots) * per
        if best is None or cost < best[0]:
            best = (cost, splits, per)
    return best[1], best[2]


def _model(row_blocks: int, vocab_tiles: int, splits: int, per: int, slots: int) -> tuple[int, float, float]:
    programs = row_blocks * splits
    return programs, programs / slots, row_blocks * vocab_tiles / slots / (cdiv(programs, slots) * per)


def fused_head_sweep(ctas_per_sm: int = 1, hidden: int = 4096, vocab: int = 151936) -> list[dict]:
    """One row per N: the launcher's recorded split and the balanced one, on fake CUDA tensors (bf16)."""
    import torch

    import rlhf_kernels as rk

    from .fake_device import fake_h200

    slots = SMS * max(ctas_per_sm, 1)
    rows = []
    with fake_h200():
        weight = torch.empty(vocab, hidden, dtype=torch.bfloat16, device="cuda")
        for n in N_SWEEP:
            hidden_states = torch.empty(n, hidden, dtype=torch.bfloat16, device="cuda")
            labels = torch.empty(n, dtype=torch.int64, device="cuda")
            with record_launches() as launches:
                rk.linear_logprobs(hidden_states, weight, labels)
            launch = next(x for x in launches if x.kernel == "_linear_logprobs_fwd_kernel")
            args = dict(zip(kernel_function(launch.module, launch.kernel).arg_names, launch.values))
            row_blocks = cdiv(n, args["BLOCK_N"])
            vocab_tiles = cdiv(vocab, args["BLOCK_V"])
            splits, per = args["vocab_splits"], args["tiles_per_split"]
            programs, waves, efficiency = _model(row_blocks, vocab_tiles, splits, per, slots)
            assert programs == launch.programs, (programs, launch.grid)
            b_splits, b_per = balanced_splits(row_blocks, vocab_tiles, slots)
            b_programs, b_waves, b_efficiency = _model(row_blocks, vocab_tiles, b_splits, b_per, slots)
            rows.append(
                dict(
                    n=n,
                    row_blocks=row_blocks,
                    splits=splits,
                    programs=programs,
                    waves=waves,
                    efficiency=efficiency,
                    b_splits=b_splits,
                    b_programs=b_programs,
                    b_waves=b_waves,
                    b_efficiency=b_efficiency,
                )
            )
    return rows
