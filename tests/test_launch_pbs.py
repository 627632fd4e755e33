"""PBS Pro / OpenPBS: queue parsing from `qstat -f -F json` recorded on
real servers, the job script, job ids and the exact scheduler command lines.

tests/data/pbs-<version>/ hold what OpenPBS printed for real jobs (a
running one, one queued behind it, held ones, a finished one, one with
hostile values in its variables, name and arguments, the whole queue, an
empty queue); meta.json says which job is which and how to record them
again (`python3 -m binderhub_hpc_testing.pbs --pbs-prefix PREFIX record DIR`).
pbs-23.06 is v23.06.06 with its hand-written JSON writer; pbs-master is
OpenPBS master (also calling itself 23.06.06) writing with cJSON.
"""

import asyncio
import json
import os
import pwd
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.objects import Hub, Server
from tornado import web

from binderhub_hpc.scheduler import jobs as jobs_mod
from binderhub_hpc.scheduler.jobs import GONE, PENDING, RUNNING, UNKNOWN, plain_reason
from binderhub_hpc.scheduler.pbs import PBSQueue, load_pbs_json, pbs_text, qsub_v_problem
from binderhub_hpc.spawner import spawner as spawner_mod
from binderhub_hpc.spawner.runtime import SessionImage
from binderhub_hpc.spawner.spawner import PBSBinderSpawner

from spawnerutil import StubUser

DATA = Path(__file__).parent / "data"
#: the job account in these tests: this process's own (it must exist)
ME = pwd.getpwuid(os.getuid()).pw_name
API_TOKEN = "apitoken-0123456789abcdef"
BINDER_TOKEN = "bindertoken-fedcba9876543210"
VERSIONS = sorted(p.name[len("pbs-") :] for p in DATA.glob("pbs-*") if (p / "meta.json").is_file())


def ctime_ts(text):
    return time.mktime(time.strptime(text, "%a %b %d %H:%M:%S %Y"))


class Recorded:
    """One OpenPBS version's recorded outputs."""

    def __init__(self, version):
        self.version = version
        self.dir = DATA / f"pbs-{version}"
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.ids = self.meta["jobs"]
        self.cjson = self.meta["json_writer"] == "cJSON"

    def raw(self, name):
        return (self.dir / f"{name}.json").read_bytes()

    def jobs(self, name="queue"):
        return PBSQueue().parse(self.raw(name))

    def job(self, kind, name="queue"):
        return self.jobs(name)[self.ids[kind]]


@pytest.fixture(params=VERSIONS)
def rec(request):
    return Recorded(request.param)


def test_both_versions_are_recorded():
    assert {"23.06", "master"} <= set(VERSIONS)


# ------------------------------------------------------------------ parsing
def test_the_recordings_show_each_writers_quirks(rec):
    """What the parser has to cope with is in the recorded bytes themselves."""
    raw = rec.raw("hostile")
    if not rec.cjson:
        # 23.06: not UTF-8 (ü as '^' + 0x03 '^' + 0xfc), not JSON (bare inf,
        # 00, +5; a raw \s and a trailing backslash in Submit_arguments)
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        assert b'"HOSTILE_UTF8":"^\x03^\xfcn' in raw
        assert b'"Job_Name":inf,' in raw and b'"HOSTILE_ZEROS":00,' in raw and b'"HOSTILE_PLUS":+5,' in raw
        assert b"/bin/echo a\\sb " in raw and b' x\\",\n' in raw
        with pytest.raises(ValueError):
            json.loads(raw.decode("utf-8", errors="replace"))
    else:
        # master: valid UTF-8 JSON, numbers instead of number-like strings,
        # and PBS's escaping escaped once more in Variable_List
        data = json.loads(raw.decode("utf-8"))
        variables = data["Jobs"][rec.ids["hostile"]]["Variable_List"]
        assert variables["HOSTILE_OCTAL"] == 123 and variables["HOSTILE_EXP"] == 100000
        assert variables["HOSTILE_QUOTES"] == "say \\\"hi\\\" to \\'them\\'"
        assert variables["HOSTILE_UTF8"] == "ünïcødé ✓ 日本"


def test_parse_states_nodes_queues_and_positions(rec):
    jobs = rec.jobs("queue")
    assert set(jobs) == {rec.ids[k] for k in ("running", "queued", "held", "held_by_operator", "hostile")}

    run = rec.job("running")
    assert (run.state, run.raw_state, run.node, run.partition) == (RUNNING, "RUNNING", "pbsdev", "batch")
    assert run.reason == "" and run.position is None
    stime = load_pbs_json(rec.raw("queue"))["Jobs"][rec.ids["running"]]["stime"]
    assert run.start_time == ctime_ts(stime)  # stime once running

    queued = rec.job("queued")
    assert (queued.state, queued.raw_state, queued.node, queued.partition) == (PENDING, "QUEUED", "", "batch")
    assert queued.reason.startswith("Not Running: Insufficient amount of queue resource: ncpus (R: 1 A: 0 T: ")
    est = load_pbs_json(rec.raw("queue"))["Jobs"][rec.ids["queued"]]["estimated"]["start_time"]
    assert queued.start_time == ctime_ts(est)  # estimated.start_time while pending
    assert queued.submit_time and queued.submit_time <= queued.start_time

    held, admin, hostile = rec.job("held"), rec.job("held_by_operator"), rec.job("hostile")
    assert (held.state, held.raw_state, held.reason) == (PENDING, "HELD", "JobHeldUser")
    assert (admin.state, admin.raw_state, admin.reason) == (PENDING, "HELD", "JobHeldAdmin")
    assert plain_reason(held.reason) == "held by its owner"
    assert plain_reason(admin.reason) == "held by an administrator"
    assert (hostile.state, hostile.extra["name"]) == (PENDING, "inf")
    # equal priority: in the order they were submitted
    assert [j.position for j in (queued, held, admin, hostile)] == [1, 2, 3, 4]
    assert {j.pending_in_partition for j in (queued, held, admin, hostile)} == {4}


def test_each_recording_alone(rec):
    assert rec.job("running", "running").state == RUNNING
    assert rec.job("queued", "queued").position == 1
    assert rec.job("held", "held").reason == "JobHeldUser"
    assert rec.job("held_by_operator", "held_by_operator").reason == "JobHeldAdmin"
    assert rec.job("hostile", "hostile").raw_state == "HELD"


def test_finished_job_is_gone(rec):
    """`qstat -x` (job history) shows finished jobs: they are gone for a spawner."""
    done = rec.job("finished", "finished")
    assert (done.state, done.raw_state, done.partition) == (GONE, "FINISHED", "interactive")


def test_empty_queue(rec):
    assert rec.jobs("empty") == {}
    assert PBSQueue().parse(b"") == {} and PBSQueue().parse("") == {}


def test_describe_pbs_pending_job(rec, monkeypatch):
    queued = rec.job("queued")
    # after the estimate: not shown
    monkeypatch.setattr(jobs_mod.time, "time", lambda: queued.start_time + 600)
    msg = queued.describe()
    assert msg.startswith(f"Job {rec.ids['queued']} is waiting in the batch queue (position 1 of 4): ")
    assert "waiting for free resources (ncpus: it needs 1, 0 of " in msg and "free in its queue" in msg
    assert "Not Running" not in msg and "Expected start" not in msg
    # before it: shown
    monkeypatch.setattr(jobs_mod.time, "time", lambda: queued.start_time - 600)
    assert "Expected start: " in queued.describe() and "(in about 10 min)" in queued.describe()


def test_every_record_names_its_job_and_its_owner(rec):
    """The quota counts by account: Job_Owner (user@host, set by the
    server) gives it."""
    jobs = rec.jobs("queue")
    assert {j.user for j in jobs.values()} == {"binder"}
    assert rec.job("running").name == "running" and rec.job("hostile").name == "inf"
    assert all(j.tag == "" for j in jobs.values())  # none was submitted by the spawner


def with_variable(rec, kind, name, value, file="queue"):
    """A recording with one more variable in a job's Variable_List, written
    the way that version's writer writes one."""
    lines = rec.raw(file).decode("utf-8", errors="surrogateescape").split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f'"{rec.ids[kind]}":'))
    at = next(i for i in range(start, len(lines)) if '"Variable_List":' in lines[i]) + 1
    first = lines[at]
    indent = first[: len(first) - len(first.lstrip())]
    sep = ":\t" if rec.cjson else ":"
    lines.insert(at, f"{indent}{json.dumps(name)}{sep}{json.dumps(value)},")
    return "\n".join(lines).encode("utf-8", errors="surrogateescape")


def test_the_quota_tag_is_the_jobs_binder_job_tag_variable(rec):
    from binderhub_hpc.scheduler.tags import JobTags, count_sessions

    tags = JobTags()
    image = "binderhub-hpc/binder-x-abc:" + "a" * 40
    tag = tags.new_tag(image, "binder")
    jobs = PBSQueue().parse(with_variable(rec, "running", "BINDER_JOB_TAG", tag))
    run = jobs[rec.ids["running"]]
    assert (run.user, run.tag) == ("binder", tag)
    assert count_sessions(jobs.values(), tags, image) == (1, 1)
    assert count_sessions(jobs.values(), tags, image, job_user="mallory") == (0, 0)
    # the same value under another name, or another value, is no tag
    other = PBSQueue().parse(with_variable(rec, "running", "BINDER_JOB_TAG_X", tag))
    assert other[rec.ids["running"]].tag == ""
    junk = PBSQueue().parse(with_variable(rec, "running", "BINDER_JOB_TAG", "x" + tag))
    assert junk[rec.ids["running"]].tag == ""


def hand_written(jobs):
    """qstat -f -F json output as OpenPBS 23.06 writes it, of (id, [(key, value)]) pairs."""
    out = ["{", '    "timestamp":1795613514,', '    "pbs_version":"23.06.06",', '    "Jobs":{']
    for n, (job_id, attrs) in enumerate(jobs):
        out.append(f'        "{job_id}":{{')
        out += [
            f'            "{k}":{json.dumps(v)}' + ("," if i < len(attrs) - 1 else "") for i, (k, v) in enumerate(attrs)
        ]
        out.append("        }" + ("," if n < len(jobs) - 1 else ""))
    return "\n".join(out + ["    }", "}", ""])


def test_a_job_listed_twice_or_an_attribute_given_twice_is_unknown():
    """One record per job, one value per attribute: anything else is a
    forgery or a fault, and which one is true cannot be told."""
    base = [("Job_Name", "binder-a"), ("Job_Owner", "binder@pbsdev"), ("job_state", "R"), ("queue", "batch")]
    out = hand_written(
        [
            ("1.pbsdev", base),
            ("1.pbsdev", base[:2] + [("job_state", "F"), ("queue", "batch")]),
            ("2.pbsdev", base + [("Job_Owner", "mallory@pbsdev")]),
            ("3.pbsdev", base + [("Variable_List", {"BINDER_JOB_TAG": "binder-image:a", "A": "1"})]),
            ("4.pbsdev", base + [("job_state", "Q")]),
        ]
    ).replace('"A": "1"', '"BINDER_JOB_TAG": "binder-image:b"')
    jobs = PBSQueue().parse(out)
    assert jobs["1.pbsdev"].state == UNKNOWN and "more than one record" in jobs["1.pbsdev"].reason
    assert [jobs[i].state for i in ("2.pbsdev", "3.pbsdev", "4.pbsdev")] == [UNKNOWN] * 3


#: what a Variable_List value becomes in each writer's output, where it is
#: not what the job was given: a trailing backslash or (23.06) an empty
#: value swallows the next variable (in the server already, or in qstat's
#: own splitting), and cJSON prints number-like strings as numbers
LOSSES = {
    "both": {"HOSTILE_TRAILING_BACKSLASH": 'C:,HOSTILE_JSON={"k": [1, 2]}', "HOSTILE_JSON": None},
    "hand-written": {"HOSTILE_EMPTY": ",LOGNAME=binder"},
    "cJSON": {
        "HOSTILE_ONE_DOT": "1",
        "HOSTILE_ZEROS": "0",
        "HOSTILE_OCTAL": "123",
        "HOSTILE_EXP": "100000",
        "HOSTILE_NEG": "-7",
    },
}


def test_hostile_values_read_as_the_job_was_given_them(rec):
    data = load_pbs_json(rec.raw("hostile"))
    job = data["Jobs"][rec.ids["hostile"]]
    variables = job["Variable_List"]
    expected = dict(rec.meta["hostile_variables"])
    expected.update(LOSSES["both"])
    expected.update(LOSSES["cJSON" if rec.cjson else "hand-written"])
    got = {k: variables.get(k) for k in expected}
    assert got == expected
    assert all(isinstance(v, str) for v in variables.values())
    assert pbs_text(job["Job_Name"]) == rec.meta["hostile_name"]
    # Submit_arguments: the raw backslashes (23.06), quotes and non-ASCII
    assert job["Submit_arguments"].endswith(" -- " + " ".join(rec.meta["hostile_args"]))


def test_numbers_keep_their_text():
    """23.06 prints number-like values bare, as typed: the text survives."""
    text = (
        '{\n    "Jobs":{\n        "1.s":{\n            "job_state":"Q",\n            "Job_Name":NaN,\n'
        '            "Variable_List":{\n                "A":1e5,\n                "B":-007,\n'
        '                "C":Infinity,\n                "D":0.50\n            }\n        }\n    }\n}'
    )
    job = load_pbs_json(text)["Jobs"]["1.s"]
    assert job["Variable_List"] == {"A": "1e5", "B": "-007", "C": "Infinity", "D": "0.50"}
    assert pbs_text(job["Job_Name"]) == "NaN"
    assert PBSQueue().parse(text)["1.s"].extra["name"] == "NaN"


@pytest.mark.parametrize(
    "line, value",
    [
        # pbs_json.c escapes a quote only when a character precedes it
        ('"comment":""quoted" by a hook",', '"quoted" by a hook'),
        ('"Submit_arguments":"-- /bin/sh -c echo \\$HOME",', "-- /bin/sh -c echo \\$HOME"),  # no JSON escape
        ('"PBS_O_WORKDIR":"C:\\",', "C:\\"),  # a trailing backslash eats the closing quote
    ],
)
def test_repair_of_other_pre_cjson_escapes(line, value):
    text = (
        '{\n    "pbs_version":"22.05.11",\n    "Jobs":{\n        "7.s":{\n            "job_state":"Q",\n'
        f"            {line}\n"
        '            "queue":"workq"\n        }\n    }\n}\n'
    )
    job = load_pbs_json(text)["Jobs"]["7.s"]
    assert list(job.values())[1] == value
    assert PBSQueue().parse(text)["7.s"].state == PENDING


def test_caret_that_is_no_mangled_utf8_is_left_alone():
    # invalid UTF-8 elsewhere, so the restoring path runs
    raw = (
        b'{\n    "Jobs":{\n        "1.s":{\n            "job_state":"Q",\n            "Job_Name":"x^2",\n'
        b'            "comment":"\xff"\n        }\n    }\n}'
    )
    job = PBSQueue().parse(raw)["1.s"]
    assert job.extra["name"] == "x^2" and job.reason == "\ufffd"


def test_unreadable_output_is_an_error_not_an_empty_queue():
    with pytest.raises(ValueError):
        PBSQueue().parse('{\n    "Jobs":{\n        "1.s":{\n            "job_state":"R",\n')


def test_qstat_argv():
    assert PBSQueue().argv() == ["qstat", "-f", "-F", "json"]
    assert PBSQueue(qstat="/opt/pbs/bin/qstat", partitions=["workq", "gpu"]).argv() == [
        "/opt/pbs/bin/qstat",
        "-f",
        "-F",
        "json",
        "workq",
        "gpu",
    ]


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
    sp.image = "binder/x:abc"  # as start() sets it
    return sp


def render(sp):
    return asyncio.run(sp._get_batch_script(**sp.template_vars()))


def test_rendered_script():
    sp = make_spawner(
        req_queue="workq",
        req_runtime="01:00:00",
        req_nprocs="2",
        req_memory="4gb",
        req_account="proj42",
        req_options="-W group_list=binder",
    )
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
    names = v[len("#PBS -v ") :].split(",")
    # qsub -v copies values into Variable_List, which qstat -f shows to other
    # users, and changes some: only the hub's kept variables and the job
    # account's identity go that way; the tokens and every session value in
    # a private file
    assert set(names) <= set(sp.env_keep) | {"USER", "HOME", "SHELL", "BINDER_JOB_TAG"}
    assert "USER" in names
    # the job's login shell sets the node's PATH over any value qsub carries
    assert "PATH" not in names
    # the quota tag is the one session value qsub -v carries (ours, not the user's)
    assert "BINDER_JOB_TAG" in names
    assert not any(n.startswith(("JUPYTER", "BINDER")) for n in names if n != "BINDER_JOB_TAG")
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


@pytest.mark.parametrize(
    "output, job_id",
    [
        ("1234.pbs-server\n", "1234.pbs-server"),
        ("1234.pbs-server.example.org", "1234.pbs-server.example.org"),
        ("1234[].pbs-server\n", "1234[].pbs-server"),
        ("1234[7].pbs-server\n", "1234[7].pbs-server"),
        ("1234", "1234"),
        ("qsub: warning: something\n1235.pbs\n", "1235.pbs"),
    ],
)
def test_parse_job_id(output, job_id):
    assert make_spawner().parse_job_id(output) == job_id


@pytest.mark.parametrize(
    "output",
    [
        "",
        "\n",
        "qsub: Bad UID for job execution",
        "1234.pbs server",
        "1234.pbs;rm -rf /",
        "abc.pbs-server",
        "1234.pbs-server\nqsub: error",
    ],
)
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


@pytest.mark.parametrize(
    "prefix, expect_prefix",
    [
        ("", []),
        ("sudo -E -u {username}", ["sudo", "-E", "-u", ME]),
    ],
)
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
    assert sub.argv == expect_prefix + ["qsub", "-f"]
    assert "#PBS -v " in sub.input and API_TOKEN not in sub.input and BINDER_TOKEN not in sub.input
    assert path in sub.input
    assert API_TOKEN not in json.dumps(sub.env) and BINDER_TOKEN not in json.dumps(sub.env)
    # the quota tag: in qsub's environment, named in -v, made for the job account
    (v,) = [line for line in sub.input.splitlines() if line.startswith("#PBS -v ")]
    assert "BINDER_JOB_TAG" in v.split()[-1].split(",")
    assert sp.job_tags.verify(sub.env["BINDER_JOB_TAG"], ME) == sp.job_tags.repository_id("binder/x:abc")
    assert "BINDER_JOB_TAG" not in secrets.input

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


# ------------------------------------------------------------------ the job's environment
#: what qsub -v does to a value (OpenPBS 23.06.06 and master, measured with
#: real jobs; tests/test_pbs_e2e.py submits the spawner's own)
@pytest.mark.parametrize(
    "value, changed",
    [
        ('{"k": 1}', True),  # paired quotes arrive as backslashes
        ('say "hi', True),
        ("it's", True),  # qsub refuses the job
        ("C:\\tmp", True),  # doubled
        ("trailing  ", True),
        ("nl\n", True),
        ("tab\t", True),  # stripped
        ("a,b=c", False),
        ("line1\nline2", False),
        ("ünïcødé ✓", False),
        ("$(id) `id`", False),
        ("  leading", False),
        ("", False),
        ("a\x01b", False),
        ("0123", False),
    ],
)
def test_qsub_v_problem(value, changed):
    assert bool(qsub_v_problem(value)) == changed


HOSTILE_OPTIONS = {
    "image": "binder/x:abc",
    "token": "tok'en\"\\ ü \n",
    "repo_url": 'https://example.org/"quoted"/it\'s,a,b.git',
    "binder_ref_url": "https://example.org/$(touch /tmp/x)/`id`/${HOME}\\",
    "binder_launch_host": "https://binder.example.org/ünï  ",
    "binder_request": "v2/gh/a/b/c\n#PBS -l select=99\n",
}


def test_every_session_value_goes_in_the_private_file_and_survives_bash():
    """With secrets_in_file (the PBS default) qsub -v carries only the hub's
    kept variables and the job account's identity; everything else is in
    the private file, which the job script sources: as it was, whatever it is."""
    sp = make_spawner('o\'brien "x" ü')
    sp.user_options = dict(HOSTILE_OPTIONS)
    env = sp.get_env()
    in_file = sp.file_env_names(env)
    assert {
        "JUPYTERHUB_API_TOKEN",
        "JUPYTER_TOKEN",
        "JUPYTERHUB_USER",
        "JUPYTERHUB_OAUTH_SCOPES",
        "BINDER_REF_URL",
        "BINDER_REPO_URL",
        "BINDER_REQUEST",
        "JUPYTERHUB_API_URL",
    } <= in_file
    assert not in_file & {"USER", "HOME", "SHELL", "PATH"}
    text = sp._secrets_text(env)
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    out = subprocess.run(
        ["bash", "-c", 'set -a; . /dev/stdin; set +a; exec python3 -c "$0"', dump],
        input=text,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got = json.loads(out)
    assert {n: got.get(n) for n in in_file} == {n: env[n] for n in in_file}


def test_private_file_names_must_be_shell_names():
    sp = make_spawner()
    sp.environment = {"NOT-A-NAME": "x"}
    with pytest.raises(web.HTTPError, match="cannot be handed to a job"):
        sp._secrets_text(sp.get_env())


def test_without_the_private_file_qsub_never_runs_for_a_value_it_would_change(monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(spawner_mod, "run", fake)
    sp = make_spawner(secrets_in_file=False)
    sp.user_options = dict(HOSTILE_OPTIONS)
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(sp.submit_batch_script())
    assert "through qsub -v" in e.value.log_message and "secrets_in_file" in e.value.log_message
    assert fake.calls == []  # nothing written, nothing submitted


def test_job_names_pbs_takes():
    assert PBSBinderSpawner.job_name_for('o\'brien "x" ü') == "binder-o-brien--x---"
    assert PBSBinderSpawner.job_name_for("x" * 100) == "binder-" + "x" * 57
