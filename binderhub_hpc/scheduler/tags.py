"""Quota tags: what a session job carries so that BinderHub's launch quotas
can count it, and nothing else can be counted.

Every account on the cluster can submit a job with any name and comment
(Slurm) or variable (PBS), and read every other job's. So a tag that anyone
can compute (a plain hash of the image name), or copy from another job,
lets any account fill a repository's quota with held jobs. A tag here is
keyed by a secret only the service holds (the hub, which tags its jobs,
and BinderHub, which counts them), read from an environment variable named
by :attr:`JobTags.key_env`::

    binder-image:<repository>.<nonce>.<mac>

- ``repository``: HMAC of the image name without its tag (the ref), so one
  repository's sessions are counted together, whichever ref they run;
- ``nonce``: random per submission;
- ``mac``: HMAC of the job account, the repository and the nonce.

A tag verifies only on a job of the account it was made for, so another
account copying a session's tag onto its own jobs gains nothing, and
copies of one tag (the job account re-submitting its own tag by hand)
count once. Without the key no one can make a tag that verifies.

:func:`count_sessions` is the quota's count over a queue snapshot; BinderHub's
adapter (:class:`binderhub_hpc.binderhub.SchedulerLaunchQuota`) is a thin
layer over it.
"""

import hashlib
import hmac
import os
import re
import secrets

from traitlets import Unicode, validate
from traitlets.config import LoggingConfigurable

from .jobs import PENDING, RUNNING, TAG_PREFIX

#: the environment variable that holds the key unless configured otherwise
DEFAULT_KEY_ENV = "BINDERHUB_HPC_JOB_TAG_KEY"
#: the shortest key accepted (characters): 128 bits as hex
MIN_KEY_LENGTH = 32
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAG = re.compile(r"^" + re.escape(TAG_PREFIX) + r"([0-9a-f]{16})\.([0-9a-f]{12})\.([0-9a-f]{32})$")


class MissingTagKey(ValueError):
    """The key is not in the environment (or too short to be one)."""


def repository_of(image):
    """An image name without its tag (BinderHub's image names always have
    one; a registry port such as ``host:5000/name`` is not a tag)."""
    name, sep, tag = image.rpartition(":")
    return name if sep and "/" not in tag else image


class JobTags(LoggingConfigurable):
    """Makes and checks quota tags with a key from the environment (the
    key itself is never configuration: it is named, as every secret)."""

    key_env = Unicode(
        DEFAULT_KEY_ENV,
        help="""The environment variable holding the secret that quota tags
        are keyed with (at least 32 characters, e.g. `openssl rand -hex 32`).
        JupyterHub (which tags session jobs) and BinderHub (whose
        SchedulerLaunchQuota counts them) must both have it, with the same
        value, and nothing else: the site puts it in the root-only
        secrets.env both systemd units read. The configuration is refused
        when it is missing.""",
    ).tag(config=True)

    @validate("key_env")
    def _valid_name(self, proposal):
        if not _ENV_NAME.fullmatch(proposal.value):
            raise ValueError(f"{proposal.value!r} is not an environment variable name")
        return proposal.value

    def key(self):
        """The key as bytes, or MissingTagKey saying what to do."""
        value = os.environ.get(self.key_env, "")
        if len(value) < MIN_KEY_LENGTH:
            what = "is not set" if not value else f"holds only {len(value)} characters"
            raise MissingTagKey(
                f"${self.key_env} {what}: quota tags need a secret of at least {MIN_KEY_LENGTH} "
                f"characters that only the hub and BinderHub hold. Put {self.key_env}=<openssl rand -hex 32> "
                "in /etc/binderhub-hpc/secrets.env (root, 0600; both systemd units read it), "
                "or name another variable with c.JobTags.key_env."
            )
        return value.encode()

    def _mac(self, *parts):
        return hmac.new(self.key(), b"\0".join(p.encode() for p in parts), hashlib.sha256).hexdigest()

    def repository_id(self, image):
        """The keyed id of `image`'s repository (what a tag's first part holds)."""
        return self._mac("repository", repository_of(image))[:16]

    def new_tag(self, image, user):
        """A tag for one submission of `image` by the job account `user`."""
        repo = self.repository_id(image)
        nonce = secrets.token_hex(6)
        return f"{TAG_PREFIX}{repo}.{nonce}.{self._mac('job', user, repo, nonce)[:32]}"

    def verify(self, tag, user):
        """The repository id of `tag` if it was made for a job of `user`, else
        None. Without the key: MissingTagKey, never "no tag verifies"."""
        self.key()
        m = _TAG.fullmatch(tag or "")
        if not m or not user:
            return None
        repo, nonce, mac = m.groups()
        return repo if hmac.compare_digest(mac, self._mac("job", user, repo, nonce)[:32]) else None


def count_sessions(jobs, tags, image, job_user=""):
    """(sessions, sessions of `image`'s repository) among `jobs` (JobInfo
    records of a queue snapshot): pending or running jobs whose tag
    verifies for the job's own account, of `job_user` only when it is set.
    A tag counts once however many jobs carry it."""
    repo = tags.repository_id(image)
    counted = {}
    for j in jobs:
        if j.state not in (PENDING, RUNNING) or (job_user and j.user != job_user):
            continue
        r = tags.verify(j.tag, j.user)
        if r is not None:
            counted[(j.user, j.tag)] = r
    return len(counted), sum(1 for r in counted.values() if r == repo)
