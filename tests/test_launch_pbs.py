"""PBS Pro / OpenPBS: queue parsing from recorded `qstat -f -F json` output,
the job script, job ids and the exact scheduler command lines.

tests/data/qstat-f-F-json-*.json are laid out as OpenPBS 22.05/23.06 print
them (src/lib/Libcmds/pbs_json.c before the cJSON writer: 4-space indents,
`"key":value` per line, ctime() times, bare numbers for numeric-looking
values, backslashes kept as received). OpenPBS is in no registry reachable
here: the test that submits through a real qsub runs only where it is on PATH.
"""

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.objects import Hub, Server

from binderhub_hpc.spawner import spawner as spawner_mod
from binderhub_hpc.spawner.queue import GONE, PENDING, RUNNING, PBSQueue, plain_reason
from binderhub_hpc.spawner.runtime import SessionImage
from binderhub_hpc.spawner.spawner import PBSBinderSpawner

from spawnerutil import StubUser

DATA = Path(__file__).parent / "data"
#: the job account in these tests: this process's own (it must exist)
ME = pwd.getpwuid(os.getuid()).pw_name
API_TOKEN = "apitoken-0123456789abcdef"
BINDER_TOKEN = "bindertoken-fedcba9876543210"


def ctime_ts(text):
    return time.mktime(time.strptime(text, "%a %b %d %H:%M:%S %Y"))


def recorded(name):
    return (DATA / f"qstat-f-F-json-{name}.json").read_text()


# ------------------------------------------------------------------ parsing
def test_parse_states_nodes_queues_and_positions():
    jobs = PBSQueue().parse(recorded("jobs"))
    assert set(jobs) == {f"{n}.pbs-server" for n in (1230, 1234, 1235, 1236, 1237)}

    run = jobs["1230.pbs-server"]
    assert (run.state, run.raw_state, run.node, run.partition) == (RUNNING, "RUNNING", "node01", "workq")
    assert run.start_time == ctime_ts("Thu Apr 25 10:30:03 2024")  # stime once running
    assert run.reason == "" and run.position is None

    bob, carol = jobs["1234.pbs-server"], jobs["1235.pbs-server"]
    for j in (bob, carol):
        assert (j.state, j.raw_state, j.node, j.partition) == (PENDING, "QUEUED", "", "workq")
        assert j.reason == "Not Running: Insufficient amount of resource: ncpus (R: 2 A: 0 T: 2)"
        assert j.start_time == ctime_ts("Thu Apr 25 11:30:03 2024")  # estimated.start_time
    assert bob.submit_time == ctime_ts("Thu Apr 25 10:34:57 2024")
    # carol was submitted later but has the higher Priority: she goes first
    assert (carol.priority, bob.priority) == (10, 0)
    assert (carol.position, bob.position) == (1, 2)

    held = jobs["1236.pbs-server"]
    assert (held.state, held.raw_state, held.reason) == (PENDING, "HELD", "JobHeldUser")
    assert plain_reason(held.reason) == "held by its owner"
    assert held.position == 3 and {j.pending_in_partition for j in (bob, carol, held)} == {3}

    gpu = jobs["1237.pbs-server"]
    assert (gpu.partition, gpu.position, gpu.pending_in_partition) == ("gpu", 1, 1)
    # estimated.start_time 0 is printed as UNKNOWN; the day of month is
    # space-padded by ctime()
    assert gpu.start_time is None
    assert gpu.submit_time == ctime_ts("Thu Apr  4 09:05:00 2024")
    assert "ngpus" in plain_reason(gpu.reason)


def test_describe_pbs_pending_job():
    jobs = PBSQueue().parse(recorded("jobs"))
    msg = jobs["1234.pbs-server"].describe()
    assert msg.startswith("Job 1234.pbs-server is waiting in the workq queue (position 2 of 3): ")
    assert "Insufficient amount of resource: ncpus (R: 2 A: 0 T: 2)" in msg
    assert "Not Running" not in msg
    # an estimate from April 2024 is in the past: not shown
    assert "Expected start" not in msg


def test_parse_held_by_an_operator():
    text = recorded("jobs").replace('"Hold_Types":"u"', '"Hold_Types":"o"')
    held = PBSQueue().parse(text)["1236.pbs-server"]
    assert held.reason == "JobHeldAdmin"


def test_variable_list_quirk_is_repaired():
    """Values OpenPBS 22/23 print as invalid JSON (bare -007, .5, +0100, inf),
    beside a `qsub -V` environment with a bash function whose value holds
    braces, must not make the whole queue unreadable."""
    text = recorded("variable-list-quirk")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text, strict=False)
    jobs = PBSQueue().parse(text)
    assert set(jobs) == {"1301.pbs-server", "1302.pbs-server", "1303.pbs-server"}
    assert all(j.state == PENDING and j.partition == "workq" for j in jobs.values())
    assert [jobs[f"{n}.pbs-server"].position for n in (1301, 1302, 1303)] == [1, 2, 3]
    # the repaired values read as PBS meant them
    data = PBSQueue._loads(text)["Jobs"]
    assert data["1302.pbs-server"]["Variable_List"]["RUN_OFFSET"] == "-007"
    assert data["1302.pbs-server"]["Variable_List"]["SCALE"] == ".5"
    assert data["1302.pbs-server"]["Variable_List"]["MODE"] == "inf"
    assert data["1301.pbs-server"]["Variable_List"]["PS1"] == "\\u@\\h:\\w\\$ "
    func = data["1301.pbs-server"]["Variable_List"]["BASH_FUNC_module%%"]
    assert func.startswith("() {  unset _mlshdbg;\n if [ \"${MODULES_SILENT_SHELL_DEBUG:-0}\" = '1' ]")
    assert func.endswith('bash "$@")"\n}')


@pytest.mark.parametrize(
    "line, value",
    [
        ('"comment":""quoted" by a hook",', '"quoted" by a hook'),  # leading '"' left unescaped
        ('"Submit_arguments":"-- /bin/sh -c echo \\$HOME",', "-- /bin/sh -c echo \\$HOME"),  # no JSON escape
        ('"PBS_O_WORKDIR":"C:\\",', "C:\\"),  # a trailing backslash eats the closing quote
    ],
)
def test_repair_of_other_pre_cjson_escapes(line, value):
    text = ('{\n    "pbs_version":"22.05.11",\n    "Jobs":{\n        "7.s":{\n            "job_state":"Q",\n'
            f"            {line}\n"
            '            "queue":"workq"\n        }\n    }\n}\n')
    data = PBSQueue._loads(text)
    job = data["Jobs"]["7.s"]
    assert list(job.values())[1] == value
    assert PBSQueue().parse(text)["7.s"].state == PENDING


def test_unreadable_output_is_an_error_not_an_empty_queue():
    with pytest.raises(ValueError):
        PBSQueue().parse('{\n    "Jobs":{\n        "1.s":{\n            "job_state":"R",\n')


def test_empty_queue():
    assert PBSQueue().parse(recorded("empty")) == {}
    assert PBSQueue().parse("") == {}


def test_finished_and_moved_jobs_are_gone():
    text = recorded("jobs").replace('"job_state":"R"', '"job_state":"F"')
    assert PBSQueue().parse(text)["1230.pbs-server"].state == GONE


def test_qstat_argv():
    assert PBSQueue().argv() == ["qstat", "-f", "-F", "json"]
    assert PBSQueue(qstat="/opt/pbs/bin/qstat", partitions=["workq", "gpu"]).argv() == [
        "/opt/pbs/bin/qstat", "-f", "-F", "json", "workq", "gpu"]


# ------------------------------------------------------------------ spawner
def make_spawner(name="alice", **config):
    config.setdefault("job_user", ME)
    config.setdefault("container_runtime", "apptainer")
    sp = PBSBinderSpawner(
        user=StubUser(name),
        hub=Hub(ip="127.0.0.1", port=8081, base_url="/hub/"),
        api_token=API_TOKEN,
        oauth_client_id=f"jupyterhub-user-{name}",
        **config,
    )
    sp.server = Server(base_url=f"/user/{name}/")
    sp.user_options = {"image": "binder/x:abc", "token": BINDER_TOKEN}
    sp._image_path = SessionImage("/shared/registry/binder/x/abc.sif", 36864)
    return sp


def render(sp):
    return asyncio.run(sp._get_batch_script(**sp.template_vars()))


def test_rendered_script():
    sp = make_spawner(req_queue="workq", req_runtime="01:00:00", req_nprocs="2", req_memory="4gb",
                      req_account="proj42", req_options="-W group_list=binder")
    script = render(sp)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#PBS -N binder-alice" in lines
    assert "#PBS -q workq" in lines
    assert "#PBS -l walltime=01:00:00" in lines
    assert "#PBS -l select=1:ncpus=2:mem=4gb" in lines
    assert "#PBS -A proj42" in lines
    assert "#PBS -j oe" in lines
    assert "#PBS -W group_list=binder" in lines
    assert f"#PBS -o {sp.req_homedir}/" in lines
    (v,) = [line for line in lines if line.startswith("#PBS -v ")]
    names = v[len("#PBS -v "):].split(",")
    # qsub -v copies values into Variable_List, which qstat -f shows to other
    # users: secrets are not passed that way at all, but in a private file
    assert "JUPYTERHUB_API_TOKEN" not in names and "JUPYTER_TOKEN" not in names
    assert "JUPYTERHUB_API_URL" in names
    assert all("=" not in n for n in names)  # names only: qsub takes values from its env
    secrets = sp._secrets_path()
    assert secrets.startswith(sp.req_homedir + "/.binder-secrets.")
    assert f"set -a; . {secrets}; set +a; rm -f -- {secrets}" in script
    assert API_TOKEN not in script and BINDER_TOKEN not in script
    assert "apptainer exec" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_rendered_script_gpus_and_host():
    sp = make_spawner(req_queue="gpu", req_host="pbs2", req_ngpus="2")
    script = render(sp)
    assert "#PBS -q gpu@pbs2" in script.splitlines()
    assert "#PBS -l select=1:ngpus=2" in script.splitlines()
    assert " --nv " in script
    assert "#PBS -l walltime" not in script and "export BINDER_WALLTIME_SECONDS" not in script  # no runtime asked for


@pytest.mark.parametrize("output, job_id", [
    ("1234.pbs-server\n", "1234.pbs-server"),
    ("1234.pbs-server.example.org", "1234.pbs-server.example.org"),
    ("1234[].pbs-server\n", "1234[].pbs-server"),
    ("1234[7].pbs-server\n", "1234[7].pbs-server"),
    ("1234", "1234"),
    ("qsub: warning: something\n1235.pbs\n", "1235.pbs"),
])
def test_parse_job_id(output, job_id):
    assert make_spawner().parse_job_id(output) == job_id


@pytest.mark.parametrize("output", [
    "", "\n", "qsub: Bad UID for job execution", "1234.pbs server", "1234.pbs;rm -rf /",
    "abc.pbs-server", "1234.pbs-server\nqsub: error",
])
def test_parse_job_id_refuses_garbage(output):
    with pytest.raises(RuntimeError):
        make_spawner().parse_job_id(output)


class FakeRun:
    """Stands in for commands.run: records argv, stdin and environment."""

    def __init__(self, out="1234.pbs-server\n"):
        self.calls = []
        self.out = out

    async def __call__(self, argv, input=None, env=None, timeout=30, label=None):
        self.calls.append(SimpleNamespace(argv=argv, input=input, env=env))
        return self.out


@pytest.mark.parametrize("prefix, expect_prefix", [
    ("", []),
    ("sudo -E -u {username}", ["sudo", "-E", "-u", ME]),
])
def test_qsub_and_qdel_argv(monkeypatch, prefix, expect_prefix):
    fake = FakeRun()
    monkeypatch.setattr(spawner_mod, "run", fake)
    sp = make_spawner(exec_prefix=prefix)
    assert asyncio.run(sp.submit_batch_script()) == "1234.pbs-server"
    create, secrets, sub = fake.calls[0], fake.calls[1], fake.calls[2]
    # the tokens go first into a 0600 file of the job account, on stdin ...
    path = sp._secrets_path()
    assert create.argv == expect_prefix + ["install", "-m", "600", "/dev/null", path]
    assert secrets.argv == expect_prefix + ["tee", path]
    assert f"JUPYTERHUB_API_TOKEN={API_TOKEN}" in secrets.input
    assert f"JUPYTER_TOKEN={BINDER_TOKEN}" in secrets.input
    assert API_TOKEN not in json.dumps(secrets.env)
    # ... and neither in the script nor in qsub's environment
    assert sub.argv == expect_prefix + ["qsub"]
    assert "#PBS -v " in sub.input and API_TOKEN not in sub.input and BINDER_TOKEN not in sub.input
    assert path in sub.input
    assert API_TOKEN not in json.dumps(sub.env) and BINDER_TOKEN not in json.dumps(sub.env)

    asyncio.run(sp.cancel_batch_job())
    cancel = fake.calls[3]
    assert cancel.argv == expect_prefix + ["qdel", "1234.pbs-server"]
    # qdel gets no secret: only the kept variables and the job account's identity
    assert API_TOKEN not in json.dumps(cancel.env) and BINDER_TOKEN not in json.dumps(cancel.env)
    assert cancel.env["USER"] == ME
    assert set(cancel.env) <= set(sp.env_keep) | {"USER", "HOME", "SHELL"}


def test_submit_refuses_garbage_job_id(monkeypatch):
    monkeypatch.setattr(spawner_mod, "run", FakeRun(out="qsub: would exceed queue generic's per-user limit\n"))
    with pytest.raises(RuntimeError, match="no job id"):
        asyncio.run(make_spawner().submit_batch_script())


# ------------------------------------------------------------------ real PBS
@pytest.mark.skipif(not shutil.which("qsub") or not shutil.which("qstat") or not shutil.which("qdel"),
                    reason="OpenPBS (qsub/qstat/qdel) is not on PATH")
def test_real_qsub_qstat_qdel(tmp_path):
    """Submit the rendered script through the real qsub as the current
    account, see it in `qstat -f -F json`, cancel it with qdel."""
    sp = make_spawner(job_dir=str(tmp_path), req_runtime="00:05:00")

    async def go():
        job_id = await sp.submit_batch_script()
        assert sp.parse_job_id(job_id) == job_id
        try:
            jobs = await PBSQueue().snapshot()
            assert job_id in jobs and jobs[job_id].state in (PENDING, RUNNING)
        finally:
            await sp.cancel_batch_job()
        return job_id

    asyncio.run(go())
