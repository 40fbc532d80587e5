"""``python -m toy_experiments`` gets single-threaded BLAS: the thread variables are set before numpy loads."""

import os
import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROBE = r"""
import os, sys
seen = {}
class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and "numpy" not in seen:
            seen["numpy"] = os.environ.get("OPENBLAS_NUM_THREADS")
        return None
sys.meta_path.insert(0, _Watch())
import toy_experiments  # what `python -m toy_experiments` imports first
print(seen.get("numpy"))
"""


def test_blas_threads_are_pinned_before_numpy_is_imported():
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[-1] == "1", out


def test_caller_choice_of_threads_is_kept():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[-1] == "2", out
