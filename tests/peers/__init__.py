"""Peer parity: rlhf_kernels.compat against the real verl 0.9.1, TRL 1.16.0 and OpenRLHF 0.11.2.

``make test`` installs the pinned peers (``pip install --no-deps``) and the light dependencies their import
chains execute; :mod:`peers.placeholders` documents the heavy ones that are replaced by placeholders for
the import alone.  Every function a test calls on the peer side is the peer's own, unmodified.
"""
