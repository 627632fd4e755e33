"""Everything that talks to the batch scheduler: job records and their
states (:mod:`.jobs`), one module per scheduler (:mod:`.slurm`, :mod:`.pbs`)
holding its queries, parsers and probes, and the shared queue snapshot
(:mod:`.reflector`). Neither JupyterHub nor BinderHub is imported here: the
spawner and BinderHub's quota both use it."""
