"""Drop-in replacements for the functions verl, TRL and OpenRLHF users call in the RLHF hot path.

Each module keeps the framework's names, signatures, defaults and results, and runs rlhf-kernels' fused
ops underneath; swapping one import changes speed and memory, not the numbers:

    from rlhf_kernels.compat import verl as core_algos        # was: from verl.trainer.ppo import core_algos
    from rlhf_kernels.compat.trl import selective_log_softmax  # was: from trl.trainer.utils import ...
    from rlhf_kernels.compat.openrlhf import PolicyLoss        # was: from openrlhf.models.loss import ...

Where a framework's own behaviour is surprising (a NaN for an empty batch, logits divided in place, a
metric on the unclamped ratio), the shim's docstring says what it does and why; ``docs/compat-*.md``
list every difference.  The modules are imported on demand (``import rlhf_kernels.compat.verl``), so
none of the three frameworks is needed, and none is imported.
"""

__all__ = ["openrlhf", "trl", "verl"]
