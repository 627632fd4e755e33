"""Jobs another cluster account can submit to lie about ours: names and
comments that squeue prints beside our jobs, made to forge records of them
for a parser that reads squeue's output as lines of text (``%i|%T|...``,
split on every Unicode line break), and quota tags made the old, public
way or copied from a real session job.

Used by the attack tests (``tests/test_attacks.py``) and by the recorder
of real ``squeue --json`` output (:mod:`binderhub_hpc_testing.slurmrecord`):
the stranger (``DevCluster.stranger_user``) submits them held, so they
never run.
"""

import hashlib

#: every character str.splitlines() breaks a line at
LINE_BREAKS = {
    "LF": "\n",
    "CR": "\r",
    "VT": "\v",
    "FF": "\f",
    "FS": "\x1c",
    "GS": "\x1d",
    "RS": "\x1e",
    "NEL": "\x85",
    "LS": "\u2028",
    "PS": "\u2029",
}
#: text a forged pending reason carries: must never reach a waiting user
FORGED_REASON = "Continue at https://binder-login.example/"
#: the longest comment (and job name) Slurm 22.05 accepts, in bytes
COMMENT_MAX = 1024


def _cut(text, size):
    """`text` cut to at most `size` bytes of UTF-8, whole characters only."""
    return text.encode()[:size].decode(errors="ignore")


def old_line(job_id, state, reason="None", node="", partition="batch", user="binder", name="binder-x", tag=""):
    """A record in the format squeue was once read in
    (``%i|%T|%r|%N|%S|%P|%Q|%V|%u|%j|%k``)."""
    return "|".join([str(job_id), state, reason, node, "N/A", partition, "100", "N/A", user, name, tag])


def public_tag(image):
    """A quota tag as it once was: a plain hash of the image name, which
    anyone can compute."""
    return "binder-image:" + hashlib.sha256(image.rsplit(":", 1)[0].encode()).hexdigest()[:16]


def hostile_jobs(running, pending, tag, image, service_user="binder", marker="forged"):
    """[(label, name, comment)] of the stranger's jobs against a running
    session job `running` and a pending one `pending` of `service_user`,
    whose quota tag is `tag`, running `image`. Names and comments are text,
    or bytes where they are not UTF-8."""
    forged_end = old_line(running, "CANCELLED", user=service_user, tag=tag)
    forged_run = old_line(pending, "RUNNING", node="c1", user=service_user, tag=tag)
    forged_reason = old_line(pending, "PENDING", reason=FORGED_REASON + marker, user=service_user, tag=tag)
    quota_lines = [
        old_line(9000000 + i, "RUNNING", node="c1", user=service_user, name=f"binder-q{i}", tag=public_tag(image))
        for i in range(50)
    ]
    jobs = []
    for label, br in LINE_BREAKS.items():
        # the session ended; the pending launch runs, or waits for a reason of ours
        jobs.append((f"comment-{label}", "x", "c" + br + forged_end + br + forged_reason))
        jobs.append((f"name-{label}", "n" + br + forged_run + br + "x", "c"))
        jobs.append((f"quota-{label}", "binder-q", "c" + br + br.join(quota_lines[:5])))
    jobs += [
        ("bars", "binder-x|y|RUNNING", f"a|{running}|CANCELLED|b"),
        # forged records filling a comment to the most Slurm takes (22.05:
        # 1024 bytes), and 10 KB of them, which Slurm 22.05 refuses
        ("large", "binder-big", _cut("c\u2028" + "\u2028".join(quota_lines * 4), COMMENT_MAX)),
        ("huge", "binder-huge", _cut("c\u2028" + "\u2028".join(quota_lines * 4), 10 * 1024)),
        # a quota tag the old way, and a real session's tag copied
        ("public-tag", "binder-public", public_tag(image)),
        ("copied-tag", "binder-copy", tag),
        # squeue's own JSON, closed and reopened inside a string
        (
            "json",
            'a"b\\c\x01\x1b[31m',
            f'"}}, {{"job_id": {running}, "job_state": "CANCELLED", "user_name": "{service_user}", "comment": "',
        ),
        # not UTF-8
        ("bytes", b"binder-\xff\xfe", b"c\xff\xfe\xc3(\n" + forged_end.encode()),
    ]
    return jobs


def held_job_argv(name, comment, partition="interactive"):
    """sbatch of a held job that would do nothing if it ever ran. squeue
    lists partitions by name, pending jobs before running ones: in
    `interactive` the stranger's lines come after the sessions' in `batch`,
    where a parser that lets a later line win takes them."""
    as_bytes = isinstance(name, bytes) or isinstance(comment, bytes)
    enc = (lambda s: s if isinstance(s, bytes) else s.encode()) if as_bytes else (lambda s: s)
    return [
        "sbatch",
        "--parsable",
        "--hold",
        f"--partition={partition}",
        "--output=/dev/null",
        "--chdir=/tmp",
        enc("--job-name=") + enc(name),
        enc("--comment=") + enc(comment),
        "--wrap=true",
    ]
