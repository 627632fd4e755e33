"""A test hook in the build path: a builder that stops itself at a named
step, so a test can kill it there (tests/test_registry_faults.py)."""

import os
import signal

#: test-only: names the step at which a builder stops itself (see fault_point)
FAULT_ENV = "BINDERHUB_HPC_STOP_AT"


def fault_point(step):
    """Test-only hook, inert unless ``$BINDERHUB_HPC_STOP_AT`` names `step`:
    then this process stops itself (SIGSTOP) right here, for a test to kill
    it at a point too short to hit by timing, or to fill the disk and let
    it go on (tests/test_registry_faults.py)."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGSTOP)
