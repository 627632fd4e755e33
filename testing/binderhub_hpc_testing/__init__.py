"""binderhub-hpc's development and test scaffolding, outside the package a
site installs: the dev cluster (Slurm or OpenPBS, a hub node, a build node
and compute nodes as network namespaces on this machine), a dev hub, the
demo, example repositories and their git server, the deployment as the
README lays it out. Its commands (``binderhub-hpc devcluster``, ``demo``,
``bench``) plug into ``binderhub-hpc`` when this package is installed from
a checkout (``pip install -e testing/``)."""
