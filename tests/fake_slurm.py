#!/usr/bin/env python3
"""A scripted stand-in for sbatch, squeue and scancel (named by argv[0]),
for spawner tests that run without a cluster, as batchspawner's own tests
do. Jobs live in ``state.json`` beside this script; a test moves them
from PENDING to RUNNING by editing that file, like a scheduler would.
squeue prints Slurm 22.05's ``--json`` shape (tests/data/slurm-22.05 holds
real ones); a job's account is the submitter's unless the test sets
``user``."""

import json
import os
import pwd
import sys
import time
from pathlib import Path

STATE = Path(os.path.dirname(os.path.abspath(sys.argv[0]))) / "state.json"


def load():
    return json.loads(STATE.read_text()) if STATE.exists() else {"next": 101, "jobs": {}, "scripts": {}}


def save(state):
    tmp = STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, STATE)


def main():
    cmd = os.path.basename(sys.argv[0])
    state = load()
    if cmd == "sbatch":
        job = str(state["next"])
        state["next"] += 1
        script = sys.stdin.read()
        directives = dict(
            line[len("#SBATCH --") :].split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH --")
        )
        state["jobs"][job] = {
            "state": "PENDING",
            "reason": "Priority",
            "node": "",
            "partition": "jupyter",
            "user": pwd.getpwuid(os.getuid()).pw_name,
            "name": directives.get("job-name", ""),
            "comment": directives.get("comment", ""),
        }
        state["scripts"][job] = {"script": script, "argv": sys.argv[1:], "env": sorted(os.environ)}
        save(state)
        # a busy scheduler: the job may start (and report) before sbatch returns
        delay = STATE.with_name("sbatch.delay")
        if delay.exists():
            time.sleep(float(delay.read_text()))
        print(job)
    elif cmd == "squeue":
        jobs = [
            {
                "job_id": int(job),
                "job_state": j["state"],
                "state_reason": j["reason"],
                "state_description": "",
                "nodes": j["node"],
                "partition": j["partition"],
                "priority": 100,
                "start_time": 0,
                "submit_time": 0,
                "user_name": j.get("user", ""),
                "name": j.get("name", ""),
                "comment": j.get("comment", ""),
            }
            for job, j in state["jobs"].items()
        ]
        print(json.dumps({"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "errors": [], "jobs": jobs}, indent=2))
    elif cmd == "scancel":
        for job in sys.argv[1:]:
            state["jobs"].pop(job, None)
        save(state)
    else:
        sys.exit(f"fake_slurm: unknown command {cmd}")


if __name__ == "__main__":
    main()
