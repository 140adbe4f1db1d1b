"""The fuzz suite's two hypothesis profiles.

``ci`` (default): derandomized (a fixed seed: every run draws the same cases), each test's own bounded
number of examples, no deadline (the Triton interpreter is slow and its first call compiles).  The whole
suite adds about 3 minutes on 2 cores.
``fuzz`` (``make fuzz``, or ``HYPOTHESIS_PROFILE=fuzz``): fresh random seeds and 25x the examples, for
local runs; a failure prints its minimal example and a ``@reproduce_failure`` blob, and is then written
as a regular test in ``tests/fuzz/test_regressions.py``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SCALE = {"ci": 1, "fuzz": 25}.get(PROFILE, 1)

# The `backend` fixture is function-scoped but constant across a test's examples.
_COMMON = dict(
    deadline=None,
    print_blob=True,
    report_multiple_bugs=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much,
    ],
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("fuzz", **_COMMON)


def fuzz_settings(examples: int) -> settings:
    """Settings of one fuzz test: ``examples`` drawn cases in the ci profile, 25x that with ``fuzz``."""
    return settings(settings.get_profile(PROFILE if PROFILE in ("ci", "fuzz") else "ci"),
                    max_examples=examples * SCALE)
