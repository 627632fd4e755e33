"""What a build says, and how it is read: the one definition of the build
log's lines and of the result a remote build sends back.

A build reports through ``progress(kind, payload)``: kind :data:`STATUS`
(payload ``"pending"``, ``"running"``, ``"built"``, ``"failed"``) or
:data:`LOG` (payload: a JSON line with ``phase`` and ``message``, as
repo2docker's ``--json-logs`` writes them). A build that runs elsewhere
(``binderhub-hpc build --json-logs`` on a build node) prints those lines
and, last, a result line; :class:`Relay` turns what the runner reads back
into progress and a result.
"""

import json

STATUS = "status"
LOG = "log"


def log_line(message, phase="building"):
    """A log line in repo2docker's --json-logs format."""
    return json.dumps({"phase": phase, "message": message})


def failed_line(message):
    """The log line that says why a build failed."""
    return log_line(message.rstrip("\n") + "\n", "failed")


def as_json_log(line):
    """repo2docker's own JSON lines pass (a missing phase becomes 'unknown');
    anything else is wrapped, as BinderHub's local build does."""
    line = line.rstrip("\n")
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if isinstance(data, dict):
        if "phase" in data and "message" in data:
            return line
        data.setdefault("phase", "unknown")
        data.setdefault("message", "")
        return json.dumps(data)
    return log_line(line + "\n", phase="unknown")


def result_record(result):
    """A BuildResult as the JSON object a remote build sends back."""
    return {
        "outcome": result.outcome,
        "image": result.image,
        "path": result.path,
        "error": result.error,
        "metadata": result.metadata,
    }


def result_line(result):
    """The remote build's last line: its result."""
    return json.dumps({"phase": "result", "message": "", "result": result_record(result)})


class Relay:
    """Turns the remote CLI's output lines into progress and a result."""

    def __init__(self, progress):
        self.progress = progress
        self.result = {}
        self.lines = 0

    def __call__(self, line):
        self.lines += 1
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("phase") == "result":
            self.result.update(data.get("result") or {})
        elif isinstance(data, dict):
            self.progress(LOG, line.rstrip("\n"))
        elif line.strip():
            self.progress(LOG, json.dumps({"phase": "unknown", "message": line.rstrip("\n") + "\n"}))
