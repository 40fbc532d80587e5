"""Shared test configuration: hypothesis profiles.

``ci`` (selected automatically when the ``CI`` environment variable is set):
bounded examples, derandomised, no deadline -- reproducible and never flaky on
a slow machine.  ``dev`` (the default) draws fresh examples each run.
``thorough`` is for occasional long runs: ``HYPOTHESIS_PROFILE=thorough``.
"""

import os

# Tests use small matrices: single-threaded BLAS is as fast for them and is not slowed down many times
# over when other processes share the machine.  Set before any test module imports numpy.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=15, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
