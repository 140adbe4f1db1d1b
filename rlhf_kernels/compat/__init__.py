"""Drop-in replacements for the functions verl, TRL and OpenRLHF run in the RLHF hot path.

Each module keeps one framework release's names, signatures, defaults and results, runs rlhf-kernels'
fused ops underneath, and installs itself into that framework, version-checked and reversibly:

    rlhf_kernels.compat.verl.install()      # verl 0.9.1: its registries and the functions its workers import
    rlhf_kernels.compat.trl.patch()         # TRL 1.16.0: the fused LM head and log-softmax helpers
    rlhf_kernels.compat.openrlhf.patch()    # OpenRLHF 0.11.2: losses, KL, rewards, advantages

(``unpatch()`` restores each framework's own.)  The functions can also be imported and called directly.
Where a framework's behaviour is surprising (a NaN for an empty batch, logits divided in place), the shim
keeps it; ``docs/compat-*.md`` list every intended difference, and ``tests/peers`` checks each shim against
the real release.  The modules are imported on demand, and import none of the three frameworks until
``install()`` / ``patch()`` is called.
"""

__all__ = ["openrlhf", "trl", "verl"]
