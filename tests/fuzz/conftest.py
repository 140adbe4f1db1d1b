"""Hypothesis profiles of the fuzz suite (docs/robustness.md): registered in ``profiles.py``, chosen with
``HYPOTHESIS_PROFILE`` (``ci`` by default, ``fuzz`` for ``make fuzz``), applied per test by
``profiles.fuzz_settings`` so that no other test file's hypothesis settings change."""

from . import profiles  # noqa: F401  (registers the profiles)
