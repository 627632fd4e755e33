"""Benchmarks of binderhub-hpc: ``python -m benchmarks --help``.

Each benchmark is a module with ``run(args) -> list[benchmarks.common.Row]``
(and optionally ``add_arguments(parser)``), registered in
:data:`benchmarks.__main__.BENCHMARKS`.
"""
