"""Traitlets configuration files, read like JupyterHub reads its own: the
command-line tools take the same `c.SIFRegistry.root = ...` files as the
hub and BinderHub."""

import os

from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader


def load_config_files(paths):
    """One Config from Python config files, later files winning."""
    cfg = Config()
    for path in paths or ():
        loader = PyFileConfigLoader(os.path.basename(path), path=os.path.dirname(os.path.abspath(path)))
        cfg.merge(loader.load_config())
    return cfg
