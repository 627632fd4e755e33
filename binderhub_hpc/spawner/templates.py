"""Job script templates.

Admins override `batch_script` as batchspawner users know it: Jinja2
(each `req_xyz` trait is `{{xyz}}`) or, for old scripts, `str.format`
(`{xyz}`). `binder_setup` and `cmd` are ours and must stay in any override,
and so must the quota tag's carrier (Slurm: `job_tag` in `--comment`; PBS:
`keepvars` in `-v`, which names BINDER_JOB_TAG); a script without them,
with a syntax error or with a name the spawner does not define is refused
when the configuration loads. Jinja2 templates render
with `StrictUndefined`, so nothing silently becomes an empty string. Nothing
in a rendered script is secret: tokens reach the job through the
environment of the submit command, listed by name in `--export` / `-v`, or
in a private file the setup sources (`secrets_in_file`; on PBS it carries
every session value, which `qsub -v` would show to others or change).
"""

import functools
import string
from importlib import resources

from jinja2 import Environment, StrictUndefined, Template, TemplateSyntaxError, meta

#: what a job script must contain: the session setup (port report, tokens,
#: scratch, cleanup) and the container command (each spawner adds the
#: carrier of its quota tag)
REQUIRED_VARS = ("binder_setup", "cmd")
#: what each required name does, for the message that refuses a script without it
_WHY = {
    "binder_setup": "reports the server's port to the hub, reads the tokens and cleans up the session",
    "cmd": "runs the server in the container",
    "job_tag": "is the quota tag the launch quotas count (#SBATCH --comment={{job_tag}})",
    "keepvars": "names the variables qsub hands the job, the quota tag BINDER_JOB_TAG among them",
}
#: what the spawner adds to batchspawner's req_* variables
SPAWNER_VARS = ("binder_setup", "cmd", "job_name", "job_tag")

SLURM_SCRIPT = """#!/bin/bash
#SBATCH --job-name={{job_name}}
{% if job_tag %}#SBATCH --comment={{job_tag}}
{% endif %}#SBATCH --output={{homedir}}/%j.log
#SBATCH --chdir={{homedir}}
#SBATCH --export={{keepvars}}
{% if partition %}#SBATCH --partition={{partition}}
{% endif %}{% if account %}#SBATCH --account={{account}}
{% endif %}{% if qos %}#SBATCH --qos={{qos}}
{% endif %}{% if runtime %}#SBATCH --time={{runtime}}
{% endif %}{% if memory %}#SBATCH --mem={{memory}}
{% endif %}{% if nprocs %}#SBATCH --cpus-per-task={{nprocs}}
{% endif %}{% if ngpus %}#SBATCH --gres=gpu:{{ngpus}}
{% elif gres %}#SBATCH --gres={{gres}}
{% endif %}{% if reservation %}#SBATCH --reservation={{reservation}}
{% endif %}{% if options %}#SBATCH {{options}}
{% endif %}
set -euo pipefail
{{prologue}}
{{binder_setup}}
{% if srun %}{{srun}} {% endif %}{{cmd}} &
binder_wait $!
{{epilogue}}
"""

PBS_SCRIPT = """#!/bin/bash
#PBS -N {{job_name}}
{% if queue or host %}#PBS -q {% if queue %}{{queue}}{% endif %}{% if host %}@{{host}}{% endif %}
{% endif %}{% if runtime %}#PBS -l walltime={{runtime}}
{% endif %}#PBS -l select=1{% if nprocs %}:ncpus={{nprocs}}{% endif %}{% if memory %}:mem={{memory}}{% endif %}{% if ngpus %}:ngpus={{ngpus}}{% endif %}
{% if account %}#PBS -A {{account}}
{% endif %}#PBS -j oe
#PBS -o {{homedir}}/
{% if keepvars %}#PBS -v {{keepvars}}
{% endif %}{% if options %}#PBS {{options}}
{% endif %}
set -euo pipefail
cd {{homedir}}
{{prologue}}
{{binder_setup}}
{{cmd}} &
binder_wait $!
{{epilogue}}
"""

# The host side of the session. Runs before the container: private scratch
# cleaned on every exit, signals forwarded to the server, the port chosen on
# this node and reported to the hub (batchspawner's API) by the reporter
# module's source in a quoted heredoc, which reads the token from the
# environment, never from argv.
_SETUP = r"""# --- binderhub-hpc session setup ---
umask 077
{% if secrets_file %}# tokens: read from a file only this account can read, then deleted
set -a; . {{secrets_file}}; set +a; rm -f -- {{secrets_file}}
{% endif %}binder_scratch_base="$(mktemp -d "{{scratch_root or '${TMPDIR:-/tmp}'}}/{{scratch_name}}.XXXXXXXX")"
BINDER_CONTAINER="$(basename "$binder_scratch_base")"
binder_cleanup() {
  {{stop}}
  {{remove}} "$binder_scratch_base" || rm -rf -- "$binder_scratch_base" || true
{% if session %}  echo "binderhub-hpc: session ended, scratch removed"
{% endif %}}
trap binder_cleanup EXIT
BINDER_SCRATCH="$binder_scratch_base/tmp"
mkdir -m 1777 "$BINDER_SCRATCH"
BINDER_HOME="$binder_scratch_base/home"
mkdir -m 700 "$BINDER_HOME"
export BINDER_SCRATCH BINDER_HOME BINDER_CONTAINER
{% for name, value in limits %}export {{name}}={{value}}
{% endfor %}
binder_child=""
binder_forward() {
  echo "binderhub-hpc: stopping the server"
  {{stop}}
  [ -n "$binder_child" ] && kill -TERM "$binder_child" 2>/dev/null || true
}
trap binder_forward TERM INT HUP
binder_wait() {
  binder_child="$1"
  local rc=0
  while true; do
    wait "$binder_child" && rc=0 || rc=$?
    # a trapped signal interrupts wait with rc > 128 while the child lives on
    kill -0 "$binder_child" 2>/dev/null || break
  done
  return "$rc"
}
{% if session %}{ read -r JUPYTER_PORT; read -r JUPYTERHUB_SERVICE_URL; read -r BINDER_JOB_END_TIME; } < <({{host_python}} - <<'BINDER_PY'
{{reporter}}BINDER_PY
)
[ -n "${JUPYTER_PORT:-}" ] || { echo "binderhub-hpc: could not report a port to the hub" >&2; exit 1; }
export JUPYTER_PORT JUPYTERHUB_SERVICE_URL BINDER_JOB_END_TIME
# the hub was told this port: the server must not wander to another
export JUPYTER_PORT_RETRIES=0
export JUPYTER_RUNTIME_DIR=/tmp/.jupyter-runtime
echo "binderhub-hpc: server port $JUPYTER_PORT on $(hostname), scratch $binder_scratch_base"
{% endif %}{{env_exports}}
# the session's writable home: a copy of the image's
{{prepare}}
# --- end of session setup ---"""


@functools.cache
def reporter_source():
    """The source of :mod:`binderhub_hpc.spawner.reporter`, pasted into every
    job script: compute nodes run it with their own Python and need nothing
    of ours installed. Read once."""
    source = resources.files(__package__).joinpath("reporter.py").read_text(encoding="utf-8")
    if "BINDER_PY" in source.splitlines():
        raise RuntimeError("reporter.py holds a line BINDER_PY, which would end the job script's heredoc")
    return source if source.endswith("\n") else source + "\n"


def render_setup(
    host_python="",
    scratch_root="",
    env_exports="",
    remove="rm -rf --",
    stop="",
    secrets_file="",
    prepare="",
    limits=(),
    session=True,
):
    """The session setup; `limits` are (name, value) pairs exported to the
    job (already shell-safe: numbers). `session` False: the same setup
    without what only a job launched by the hub can do, the port report
    and the lines it prints in the job's log, for `binderhub-hpc doctor`
    (see ContainerRuntime.check_script); its scratch is `binder-check.*`."""
    return Template(_SETUP).render(
        session=session,
        scratch_name="binder-session" if session else "binder-check",
        prepare=prepare or ":",
        limits=limits,
        secrets_file=secrets_file,
        host_python=host_python,
        reporter=reporter_source() if session else "",
        scratch_root=scratch_root,
        env_exports=env_exports,
        remove=remove,
        stop=stop or ":",
    )


def is_jinja(template):
    """batchspawner's rule: Jinja2 when the template has `{{` or `{%`."""
    return "{{" in template or "{%" in template


def render_script(template, variables):
    """The job script: Jinja2 (strict) or `str.format`, as batchspawner decides."""
    if is_jinja(template):
        return Template(template, undefined=StrictUndefined).render(**variables)
    return template.format(**variables)


def check_script(template, known, required=REQUIRED_VARS):
    """Why `template` cannot be a job script, or None. `known`: the names the
    spawner defines; `required`: those the script must use."""
    if is_jinja(template):
        try:
            used = meta.find_undeclared_variables(Environment().parse(template))
        except TemplateSyntaxError as e:
            return f"is not a valid Jinja2 template (line {e.lineno}: {e.message})"
        mark = "{{%s}}"
    else:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:
            return f"is not a valid format template ({e}; write literal braces as {{{{ }}}})"
        used = {f.split(".")[0].split("[")[0] for f in fields}
        mark = "{%s}"
    missing = [n for n in required if n not in used]
    if missing:
        return (
            "must contain "
            + " and ".join(mark % n for n in missing)
            + ": "
            + "; ".join(f"{mark % n} {_WHY.get(n, 'is needed')}" for n in required)
        )
    unknown = sorted(set(used) - set(known))
    if unknown:
        return (
            "uses " + ", ".join(mark % n for n in unknown) + ", which the spawner does not define "
            "(it defines " + ", ".join(sorted(known)) + ")"
        )
    return None
