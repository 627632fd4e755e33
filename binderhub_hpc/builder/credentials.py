"""Git credentials for private repositories, from a private file.

BinderHub hands a build executor ``git_credentials`` (git-credential format,
``username=...`` / ``password=...`` lines) and used to rely on repo2docker
reading them from ``GIT_CREDENTIAL_ENV``; repo2docker 2026.4 no longer does,
so they were silently unused. Here they are written to a file only the
build account can read (mode 0600, in the build's private scratch
directory), and git is told, through its environment, to ask a credential
helper that prints that file. The environment holds the file's path, not
the secret; the secret is never on a command line (``ps``), never in the
repository's build context or the image, and the file goes with the build's
scratch directory. The helper answers only for the repository's own
scheme, host and port (``credential.<url>.helper``), so a submodule on
another host never sees them.
"""

import contextlib
import os
import shlex
import shutil
import tempfile
from urllib.parse import urlsplit


class CredentialsError(ValueError):
    """Credentials that cannot be used; the message is for the build log."""


def credential_url(repo_url):
    """``scheme://host[:port]`` of a repository URL git fetches over HTTP(S)."""
    parts = urlsplit(repo_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CredentialsError(
            f"git credentials were given for {repo_url!r}, which is not an http(s) URL: "
            "only http(s) repositories can use them"
        )
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def write_credentials(text, directory):
    """Write `text` (git-credential format) to a new 0600 file in `directory`."""
    if "\0" in text:
        raise CredentialsError("git credentials cannot contain a NUL byte")
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    if not lines or not all("=" in line for line in lines):
        raise CredentialsError("git credentials must be 'key=value' lines (username=..., password=...)")
    path = os.path.join(directory, "git-credentials")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def helper_environment(repo_url, path):
    """Environment entries that make git use the file at `path` for `repo_url`.

    ``GIT_CONFIG_COUNT``/``KEY``/``VALUE`` are git's own way to set config
    from the environment (git >= 2.31); the helper is a shell function that
    prints the file for ``get`` and ignores ``store``/``erase``.
    """
    url = credential_url(repo_url)
    helper = f'!f() {{ test "$1" = get && cat {shlex.quote(path)}; }}; f'
    return {
        "GIT_CONFIG_COUNT": "2",
        # no other helper (a site's credential store) answers for this host
        "GIT_CONFIG_KEY_0": f"credential.{url}.helper",
        "GIT_CONFIG_VALUE_0": "",
        "GIT_CONFIG_KEY_1": f"credential.{url}.helper",
        "GIT_CONFIG_VALUE_1": helper,
    }


@contextlib.contextmanager
def credential_environment(repo_url, text):
    """Environment entries for one git command with `text` as credentials
    (none when `text` is empty), from a private file removed afterwards."""
    if not text:
        yield {}
        return
    d = tempfile.mkdtemp(prefix="bhpc-git-")
    try:
        yield helper_environment(repo_url, write_credentials(text, d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
