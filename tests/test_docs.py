"""The configuration reference in docs/ is the one the code's help strings make."""

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_is_current():
    p = subprocess.run(
        [sys.executable, str(TOP / "docs" / "make_config_reference.py"), "--check"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr


def test_the_configuration_reference_lists_every_setting_with_its_help():
    from binderhub_hpc.config import configurable_classes

    text = (TOP / "docs" / "configuration.md").read_text()
    for cls in configurable_classes():
        for name, trait in cls.class_traits(config=True).items():
            owner = next(k for k in cls.__mro__ if name in vars(k))
            if owner.__module__.startswith("binderhub_hpc"):
                assert f"### `c.{cls.__name__}.{name}`" in text
                assert " ".join(trait.help.split()) in text
