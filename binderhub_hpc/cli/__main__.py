"""``python -m binderhub_hpc.cli``: the ``binderhub-hpc`` command."""

import sys

from . import main

sys.exit(main())
