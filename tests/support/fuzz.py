"""The hypothesis settings profiles the fuzz and property tests share.

* :data:`FUZZ` -- the RPC and parser fuzz tests against real servers: 60 examples per
  property, thousands under ``make soak`` (``KOLM_FUZZ_EXAMPLES``); servers are slow to
  answer and live in fixtures.
* :data:`FUZZ_DERANDOMIZED` -- the pure-format property tests: 150 examples from a fixed
  seed, so a run is reproducible and CI never finds a new failure by chance.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["FUZZ", "FUZZ_DERANDOMIZED"]

FUZZ = settings(
    max_examples=int(os.environ.get("KOLM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

FUZZ_DERANDOMIZED = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
