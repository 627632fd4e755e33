"""Record what the dev cluster's ``squeue --json`` prints for real jobs, to
pin the Slurm queue parser (``tests/data/slurm-<version>/``)::

    python3 -m binderhub_hpc_testing.slurmrecord tests/data/slurm-22.05

As root on the dev cluster (``binderhub-hpc devcluster up``). The service
account submits a running job (tagged as a session job is), a pending one
and a held one; the stranger submits held jobs with hostile names and
comments (:mod:`binderhub_hpc_testing.hostile`). squeue's output is kept
byte for byte (``queue.json``, and ``partition-filter.json``: the same
with ``--partition=interactive``, which 22.05 ignores), with ``meta.json``
saying which job is which; then every job is cancelled. Only the records
of these jobs are kept: the others' (other people's jobs on a shared dev
cluster) are cut out whole.
"""

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from binderhub_hpc.scheduler.slurm import SlurmQueue
from binderhub_hpc.scheduler.tags import JobTags

from .cluster import DevCluster
from .hostile import LINE_BREAKS, held_job_argv, hostile_jobs

#: the image the recorded session job runs (its tag is made for it)
IMAGE = "binderhub-hpc/binder-2drecorded-2drepo-abc123:" + "a" * 40


def keep_records(raw, ids):
    """squeue --json output `raw` with only the job records of `ids`: the
    others (other people's jobs, and finished ones 22.05 lists for
    MinJobAge) are cut out whole; every byte kept is as squeue printed it."""
    text = raw.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    start = text.index("[", text.index('"jobs":')) + 1
    spans, i = [], start
    while True:
        while text[i] in " \t\r\n,":
            i += 1
        if text[i] == "]":
            end = i
            break
        job, j = decoder.raw_decode(text, i)
        spans.append((i, j, str(job.get("job_id"))))
        i = j
    if len(spans) < 2:
        return raw
    sep = text[spans[0][1] : spans[1][0]]
    kept = sep.join(text[a:b] for a, b, job_id in spans if job_id in ids)
    head, tail = text[:start], text[spans[-1][1] : end]
    lead = text[start : spans[0][0]]
    return (head + lead + kept + tail + text[end:]).encode("utf-8", errors="surrogateescape")


def _squeue(cluster, *args):
    return subprocess.run(
        ["squeue", "--json", *args], env=cluster.full_env(), capture_output=True, check=True, timeout=60
    ).stdout


def record(cluster, outdir, timeout=120):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cluster.ensure_stranger()
    # a tag as the spawner makes one, with a key nobody keeps
    os.environ["BINDERHUB_HPC_RECORD_KEY"] = secrets.token_hex(32)
    tag = JobTags(key_env="BINDERHUB_HPC_RECORD_KEY").new_tag(IMAGE, cluster.service_user)
    ids = {}

    def submit(role, *args):
        out = cluster.as_service_user(
            ["sbatch", "--parsable", f"--job-name=binder-recorded-{role}", "--output=/dev/null", "--chdir=/tmp", *args]
        ).stdout
        ids[role] = out.strip().split(";")[0]

    stranger_ids = {}
    try:
        submit("running", "--partition=interactive", f"--comment={tag}", "--wrap=sleep 600")
        submit("pending", "--partition=batch", "--begin=now+1hour", f"--comment={tag}", "--wrap=sleep 600")
        submit("held", "--partition=batch", "--hold", "--wrap=true")
        hostile = hostile_jobs(ids["running"], ids["pending"], tag, IMAGE, cluster.service_user)
        refused = {}
        for label, name, comment in hostile:
            p = cluster.as_stranger(held_job_argv(name, comment), check=False)
            if p.returncode:
                refused[label] = p.stderr.strip()[:300]
            else:
                stranger_ids[label] = p.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while SlurmQueue().parse(_squeue(cluster).decode(errors="replace"))[ids["running"]].raw_state != "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {ids['running']} did not start")
            time.sleep(0.5)
        version = subprocess.run(
            ["squeue", "--version"], env=cluster.full_env(), capture_output=True, text=True
        ).stdout.strip()
        ours = set(ids.values()) | set(stranger_ids.values())
        (outdir / "queue.json").write_bytes(keep_records(_squeue(cluster), ours))
        (outdir / "partition-filter.json").write_bytes(keep_records(_squeue(cluster, "--partition=interactive"), ours))
        meta = {
            "recorded_with": "python3 -m binderhub_hpc_testing.slurmrecord " + str(outdir),
            "slurm_version": version,
            "viewer": "root (as the dev hub runs squeue)",
            "kept": "the records of the jobs below; other jobs' records cut out whole "
            "(keep_records), every byte kept as squeue printed it",
            "files": {
                "queue": "queue.json",
                "partition-filter": "partition-filter.json (squeue --json --partition=interactive)",
            },
            "image": IMAGE,
            "tag": tag,
            "service_user": cluster.service_user,
            "stranger": cluster.stranger_user,
            "jobs": ids,
            "stranger_jobs": stranger_ids,
            "refused_by_sbatch": refused,
            "line_breaks": {k: f"U+{ord(v):04X}" for k, v in LINE_BREAKS.items()},
        }
        (outdir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        return meta
    finally:
        everything = list(ids.values()) + list(stranger_ids.values())
        if everything:
            subprocess.run(["scancel", *everything], env=cluster.full_env(), check=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="where to write queue.json, partition-filter.json and meta.json")
    args = parser.parse_args(argv)
    meta = record(DevCluster().up(), args.outdir)
    print(json.dumps({k: meta[k] for k in ("slurm_version", "jobs", "refused_by_sbatch")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
