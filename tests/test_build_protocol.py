"""The build channel, offline: what a build's log lines may say, the signed
result, stderr kept apart, and the remote runner reading a stand-in (or the
real) ``binderhub-hpc build`` through a stand-in for ssh.

The attacks on the real dev cluster, through both runners, are in
tests/test_attacks.py.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from binderhub_hpc.binderlink import RefError, resolve_ref
from binderhub_hpc.builder import protocol
from binderhub_hpc.builder.pipeline import BuildRequest
from binderhub_hpc.builder.process import run_streaming
from binderhub_hpc.builder.protocol import (
    LOG_PHASES,
    Relay,
    as_json_log,
    binderhub_log,
    canonical_log,
    failed_line,
    new_result_key,
    result_signature,
    verify_result,
)
from binderhub_hpc.builder.runners import SSHRunner
from binderhub_hpc.registry import SIFRegistry

REPO = str(Path(__file__).resolve().parent.parent)
IMAGE = "binderhub-hpc/binder-test-channel:" + "a" * 40
ELSEWHERE = "https://elsewhere.example/"


def record(outcome="success", image=IMAGE, error="", path="/r/x.sif"):
    return {"outcome": outcome, "image": image, "path": path, "error": error, "metadata": {}}


def signed_line(key, rec):
    return json.dumps({"phase": "result", "message": "", "result": rec, "signature": result_signature(key, rec)})


#: lines a stranger's build prints: events BinderHub or the Binder page
#: would act on, and results
FORGED = [
    json.dumps({"phase": "ready", "message": "Server ready\n", "url": ELSEWHERE, "token": "t"}),
    json.dumps({"phase": "ready", "url": ELSEWHERE}),
    json.dumps({"phase": "result", "message": "", "result": record()}),
    json.dumps({"phase": "result", "message": "", "result": record(), "signature": "0" * 64}),
    json.dumps({"result": record()}),
    json.dumps({"phase": "built", "message": "Built\n", "imageName": IMAGE}),
    json.dumps({"phase": "launching", "message": "Launching\n"}),
    json.dumps({"phase": "failed", "message": "forged failure\n"}),
    json.dumps({"phase": "building", "message": "x\n", "url": ELSEWHERE}),
    json.dumps({"phase": "READY", "message": "x\n", "url": ELSEWHERE}),
]


def assert_plain(events, failed_from=("Build failed: ", "Build stopped: ")):
    """Every event is exactly a plain log line; 'failed' only as our runner says it."""
    for e in events:
        assert set(e) == {"phase", "message"} and isinstance(e["message"], str), e
        assert e["phase"] in LOG_PHASES | {"failed"}, e
        if e["phase"] == "failed":
            assert e["message"].startswith(failed_from), e


# -- log lines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    FORGED
    + [
        "plain text",
        "",
        "[1, 2]",
        '"a string"',
        "null",
        '{"phase": "building", "message": ["not", "text"]}',
        '{"phase": {"x": 1}, "message": "m"}',
        '{"message": "m"}',
        "{not json",
        "[" * 100_000,
        '{"phase": "building", "message": "\\u2028\\u0000\\u001b[2J"}',
    ],
)
def test_every_log_line_is_rebuilt_as_exactly_a_phase_and_a_message(line):
    for out in (canonical_log(line), as_json_log(line + "\n"), binderhub_log(line)):
        event = json.loads(out)
        assert set(event) == {"phase", "message"} and isinstance(event["message"], str)
        assert event["phase"] in LOG_PHASES | {"failed"}
    untrusted = json.loads(as_json_log(line))
    assert untrusted["phase"] in LOG_PHASES


def test_a_forged_ready_event_never_leaves_as_anything_but_a_plain_message():
    line = json.dumps({"phase": "ready", "message": "Server ready\n", "url": ELSEWHERE, "token": "t"})
    events = []
    relay = Relay(lambda kind, payload: events.append(json.loads(binderhub_log(payload))), "k" * 64, IMAGE)
    relay(line + "\n")
    relay.text(line + "\n")
    events.append(json.loads(as_json_log(line)))
    assert len(events) == 3
    for e in events:
        assert set(e) == {"phase", "message"} and e["phase"] == "unknown", e
    # the stderr copy shows the line as text; nothing carries a url to follow
    assert ELSEWHERE in events[1]["message"]
    assert not any("url" in e for e in events)


def test_only_our_own_code_can_say_a_build_failed():
    forged = '{"phase": "failed", "message": "forged\\n"}'
    assert json.loads(as_json_log(forged)) == {"phase": "unknown", "message": "forged\n"}
    events = []
    relay = Relay(lambda k, p: events.append(json.loads(p)), new_result_key(), IMAGE)
    relay(forged)
    relay.text(forged)
    assert [e["phase"] for e in events] == ["unknown", "unknown"]
    # our runner's and pipeline's own failure lines reach BinderHub as they are
    ours = failed_line("Build failed: the reason")
    assert json.loads(binderhub_log(ours)) == {"phase": "failed", "message": "Build failed: the reason\n"}


@pytest.mark.parametrize("line", FORGED)
def test_binderhubs_adapter_passes_on_only_plain_log_lines(line):
    """BinderHub json.loads each payload, fails the build on a 'failed'
    phase, and sends the payload on to the browser as it is."""
    out = binderhub_log(line)
    event = json.loads(out)
    assert out == json.dumps({"phase": event["phase"], "message": event["message"]})
    assert event["phase"] not in ("ready", "built", "launching", "result")
    if event["phase"] == "failed":
        # the adapter trusts what our code made canonical; a line from a
        # build went through as_json_log or the relay first
        assert json.loads(as_json_log(line))["phase"] == "unknown"


# -- the signed result ----------------------------------------------------------------


def test_a_result_signed_with_the_builds_key_for_its_image_is_taken():
    key = new_result_key()
    assert protocol.RESULT_KEY.fullmatch(key) and key != new_result_key()
    data = json.loads(signed_line(key, record()))
    assert verify_result(data, key, IMAGE) == record()


@pytest.mark.parametrize(
    "how",
    ["unsigned", "another key", "replayed from another build", "another image", "tampered", "unknown outcome"],
)
def test_a_result_not_signed_for_this_build_and_image_is_dropped(how):
    key = new_result_key()
    rec = record()
    if how == "unsigned":
        line = json.dumps({"phase": "result", "message": "", "result": rec})
    elif how == "another key":
        line = signed_line(new_result_key(), rec)
    elif how == "replayed from another build":
        line = signed_line(new_result_key(), rec)  # a real result of an earlier build of the image
    elif how == "another image":
        line = signed_line(key, record(image="binderhub-hpc/binder-other:" + "b" * 40))
    elif how == "tampered":
        data = json.loads(signed_line(key, record(outcome="failure", error="e")))
        data["result"]["outcome"], data["result"]["error"] = "success", ""
        line = json.dumps(data)
    else:
        line = signed_line(key, record(outcome="built"))
    events = []
    relay = Relay(lambda k, p: events.append(json.loads(p)), key, IMAGE)
    relay(line + "\n")
    assert relay.result is None and relay.dropped == 1
    assert events == []  # a result line is never a log line either


def test_the_first_signed_result_counts_and_later_ones_are_dropped():
    key = new_result_key()
    relay = Relay(lambda k, p: None, key, IMAGE)
    relay(signed_line(key, record(outcome="failure", error="first")))
    relay(signed_line(key, record()))
    assert relay.result["outcome"] == "failure" and relay.dropped == 1


def test_stderr_is_shown_as_text_and_never_parsed():
    """Even a correctly signed result is no result on stderr."""
    key = new_result_key()
    events = []
    relay = Relay(lambda k, p: events.append(json.loads(p)), key, IMAGE)
    for line in [signed_line(key, record()), *FORGED]:
        relay.text(line + "\n")
    assert relay.result is None
    assert [e["phase"] for e in events] == ["unknown"] * (1 + len(FORGED))
    assert [e["message"] for e in events] == [line + "\n" for line in [signed_line(key, record()), *FORGED]]


def test_a_forged_result_line_is_logged_escaped(caplog):
    relay = Relay(lambda k, p: None, new_result_key(), IMAGE)
    with caplog.at_level("WARNING"):
        relay(json.dumps({"phase": "result", "result": record(error="x\ny")}) + "\n")
    (message,) = [r.getMessage() for r in caplog.records]
    assert "not its signed result" in message and "\n" not in message


# -- stderr kept apart ----------------------------------------------------------------


def test_run_streaming_keeps_stderr_apart_when_asked_and_merges_it_otherwise():
    argv = ["/bin/sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"]
    out, err = [], []
    assert run_streaming(argv, out.append, on_stderr=err.append) == 0
    assert (out, err) == (["out1\n", "out2\n"], ["err1\n", "err2\n"])
    merged = []
    assert run_streaming(argv, merged.append) == 0
    assert sorted(merged) == ["err1\n", "err2\n", "out1\n", "out2\n"]


# -- the SSH runner and a stand-in remote build ---------------------------------------

FAKE_CLI = """
import json, os, sys
sys.path.insert(0, {repo!r})
from binderhub_hpc.builder import protocol
args = sys.argv[1:]
image = args[args.index("--image") + 1]
key = sys.stdin.readline().strip() if "--result-key-stdin" in args else ""
creds = sys.stdin.read()
def out(line): print(line, flush=True)
def err(line): print(line, file=sys.stderr, flush=True)
def say(m): out(json.dumps({{"phase": "building", "message": m + "\\n"}}))
def signed(outcome, error="", path=""):
    rec = {{"outcome": outcome, "image": image, "path": path, "error": error, "metadata": {{}}}}
    out(json.dumps({{"phase": "result", "message": "", "result": rec, "signature": protocol.result_signature(key, rec)}}))
"""


def fake_ssh(tmp_path):
    """A stand-in for ssh that runs the remote command string with sh (with
    this checkout on PYTHONPATH: the runner's environment is allowlisted)."""
    ssh = tmp_path / "ssh"
    ssh.write_text(f'#!/bin/sh\nshift; shift\nexport PYTHONPATH={REPO}\nexec /bin/sh -c "$1"\n')
    ssh.chmod(0o755)
    return str(ssh)


def registry(tmp_path, published=()):
    from binderhub_hpc.sif import minimal_sif

    reg = SIFRegistry(root=str(tmp_path / "registry"))
    for image in published:
        tmp = reg.tempfile(image, "sif")
        tmp.write_bytes(minimal_sif(b"x"))
        reg.publish(image, {"sif": tmp})
    return types.SimpleNamespace(registry=reg)


def ssh_build(tmp_path, body, published=(IMAGE,), request=None, cli=None):
    """Run SSHRunner against a stand-in remote build running `body`; returns
    (result, the events progress got, parsed)."""
    if cli is None:
        script = tmp_path / "fake-cli"
        script.write_text(FAKE_CLI.format(repo=REPO) + body)
        cli = [sys.executable, str(script)]
    runner = SSHRunner(host="build", ssh=[fake_ssh(tmp_path)], cli=cli)
    events = []
    result = runner.run(
        registry(tmp_path, published),
        request or BuildRequest("https://example.org/r", "a" * 40, IMAGE),
        lambda kind, payload: events.append(json.loads(payload)),
    )
    return result, events


def test_the_ssh_runner_takes_the_signed_result_and_relays_the_log(tmp_path):
    from prometheus_client import REGISTRY

    def successes():
        return REGISTRY.get_sample_value("binderhub_hpc_builds_total", {"outcome": "success"}) or 0

    before = successes()
    result, events = ssh_build(tmp_path, "say('hi'); signed('success', path='/elsewhere.sif')")
    assert result.outcome == "success", result.error
    # the path is the registry's own, not what the build said
    assert result.path == str(registry(tmp_path).registry.lookup(IMAGE))
    assert events == [{"phase": "building", "message": "hi\n"}]
    # counted where BinderHub serves /metrics, not only on the build host
    assert successes() == before + 1


def test_a_remote_build_printing_forged_results_and_events_on_stdout_and_stderr_fails(tmp_path):
    body = "".join(f"out({line!r}); err({line!r})\n" for line in FORGED) + "say('done'); sys.exit(0)\n"
    result, events = ssh_build(tmp_path, body)
    assert result.outcome == "failure"
    assert "no signed result" in result.error and "without a valid signature were ignored" in result.error
    assert_plain(events)
    assert [e["phase"] for e in events].count("failed") == 1
    assert not any(e["phase"] in ("ready", "built", "launching", "result") for e in events)


def test_a_signed_success_for_an_image_that_is_not_in_the_registry_fails(tmp_path):
    result, events = ssh_build(tmp_path, "signed('success', path='/r/x.sif')", published=())
    assert result.outcome == "failure" and "is not in the registry" in result.error, result.error
    assert events[-1]["phase"] == "failed"


def test_a_signed_failure_is_said_once_by_the_runner(tmp_path):
    body = (
        "out(json.dumps({'phase': 'failed', 'message': 'Build failed: the reason\\n'}))\n"
        "signed('failure', 'the reason')\n"
    )
    result, events = ssh_build(tmp_path, body)
    assert result.outcome == "failure" and result.error == "the reason"
    assert [e for e in events if e["phase"] == "failed"] == [
        {"phase": "failed", "message": "Build failed: the reason\n"}
    ]


def test_the_result_key_reaches_the_remote_build_first_on_stdin_and_nowhere_else(tmp_path):
    body = """
say(f"key={protocol.RESULT_KEY.fullmatch(key) is not None}")
say(f"in-argv={any(key in a for a in sys.argv)} in-env={any(key in v for v in os.environ.values())}")
say(f"creds={creds!r}")
signed('success')
"""
    request = BuildRequest("https://example.org/r", "a" * 40, IMAGE, git_credentials="username=u\npassword=p\n")
    result, events = ssh_build(tmp_path, body, request=request)
    assert result.outcome == "success", result.error
    said = "".join(e["message"] for e in events)
    assert "key=True" in said and "in-argv=False in-env=False" in said
    assert "creds='username=u\\npassword=p\\n'" in said


# -- the real build command -----------------------------------------------------------

CLI = [sys.executable, "-m", "binderhub_hpc.cli"]


def test_the_build_command_refuses_a_repository_url_with_control_characters_without_a_traceback(tmp_path):
    url = 'https://example.org/r\n{"phase": "ready", "url": "https://elsewhere.example/"}\x1b[2J'
    p = subprocess.run(
        [*CLI, "build", "--registry-root", str(tmp_path), "--", url, "main"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("binderhub-hpc build: ") and "is not a repository URL" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1


@pytest.mark.parametrize("url", ["https://x/r\x00", "https://x/r\n", "https://x/\x1b[2Jr", "https://x/\x85r", ""])
def test_a_nul_or_control_character_in_a_repository_url_is_a_ref_error(url):
    for ref in ("main", "a" * 40):
        with pytest.raises(RefError, match="is not a repository URL"):
            resolve_ref(url, ref)


def test_the_build_command_refuses_a_result_key_that_is_not_one(tmp_path):
    p = subprocess.run(
        [*CLI, "build", "--json-logs", "--result-key-stdin", "--registry-root", str(tmp_path), "--", "/nowhere"],
        input="not a key\n",
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == "" and "--result-key-stdin" in p.stderr


def test_a_url_carrying_forged_events_reaches_the_ssh_runner_as_a_signed_failure(tmp_path):
    """The real build command, behind the stand-in ssh: it refuses the URL
    and says so in its signed result; the runner says it once."""
    url = (
        "https://example.org/r\n"
        + json.dumps({"phase": "result", "message": "", "result": record()})
        + "\n"
        + json.dumps({"phase": "ready", "message": "", "url": ELSEWHERE})
    )
    result, events = ssh_build(
        tmp_path,
        "",
        request=BuildRequest(url, "main", IMAGE),
        cli=CLI,
    )
    assert result.outcome == "failure" and "is not a repository URL" in result.error, result.error
    assert_plain(events)
    assert [e["phase"] for e in events] == ["failed"], events
    assert "\n" not in events[0]["message"].rstrip("\n")


def test_a_git_servers_err_reply_reaches_the_ssh_runner_only_as_escaped_text(tmp_path):
    """A real git server (this machine's loopback) answers info/refs with an
    ERR carrying line breaks, a forged result and a forged ready event; the
    real build command resolves the ref against it."""
    from binderhub_hpc_testing.gitserver import GitServer

    root = tmp_path / "served"
    root.mkdir()
    err = "\n".join(["no such repository", json.dumps({"phase": "result", "message": "", "result": record()})])
    err += "\n" + json.dumps({"phase": "ready", "message": "", "url": ELSEWHERE}) + "\n"
    with GitServer(root) as server:
        url = server.answer_with_err("evil", err)
        result, events = ssh_build(tmp_path, "", request=BuildRequest(url, "main", IMAGE), cli=CLI)
        assert any(r["path"] == "/evil/info/refs?service=git-upload-pack" for r in server.requests())
    assert result.outcome == "failure", result.error
    assert "cannot resolve 'main'" in result.error and "remote error: no such repository\\n" in result.error
    assert_plain(events)
    assert [e["phase"] for e in events] == ["failed"], events
    assert "\n" not in result.error


def test_the_repository_url_is_escaped_in_the_build_error_and_the_python_log(tmp_path, caplog):
    """git's refusal of a private repository names it; a URL with a line
    break stays one line in the error and in the log."""
    from binderhub_hpc_testing.repo import make_pipeline

    r2d = tmp_path / "r2d"
    r2d.write_text("#!/bin/sh\necho 'fatal: could not read Username: terminal prompts disabled'\nexit 128\n")
    r2d.chmod(0o755)
    pipeline = make_pipeline(tmp_path / "registry", Repo2Docker__command=[str(r2d)])
    url = "https://example.org/r\n" + json.dumps({"phase": "ready", "url": ELSEWHERE})
    events = []
    with caplog.at_level("WARNING"):
        result = pipeline.run(BuildRequest(url, "a" * 40, IMAGE), lambda k, p: events.append(json.loads(p)))
    assert result.outcome == "failure" and "asks for credentials" in result.error, result.error
    assert repr(url) in result.error and "\n" not in result.error
    logged = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert logged and not any("\n" in m for m in logged), logged
    assert_plain(events, failed_from=("Build failed: ",))
