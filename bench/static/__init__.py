"""Static kernel report for sm_90 (H100/H200), without a GPU: ``python -m bench.static``.

Method:
1. ``workloads``: every public op (forwards) and registered backward op is called at realistic shapes
   on fake CUDA tensors (``fake_device``: FakeTensorMode, a 132-SM device description), with the Triton
   backend forced.
2. ``record``: Triton's launch is intercepted, so each ``kernel[grid](...)`` the launchers make is
   recorded (kernel, grid, arguments, constexprs, warps, stages) instead of run; ``traffic`` adds up the
   bytes of the PyTorch glue around the kernels.
3. ``sm90``: each distinct specialisation (Triton's own binder decides what is specialised) is compiled
   with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; ptxas's log gives registers and spills,
   the metadata the shared memory; an occupancy model gives resident CTAs, warps and waves.
4. ``budgets``: each kernel's register budget and its reason; ``tests/test_static.py`` fails on a spill
   or an exceeded budget.  ``sweep``: the fused head's split across N.
5. ``report``: ``bench/results/static-sm90.md`` (and, with ``--json``, the rows for another run to
   compare against, e.g. one with the GPU machine's Triton 3.6).

Limits: no timing; the traffic estimate counts each tensor argument once (re-reads from L2, or a kernel
looping twice over a row, are not seen); the backward ops are called directly (a CPU build of torch
has no autograd for CUDA tensors), with gradients shaped as the forward's outputs.
"""
