"""Shared test configuration: hypothesis profiles.

``ci`` (selected automatically when the ``CI`` environment variable is set):
bounded examples, derandomised, no deadline -- reproducible and never flaky on
a slow machine.  ``dev`` (the default) draws fresh examples each run.
``thorough`` is for occasional long runs: ``HYPOTHESIS_PROFILE=thorough``.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=15, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
