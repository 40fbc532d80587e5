"""refssl.runtime.keep_freed_memory: glibc keeps freed blocks, so a step's temporaries are not faulted in
again.  Run in a subprocess: the setting is process-wide and stays for the process's life."""

import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from refssl.runtime import keep_freed_memory

    if sys.argv[1] == "keep":
        assert keep_freed_memory()

    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(4 << 20, np.float32)  # 16 MiB, written: every page touched
        b = a * 2
        del a, b
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_one_step()  # the first step faults its pages in either way
    print(min(faults_of_one_step() for _ in range(3)))
""")


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_kept_memory_is_not_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    # Two 16 MiB arrays are 8192 pages of 4 KiB: by default each step faults most of them in again
    # (fewer with transparent huge pages); kept, the freed blocks are reused without a fault.
    assert kept < 100, kept
    assert default > 10 * max(kept, 1), (default, kept)
