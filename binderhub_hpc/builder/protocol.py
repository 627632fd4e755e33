"""What a build says, and how it is read: the one definition of the build
log's lines and of the result a remote build sends back.

A build reports through ``progress(kind, payload)``: kind :data:`STATUS`
(payload ``"pending"``, ``"running"``, ``"built"``, ``"failed"``) or
:data:`LOG` (payload: a JSON line with ``phase`` and ``message``, as
repo2docker's ``--json-logs`` writes them). A build that runs elsewhere
(``binderhub-hpc build --json-logs`` on a build node) prints those lines
and, last, a result line; :class:`Relay` turns what the runner reads back
into progress and a result.

Strangers write much of what travels here: a repository's build output
(``RUN`` steps print what they like, on stdout and stderr), its git
server's replies (``ERR`` lines, newlines included), its URL and ref. So:

- every log event, wherever it is forwarded (repo2docker's output, the
  remote CLI's output, BinderHub's adapter), is rebuilt by
  :func:`canonical_log` as exactly ``{"phase": P, "message": M}``, with P
  one of :data:`LOG_PHASES`. ``failed`` (BinderHub fails the build on it)
  comes only from our own code, never from text read off a build; ``ready``
  (the Binder page follows its ``url``), ``built``, ``launching``,
  ``result`` and any other key are never forwarded;
- the result travels signed: the runner makes a key per build
  (:func:`new_result_key`) and hands it to the remote CLI privately (first
  line of its stdin), the CLI signs its result line with it
  (HMAC-SHA256 over the result, image name included), and the runner takes
  only a correctly signed result for the image it asked for
  (:meth:`Relay.__call__`); any other result line is dropped;
- stderr is never parsed: the runners show it as plain text
  (:meth:`Relay.text`).
"""

import hashlib
import hmac
import json
import logging
import re
import secrets

STATUS = "status"
LOG = "log"

#: the phases a log line may carry: repo2docker's own (``fetching``,
#: ``building``, ``pushing``) and ours (``waiting``; ``unknown`` for text
#: that was not a log event). BinderHub and the Binder page act on no other
#: phase of a log line but ``failed``, which only our own code writes.
LOG_PHASES = frozenset({"fetching", "building", "pushing", "waiting", "unknown"})
FAILED = "failed"

#: what a result may say happened (pipeline.BuildResult.outcome)
OUTCOMES = frozenset({"success", "cached", "failure", "cancelled", "timeout"})

#: the form of a result key: hex, as :func:`new_result_key` makes it
RESULT_KEY = re.compile(r"[0-9a-f]{32,128}")

#: what a signature covers besides the result: no other HMAC made with the
#: key (there is none today) can pass for a result's
_DOMAIN = b"binderhub-hpc build result v1\n"

_log = logging.getLogger(__name__)


def log_line(message, phase="building"):
    """A log line in repo2docker's --json-logs format (our own words)."""
    return json.dumps({"phase": phase, "message": message})


def failed_line(message):
    """The log line that says why a build failed (only our own code says so)."""
    return log_line(message.rstrip("\n") + "\n", FAILED)


def text_line(text):
    """`text` (a line of a stream nobody parses, e.g. stderr) as a plain log line."""
    return log_line(text.rstrip("\n") + "\n", "unknown")


def _json_object(line):
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def canonical_log(line, trusted=False):
    """Any line as a log event of exactly ``{"phase": P, "message": M}``.

    A JSON object with a string ``message`` keeps it, and its ``phase`` when
    that is one of :data:`LOG_PHASES` (``failed`` too when `trusted`: our
    own code wrote it); any other phase becomes ``unknown``, every other key
    is dropped. Anything else (plain text, JSON that is not such an object)
    becomes the message, as text, of an ``unknown`` line: it is shown,
    never acted on.
    """
    line = line.rstrip("\n")
    data = _json_object(line)
    if data is None or not isinstance(data.get("message"), str):
        return text_line(line)
    phase = data.get("phase")
    allowed = isinstance(phase, str) and (phase in LOG_PHASES or (trusted and phase == FAILED))
    return log_line(data["message"], phase if allowed else "unknown")


def as_json_log(line):
    """A line of repo2docker's output (its JSON log lines, and whatever
    else its children print) as a log line; its ``failed`` lines become
    plain ones, since a build's own output can write them too (the
    pipeline says why a build failed itself)."""
    return canonical_log(line)


def binderhub_log(payload):
    """A log payload as BinderHub's adapter forwards it to BinderHub, which
    sends it on to the browser verbatim: canonical, with ``failed`` kept
    (every line reaching the adapter was made canonical where it was read
    off a build, or written by our own code)."""
    return canonical_log(payload, trusted=True)


# -- the result ----------------------------------------------------------------------


def new_result_key():
    """A fresh secret for one build's result (the runner keeps it, the remote
    CLI gets it on its stdin)."""
    return secrets.token_hex(32)


def result_record(result):
    """A BuildResult as the JSON object a remote build sends back."""
    return {
        "outcome": result.outcome,
        "image": result.image,
        "path": result.path,
        "error": result.error,
        "metadata": result.metadata,
    }


def _canonical_json(record):
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def result_signature(key, record):
    """HMAC-SHA256 of a result record under the build's key, as hex."""
    return hmac.new(key.encode("ascii"), _DOMAIN + _canonical_json(record), hashlib.sha256).hexdigest()


def result_line(result, key=None):
    """The remote build's last line: its result, signed when `key` is given
    (the runners always give one; an unsigned line serves a person or a
    script running ``binderhub-hpc build --json-logs`` by hand)."""
    record = result_record(result)
    line = {"phase": "result", "message": "", "result": record}
    if key:
        line["signature"] = result_signature(key, record)
    return json.dumps(line)


def is_result_line(data):
    """Whether a parsed line claims to be a result."""
    return isinstance(data, dict) and (data.get("phase") == "result" or "result" in data)


def verify_result(data, key, image):
    """The result record of a parsed result line when it is signed with
    `key` and is about `image`; None otherwise."""
    if not isinstance(data, dict) or not key:
        return None
    record, signature = data.get("result"), data.get("signature")
    if not isinstance(record, dict) or not isinstance(signature, str):
        return None
    try:
        expected = result_signature(key, record)
    except (TypeError, ValueError):
        return None
    if not hmac.compare_digest(expected, signature):
        return None
    if record.get("image") != image or record.get("outcome") not in OUTCOMES:
        return None
    for name in ("path", "error"):
        if not isinstance(record.get(name, ""), str):
            return None
    if not isinstance(record.get("metadata", {}), dict):
        return None
    return record


def quoted(text, limit=300):
    """A stranger's text for a log: escaped (no line breaks, no control
    characters), and cut to `limit` characters."""
    text = str(text)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class Relay:
    """Turns the remote CLI's output into progress and a result.

    ``relay(line)`` takes a line of its stdout: a correctly signed result
    for `image` becomes :attr:`result` (the first one; any other result line
    is dropped, and logged), every other line goes to progress as a
    canonical log line. ``relay.text(line)`` takes a line of its stderr (or
    of anything else nobody parses) and shows it as plain text.
    """

    def __init__(self, progress, key, image, log=None):
        self.progress = progress
        self.key = key
        self.image = image
        self.log = log or _log
        self.result = None
        self.dropped = 0
        self.lines = 0

    def __call__(self, line):
        self.lines += 1
        data = _json_object(line.rstrip("\n"))
        if is_result_line(data):
            record = verify_result(data, self.key, self.image)
            if record is not None and self.result is None:
                self.result = record
            else:
                self.dropped += 1
                self.log.warning(
                    "Dropped a result line of the build of %s that is not its signed result: %s",
                    self.image,
                    quoted(line.rstrip("\n")),
                )
            return
        if line.strip():
            self.progress(LOG, canonical_log(line))

    def text(self, line):
        if line.strip():
            self.progress(LOG, text_line(line))
