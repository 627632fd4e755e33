"""The documentation site builds without a warning, and its generated
references (configuration, command line) are the ones the code makes."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_is_current():
    p = subprocess.run(
        [sys.executable, str(TOP / "docs" / "make_config_reference.py"), "--check"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr


def test_the_configuration_reference_is_current_for_the_classes_binderhub_loads():
    """Where BinderHub is installed, its classes' sections are made from the
    code too (the test above then covers them); elsewhere they are kept as
    they were, which only a host with BinderHub can check."""
    if importlib.util.find_spec("binderhub") is None:
        pytest.skip(
            "BinderHub is not installed (it comes from its git repository, not PyPI): the sections "
            "of SIFBuildExecutor and SchedulerLaunchQuota are kept as they were, unchecked"
        )
    p = subprocess.run(
        [sys.executable, str(TOP / "docs" / "make_config_reference.py"), "--check"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert "unchecked" not in p.stderr, p.stderr


def test_the_configuration_reference_lists_every_setting_with_its_help():
    from binderhub_hpc.config import configurable_classes

    text = (TOP / "docs" / "configuration.md").read_text()
    for cls in configurable_classes():
        for name, trait in cls.class_traits(config=True).items():
            owner = next(k for k in cls.__mro__ if name in vars(k))
            if owner.__module__.startswith("binderhub_hpc"):
                assert f"### `c.{cls.__name__}.{name}`" in text
                assert " ".join(trait.help.split()) in text


def test_the_command_line_reference_is_current():
    p = subprocess.run(
        [sys.executable, str(TOP / "docs" / "make_cli_reference.py"), "--check"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr


def test_the_documentation_site_builds_without_a_warning(tmp_path):
    """Every page is in a toctree, every cross-reference resolves, every
    code block parses: Sphinx with -W turns each of those into an error."""
    p = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(TOP / "docs"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    for page in ("index", "tutorial/index", "howto/deploy", "reference/cli", "configuration", "explanation/security"):
        assert (tmp_path / f"{page}.html").is_file(), page
