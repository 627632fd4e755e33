"""JupyterHub spawners that run Binder images as batch jobs:
``c.JupyterHub.spawner_class = "binderhub_hpc.spawner.SlurmBinderSpawner"``
(or ``PBSBinderSpawner``; entry points ``slurm-binder`` / ``pbs-binder``)."""

from .spawner import BinderBatchMixin, PBSBinderSpawner, SlurmBinderSpawner

__all__ = ["BinderBatchMixin", "PBSBinderSpawner", "SlurmBinderSpawner"]
