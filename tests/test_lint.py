"""The tree stays as ruff (pinned in the test extra) wants it: lint and format."""

import os
import shutil
import subprocess
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff():
    exe = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(exe):
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return exe


@pytest.mark.parametrize("argv", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_the_tree_is_clean_for_ruff(argv):
    p = subprocess.run([ruff(), *argv], cwd=TOP, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
