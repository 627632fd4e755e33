"""Write docs/configuration.md: every setting of every configurable class of
binderhub-hpc, from the help strings in the code (as kubespawner's reference
is made from its traits).

    python3 docs/make_config_reference.py            # rewrite the file
    python3 docs/make_config_reference.py --check    # exit 1 if it is stale

The classes BinderHub loads (``binderhub_hpc.binderhub``) import BinderHub,
which is not installed everywhere (CI cannot install it: it is not on PyPI
in a usable version). Where it is missing, their sections are carried over
from the current file unchanged and named on stderr as unchecked; where it
is installed, every section is made from the code.
"""

import argparse
import inspect
import sys
from pathlib import Path

from traitlets import Enum, List, Type, Undefined

from binderhub_hpc.config import CONFIGURABLES, configurable_classes

#: the header of one class's section
SECTION = "## "

OUT = Path(__file__).resolve().parent / "configuration.md"


def _default(owner, trait):
    """The default as the admin would write it; "(computed)" where code decides."""
    dynamic = any(
        getattr(v, "trait_name", None) == trait.name
        for v in vars(owner).values()
        if type(v).__name__ == "DefaultHandler"
    )
    if dynamic or trait.default_value is Undefined:
        return "(computed)"
    if isinstance(trait, Type):
        klass = trait.default_value
        return klass if isinstance(klass, str) else f"{klass.__module__}.{klass.__name__}"
    if trait.name.endswith("mode") and isinstance(trait.default_value, int):
        return f"0o{trait.default_value:o}"
    text = repr(trait.default_value)
    return text if len(text) <= 60 else "(long; see the code)"


def _kind(trait):
    if isinstance(trait, Enum):
        return "one of " + ", ".join(repr(v) for v in trait.values)
    if isinstance(trait, List) and isinstance(trait._trait, Enum):
        return "list of " + ", ".join(repr(v) for v in trait._trait.values)
    return type(trait).__name__


def reference():
    lines = [
        "# Configuration reference",
        "",
        "Every setting of binderhub-hpc, generated from the help strings in the code",
        "by `docs/make_config_reference.py` (a test keeps it current).",
        "Settings go in any of the traitlets files (`binderhub_hpc_config.py`,",
        "`jupyterhub_config.py`, `binderhub_config.py`) as `c.Class.setting = value`;",
        "`binderhub_hpc.config.check_config(c)` refuses unknown names and invalid values",
        "when the file loads. Settings on `c.BinderBatchMixin` apply to both spawners.",
        "The spawners also take every batchspawner and JupyterHub `Spawner` setting",
        "(`req_*`, `start_timeout`, ...), listed in those projects' documentation.",
        "",
    ]
    modules = {name: module for module, name in CONFIGURABLES}
    classes = {cls.__name__: cls for cls in configurable_classes()}
    kept = previous_sections()
    for _, name in CONFIGURABLES:
        cls = classes.get(name)
        if cls is None:
            # its module needs a package that is missing here: as it was
            if name in kept:
                lines += kept[name]
            continue
        doc = inspect.getdoc(cls) or ""
        lines += [f"## {cls.__name__}", "", f"`{modules[cls.__name__]}.{cls.__name__}`", ""]
        if doc:
            lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
        for name, trait in sorted(cls.class_traits(config=True).items()):
            owner = next(k for k in cls.__mro__ if name in vars(k))
            if not owner.__module__.startswith("binderhub_hpc"):
                continue
            help_text = " ".join(trait.help.split())
            lines += [
                f"### `c.{cls.__name__}.{name}`",
                "",
                f"{_kind(trait)}, default `{_default(owner, trait)}`"
                + (f" (from `{owner.__name__}`)" if owner is not cls else ""),
                "",
                help_text,
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def unchecked():
    """The classes whose sections this host cannot make (their modules do
    not import here)."""
    imported = {cls.__name__ for cls in configurable_classes()}
    return [name for _, name in CONFIGURABLES if name not in imported]


def previous_sections():
    """{class name: its section's lines} of the current file."""
    if not OUT.exists():
        return {}
    sections, current = {}, None
    for line in OUT.read_text().splitlines():
        if line.startswith(SECTION):
            current = sections.setdefault(line[len(SECTION) :].strip(), [])
        if current is not None:
            current.append(line)
    return sections


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    args = p.parse_args(argv)
    text = reference()
    missing = unchecked()
    if missing:
        print(
            "not importable here, their sections kept as they were (unchecked): " + ", ".join(missing),
            file=sys.stderr,
        )
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 docs/make_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
