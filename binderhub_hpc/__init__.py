"""Binder on HPC: a Builder and Launcher pair for an unmodified BinderHub on
Slurm or PBS clusters, with Apptainer SIF images on the shared filesystem."""

__version__ = "0.2.0.dev0"
