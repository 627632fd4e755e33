"""repo2docker's docker CLI engine, driving ``podman`` instead.

repo2docker 2026.4 builds through ``<cli> buildx build`` and picks the CLI
from ``DOCKER_HOST`` at import time. Before building it probes
``<cli> buildx version``, which Debian 12's podman 4.3 lacks although its
``podman buildx build`` works. This engine names podman explicitly and only
checks that the CLI runs. Registered as ``podman-hpc`` under the
``repo2docker.engines`` entry point (see pyproject.toml); select it with
``repo2docker --engine podman-hpc``.
"""

import shutil
import subprocess

from repo2docker.docker import DockerEngine
from traitlets import Unicode


class PodmanEngine(DockerEngine):
    """DockerEngine over the podman CLI, without the buildx probe."""

    podman = Unicode("podman", help="The podman executable (name on PATH or absolute path).", config=True)

    @property
    def container_cli(self):
        if self._container_cli is None:
            cli = shutil.which(self.podman) or self.podman
            try:
                subprocess.run([cli, "version"], stdout=subprocess.DEVNULL, check=True)
            except (subprocess.CalledProcessError, OSError) as e:
                raise RuntimeError(f"podman must be installed and working: {e}") from None
            self._container_cli = cli
        return self._container_cli
