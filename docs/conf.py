"""Sphinx configuration of the binderhub-hpc documentation (MyST Markdown,
themed like JupyterHub's docs with pydata-sphinx-theme).

    python3 -m sphinx -W -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from binderhub_hpc import __version__  # noqa: E402

project = "binderhub-hpc"
author = "binderhub-hpc contributors"
copyright = "binderhub-hpc contributors"
version = release = __version__

extensions = ["myst_parser"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_raw", "Thumbs.db", ".DS_Store"]

html_theme = "pydata_sphinx_theme"
html_title = "binderhub-hpc"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = []
