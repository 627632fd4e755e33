# binderhub-hpc site configuration: read by BinderHub (builds, registry
# lookups, /health), by JupyterHub (the spawner) and by `binderhub-hpc
# build|images|gc|doctor --config`. Copy to /etc/binderhub-hpc/ and edit.
#
# Both services load it with load_subconfig(), so the registry is named once.

# -- the SIF registry: one directory on the shared filesystem ------------------
# Build accounts write it (owner binderhub, group binder-build, mode 2775),
# every job account reads it (files 0644). Same path on build, service and
# compute nodes, or set compute_root for the compute nodes' mount point.
c.SIFRegistry.root = "/shared/binder/registry"
# c.SIFRegistry.compute_root = "/mnt/shared/binder/registry"
# 'sif' is what both runtimes run (podman mounts the SIF's root with
# squashfuse); add 'oci-archive' only to publish an OCI archive beside it
c.SIFRegistry.formats = ["sif"]
# `binderhub-hpc gc` evicts least recently used images beyond this (bytes; 0: no quota)
c.SIFRegistry.max_size = 500 * 1024**3

# -- builds ------------------------------------------------------------------------
# repo2docker on rootless podman, through our engine (skips the `buildx
# version` probe older podman lacks)
c.Repo2Docker.engine = "podman-hpc"
# build nodes without general internet access: Git and local checkouts only
# (repo2docker's Dataverse/Zenodo detection would call out first)
c.Repo2Docker.egress_restricted = True
# a site CA bundle for pip/apt inside builds behind an intercepting proxy
# c.Repo2Docker.ca_bundle = "/etc/ssl/certs/ca-certificates.crt"

# what one build may use (0: no limit); a build over one stops with the
# reason in the Binder log. The scheduler's --mem/--cpus-per-task on the
# build partition (SlurmBatchRunner.extra_sbatch_args) are the hard ceiling.
c.BuildLimits.memory = "8G"
c.BuildLimits.cpus = 0  # all the CPUs the build job or host gives
c.BuildLimits.image_size = "20G"
c.BuildLimits.published_size = "10G"
# growth of the build node's podman storage and scratch during a build;
# counts concurrent builds on the same filesystem too
# c.BuildLimits.scratch = "40G"
# variables of BinderHub's environment builds may see besides the allowlist
# (HOME, PATH, locale, proxies, podman's own): nothing else reaches them
# c.Repo2Docker.env_keep = []

# SIF conversion: 'auto' (mksquashfs + siftool when the build node has both,
# else apptainer), 'squashfs' or 'apptainer'
c.BuildPipeline.converter = "auto"
# whole build (repo2docker + conversion), seconds
c.BuildPipeline.build_timeout = 3600
# zstd squashfs: 10x faster than gzip at the same size, mountable by
# Apptainer >= 1.1; set runtime_supports_zstd = False for older runtimes
c.SquashfsSIFConverter.compressor = "auto"
c.SquashfsSIFConverter.runtime_supports_zstd = True
