"""Job script templates.

Admins override `batch_script` (Jinja2, batchspawner's convention: each
`req_xyz` trait is `{{xyz}}`); `{{binder_setup}}` and `{{cmd}}` are ours and
must stay in any override. Nothing in a rendered script is secret: tokens
reach the job through the environment of the submit command, listed by name
in `--export` / `-v`.
"""

from jinja2 import Template

SLURM_SCRIPT = """#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --output={{homedir}}/%j.log
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
#PBS -v {{keepvars}}
{% if options %}#PBS {{options}}
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
# this node and reported to the hub (batchspawner's API), the token read
# from the environment, never from argv.
_SETUP = r"""# --- binderhub-hpc session setup ---
umask 077
{% if secrets_file %}# tokens: read from a file only this account can read, then deleted
set -a; . {{secrets_file}}; set +a; rm -f -- {{secrets_file}}
{% endif %}binder_scratch_base="$(mktemp -d "{{scratch_root or '${TMPDIR:-/tmp}'}}/binder-session.XXXXXXXX")"
BINDER_CONTAINER="$(basename "$binder_scratch_base")"
binder_cleanup() {
  {{stop}}
  {{remove}} "$binder_scratch_base" || rm -rf -- "$binder_scratch_base" || true
  echo "binderhub-hpc: session ended, scratch removed"
}
trap binder_cleanup EXIT
BINDER_SCRATCH="$binder_scratch_base/tmp"
mkdir -m 1777 "$BINDER_SCRATCH"
export BINDER_SCRATCH BINDER_CONTAINER
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
{ read -r JUPYTER_PORT; read -r JUPYTERHUB_SERVICE_URL; } < <({{host_python}} - <<'BINDER_PY'
import json, os, socket, sys, urllib.parse, urllib.request
s = socket.socket()
s.bind(("", 0))
port = s.getsockname()[1]
s.close()
api = os.environ["JUPYTERHUB_API_URL"].rstrip("/") + "/batchspawner"
req = urllib.request.Request(
    api,
    data=json.dumps({"port": port}).encode(),
    method="POST",
    headers={
        "Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"],
        "Content-Type": "application/json",
    },
)
urllib.request.urlopen(req, timeout=60).read()
url = urllib.parse.urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://0.0.0.0:0/"))
url = url._replace(netloc="%s:%d" % (url.hostname or "0.0.0.0", port))
print(port)
print(urllib.parse.urlunparse(url))
BINDER_PY
)
[ -n "${JUPYTER_PORT:-}" ] || { echo "binderhub-hpc: could not report a port to the hub" >&2; exit 1; }
export JUPYTER_PORT JUPYTERHUB_SERVICE_URL
# the hub was told this port: the server must not wander to another
export JUPYTER_PORT_RETRIES=0
export JUPYTER_RUNTIME_DIR=/tmp/.jupyter-runtime
echo "binderhub-hpc: server port $JUPYTER_PORT on $(hostname), scratch $binder_scratch_base"
{{env_exports}}
# --- end of session setup ---"""


def render_setup(host_python, scratch_root="", env_exports="", remove="rm -rf --", stop="", secrets_file=""):
    return Template(_SETUP).render(
        secrets_file=secrets_file,
        host_python=host_python,
        scratch_root=scratch_root,
        env_exports=env_exports,
        remove=remove,
        stop=stop or ":",
    )
