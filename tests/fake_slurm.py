#!/usr/bin/env python3
"""A scripted stand-in for sbatch, squeue and scancel (named by argv[0]),
for spawner tests that run without a cluster, as batchspawner's own tests
do. Jobs live in ``state.json`` beside this script; a test moves them
from PENDING to RUNNING by editing that file, like a scheduler would."""

import json
import os
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
        state["jobs"][job] = {"state": "PENDING", "reason": "Priority", "node": "", "partition": "jupyter"}
        state["scripts"][job] = {"script": sys.stdin.read(), "argv": sys.argv[1:], "env": sorted(os.environ)}
        save(state)
        # a busy scheduler: the job may start (and report) before sbatch returns
        delay = STATE.with_name("sbatch.delay")
        if delay.exists():
            time.sleep(float(delay.read_text()))
        print(job)
    elif cmd == "squeue":
        for job, j in state["jobs"].items():
            print("|".join([job, j["state"], j["reason"], j["node"], "N/A", j["partition"], "100", "N/A"]))
    elif cmd == "scancel":
        for job in sys.argv[1:]:
            state["jobs"].pop(job, None)
        save(state)
    else:
        sys.exit(f"fake_slurm: unknown command {cmd}")


if __name__ == "__main__":
    main()
