"""OpenPBS / PBS Professional: the queue as ``qstat -f -F json`` prints it
(every version's quirks), and what ``qsub -v`` can carry."""

import json
import os
import re

from traitlets import Unicode

from ..proc import run
from .jobs import GONE, PENDING, RUNNING, TAG_PREFIX, UNKNOWN, JobInfo, Scheduler, _parse_time, _positions

#: the job variable (qsub -v, Variable_List) that carries a session job's quota tag
TAG_VARIABLE = "BINDER_JOB_TAG"


def _int(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


# -- OpenPBS's `qstat -f -F json`, as each version prints it -------------------
#
# Two JSON writers are in use, and neither prints every value as it is:
#
# - OpenPBS up to 23.06 writes JSON by hand (src/lib/Libcmds/pbs_json.c), one
#   attribute per line, 4-space indents, `"key":value`. Any value strtod()
#   reads whole is printed bare, as typed: `inf`, `nan`, `1.`, `+5`, `00`,
#   `-007`, `.5` (not JSON), `NaN`, `1e5` (JSON, but numbers now). A
#   backslash in a value that PBS does not escape itself (Submit_arguments)
#   is printed raw (`\s`, and a trailing one escapes the closing quote).
#   Every byte >= 0x80 goes through show_nonprint_chars() with a signed
#   char and comes out as '^' + (byte + 0x40) mod 256: not UTF-8, and a
#   lead byte 0xE2 becomes `^"`, a quote inside the string.
# - OpenPBS master writes with cJSON (tab-indented `"key":\tvalue`): valid,
#   UTF-8 JSON. But number-like strings become numbers first (`0123` -> 123,
#   `1e5` -> 100000, `-007` -> -7, `1.` -> 1, `00` -> 0; `true`/`null` bare),
#   so their text is lost; and Variable_List values keep PBS's own escaping
#   (`\"`, `\'`, `\\`, `\,`), which cJSON escapes again.
#
# Both: a Variable_List value that ends in a backslash, or is empty (`qsub
# -V`), swallows the next variable; that is in the server already.
#
# The parser reads both: it restores the UTF-8 bytes, re-encodes lines that
# are not JSON as strings, keeps the text of every bare number, and undoes
# PBS's escaping in cJSON's Variable_List. What it cannot restore (cJSON's
# numbers) it reads as the text cJSON printed.

#: one `"key":value` line of the hand-written JSON (a comma unless last)
_PBS_JSON_LINE = re.compile(r'^(\s*"[^"]*":)(.*?)(,?)$')
_JSON_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
#: a UTF-8 character as show_nonprint_chars() mangles it: '^' + lead byte
#: (0xC2-0xF4) + 0x40 mod 256, then '^' + each continuation byte + 0x40
_CARET_UTF8 = re.compile(rb"\^([\x02-\x34])((?:\^[\xc0-\xff]){1,3})")
#: cJSON's layout: tab indents, a tab after the colon
_CJSON_LAYOUT = re.compile(r'^\t+"[^"\n]*":\t', re.M)
#: PBS's escaping inside a Variable_List value
_PBS_ESCAPE = re.compile(r"\\([\"'\\,])")


class _Int(int):
    """A JSON integer that remembers how it was printed."""

    text = ""


class _Float(float):
    """A JSON number (or NaN/Infinity) that remembers how it was printed."""

    text = ""


def _keep_text(cls, convert=None):
    def hook(token):
        n = cls(convert(token) if convert else token)
        n.text = token
        return n

    return hook


class _Object(dict):
    """A JSON object that remembers the keys it was given more than once
    (json keeps the last, silently)."""

    duplicates = frozenset()


def _object(pairs):
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen = set()
        obj.duplicates = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _has_duplicates(value):
    """Whether a key is repeated anywhere in this JSON value."""
    if isinstance(value, dict):
        return bool(getattr(value, "duplicates", ())) or any(_has_duplicates(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_duplicates(v) for v in value)
    return False


_NUMBER_HOOKS = {
    "object_pairs_hook": _object,
    "parse_int": _keep_text(_Int),
    "parse_float": _keep_text(_Float),
    "parse_constant": _keep_text(_Float, {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get),
}


def pbs_text(value):
    """A scalar of `qstat -F json` as the text PBS printed (numbers as
    typed, true/false/null as words)."""
    if isinstance(value, str):
        return value
    if getattr(value, "text", ""):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def restore_utf8(raw):
    """`qstat` output as text: UTF-8 as it is; the hand-written writer's
    '^'-mangled bytes turned back into the UTF-8 characters they were."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass

    def sub(m):
        mangled = m.group(1) + m.group(2)[1::2]
        original = bytes((b + 0xC0) & 0xFF for b in mangled)
        try:
            original.decode("utf-8")
        except UnicodeDecodeError:
            return m.group(0)
        return original

    return _CARET_UTF8.sub(sub, raw).decode("utf-8", errors="replace")


def _pbs_unescape(text):
    """A value as OpenPBS meant it: its valid JSON escapes decoded, anything
    else (a lone backslash, an unescaped quote) taken literally."""

    def sub(m):
        esc = m.group(1)
        if esc[0] == "u":
            return chr(int(esc[1:], 16))
        return _JSON_ESCAPES[esc]

    return re.sub(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])', sub, text)


def _repair_pbs_json(text):
    """Re-encode every value line that is not valid JSON as a JSON string."""
    lines = []
    for line in text.splitlines():
        m = _PBS_JSON_LINE.match(line)
        if m and m.group(2) not in ("{", "["):
            key, value, comma = m.groups()
            try:
                json.loads(value, strict=False)
            except ValueError:
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                line = key + json.dumps(_pbs_unescape(value)) + comma
        lines.append(line)
    return "\n".join(lines)


def load_pbs_json(out):
    """`qstat -f -F json` output (bytes or text) of any OpenPBS version as
    a dict; Variable_List values are the strings the job was given.
    Raises ValueError when even the repaired output is not JSON."""
    text = restore_utf8(out)
    if not text.strip():
        return {}
    try:
        data = json.loads(text, strict=False, **_NUMBER_HOOKS)
    except json.JSONDecodeError as e:
        try:
            data = json.loads(_repair_pbs_json(text), strict=False, **_NUMBER_HOOKS)
        except json.JSONDecodeError:
            raise ValueError(f"qstat printed JSON that cannot be read, even repaired: {e}") from None
    cjson = bool(_CJSON_LAYOUT.search(text[:4096]))
    for job in (data.get("Jobs") or {}).values():
        variables = job.get("Variable_List")
        if isinstance(variables, dict):
            for k, v in variables.items():
                v = pbs_text(v)
                variables[k] = _PBS_ESCAPE.sub(r"\1", v) if cjson else v
    return data


class PBSQueue(Scheduler):
    """PBS Pro / OpenPBS through `qstat -f -F json` (see load_pbs_json)."""

    name = "pbs"

    qstat = Unicode("qstat", help="The qstat executable.").tag(config=True)

    _TIME_FMT = "%a %b %d %H:%M:%S %Y"

    def argv(self):
        argv = [self.qstat, "-f", "-F", "json"]
        argv += list(self.partitions)
        return argv

    async def snapshot(self, env=None):
        # bytes: OpenPBS 23.06 prints some as they are not UTF-8
        out = await run(self.argv(), env=env, timeout=self.command_timeout, label="qstat", binary=True)
        return self.parse(out)

    @staticmethod
    def _loads(out):
        return load_pbs_json(out)

    def _time(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _parse_time(pbs_text(value) if value is not None else None, self._TIME_FMT)

    def parse(self, out):
        """{job_id: JobInfo} of `qstat -f -F json` output. Each record is
        checked: a job id given twice, or a record with a key given twice
        (which a value printed raw could have made), is UNKNOWN."""
        data = self._loads(out)
        jobs = {}
        listed = data.get("Jobs") or {}
        for job_id, j in listed.items():
            if job_id in getattr(listed, "duplicates", ()):
                jobs[job_id] = JobInfo(job_id, UNKNOWN, reason="the queue shows more than one record for it")
            elif not isinstance(j, dict) or _has_duplicates(j):
                jobs[job_id] = JobInfo(job_id, UNKNOWN, reason="its queue record is malformed")
            else:
                jobs[job_id] = self._record(job_id, j)
        _positions(jobs)
        return jobs

    def _record(self, job_id, j):
        raw = pbs_text(j.get("job_state", ""))
        if raw in ("Q", "H", "W", "T", "S", "U"):
            state = PENDING
        elif raw in ("R", "E", "B"):
            state = RUNNING
        else:
            state = GONE
        host = pbs_text(j.get("exec_host") or "")
        node = host.split("+")[0].split("/")[0] if state == RUNNING else ""
        est = j.get("estimated") or {}
        start = j.get("stime") if state == RUNNING else (est.get("start_time") if isinstance(est, dict) else None)
        reason = pbs_text(j.get("comment", "")) if state == PENDING else ""
        if raw == "H":
            # the comment only says who held it and when
            holds = pbs_text(j.get("Hold_Types", ""))
            reason = "JobHeldAdmin" if ("o" in holds or "s" in holds) else "JobHeldUser"
        name = pbs_text(j.get("Job_Name", ""))
        owner = pbs_text(j.get("Job_Owner", ""))
        variables = j.get("Variable_List")
        tag = variables.get(TAG_VARIABLE, "") if isinstance(variables, dict) else ""
        return JobInfo(
            job_id=job_id,
            state=state,
            raw_state={
                "Q": "QUEUED",
                "H": "HELD",
                "W": "WAITING",
                "R": "RUNNING",
                "E": "EXITING",
                "F": "FINISHED",
            }.get(raw, raw),
            reason=reason,
            node=node,
            partition=pbs_text(j.get("queue", "")),
            start_time=self._time(start),
            submit_time=self._time(j.get("qtime")),
            priority=_int(j.get("Priority", 0)),
            # Job_Owner is user@submit-host, set by the server
            user=owner.partition("@")[0],
            name=name,
            tag=tag if isinstance(tag, str) and tag.startswith(TAG_PREFIX) else "",
            extra={"name": name, "owner": owner},
        )


def qsub_v_problem(value):
    """Why `qsub -v NAME` (the value taken from qsub's environment) would
    not give the job `value` byte for byte, or None. Measured with OpenPBS
    23.06.06 and master: a lone quote (either kind) makes qsub refuse the
    job ("cannot send environment with the job"), paired double quotes
    arrive as backslashes, every backslash arrives doubled, and trailing
    white space (spaces, tabs, newlines) is stripped. Commas, newlines
    inside, `$()`, control characters and UTF-8 arrive intact."""
    if '"' in value or "'" in value:
        return "it contains a quote, which qsub refuses or turns into a backslash"
    if "\\" in value:
        return "it contains a backslash, which qsub doubles"
    if value != value.rstrip():
        return "it ends in white space, which qsub strips"
    return None


# -- probes: queues, nodes, a short job ------------------------------------------


def client(name, qstat="qstat"):
    """A PBS client command beside the configured `qstat` (c.PBSQueue.qstat):
    sites whose PBS is not on the hub's PATH name it by its full path."""
    return os.path.join(os.path.dirname(qstat), name) if os.sep in qstat else name


def queues_argv(qstat="qstat"):
    return [qstat, "-Q"]


def parse_queues(out):
    """{queue: (enabled, started)} of `qstat -Q`."""
    queues = {}
    for line in out.splitlines()[2:]:
        words = line.split()
        if len(words) >= 5:
            queues[words[0]] = (words[3] == "yes", words[4] == "yes")
    return queues


def nodes_argv(qstat="qstat"):
    return [client("pbsnodes", qstat), "-a"]


def parse_nodes(out):
    """{node: state} of `pbsnodes -a`."""
    nodes, name = {}, None
    for line in out.splitlines():
        if line and not line[0].isspace():
            name = line.strip()
            nodes[name] = ""
        elif name and line.strip().startswith("state = "):
            nodes[name] = line.split("=", 1)[1].strip()
    return nodes


def probe_job_argv(wrap, name, partition="", walltime_min=2, qstat="qstat"):
    """qsub of a short shell command `wrap`, waiting for its end (its exit
    code is qsub's)."""
    argv = [
        client("qsub", qstat),
        "-W",
        "block=true",
        "-N",
        name,
        "-j",
        "oe",
        "-o",
        "/dev/null",
        "-l",
        f"walltime=00:{walltime_min:02d}:00",
    ]
    if partition:
        argv += ["-q", partition]
    return argv + ["--", "/bin/sh", "-c", wrap]


def named_jobs_argv(name, qstat="qstat"):
    return [client("qselect", qstat), "-N", name]


def cancel_argv(job_id, qstat="qstat"):
    return [client("qdel", qstat), job_id]


def comment_of(qstat_f):
    """The comment of a job in `qstat -f` output."""
    return next(
        (line.split("=", 1)[1].strip() for line in qstat_f.splitlines() if line.strip().startswith("comment =")),
        "",
    )
