# Site lines run at the start of every Binder session job, before the
# session setup (req_prologue; same for Slurm and PBS). Nothing here may
# print secrets: job scripts are readable by other accounts.
# module load apptainer
# export APPTAINER_CACHEDIR="${TMPDIR:-/tmp}/apptainer-cache"
:
