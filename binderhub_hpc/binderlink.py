"""What a Binder link means, computed the way BinderHub computes it,
without importing ``binderhub``: the image name a repository and ref build
into, the ref resolved to a commit, and the temporary user name, token and
``user_options`` of a launch."""

import base64
import hashlib
import os
import random
import re
import string
import subprocess
import uuid
from urllib.parse import quote, urlparse

SHA1 = re.compile(r"^[0-9a-f]{40}$")


# -- image names as BinderHub makes them ------------------------------------------


def _escape(s, safe):
    # escapism.escape(s, safe=safe, escape_char="-"): '-' + hex per UTF-8 byte
    out = []
    for ch in s:
        if ch in safe:
            out.append(ch)
        else:
            out.extend(f"-{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def safe_build_slug(build_slug, limit, hash_length=6):
    """BinderHub's ``_safe_build_slug``: escaped slug, cut, plus a hash."""
    digest = hashlib.sha256(build_slug.encode("utf-8")).hexdigest()
    escaped = _escape(build_slug, set(string.ascii_letters + string.digits))
    return f"{escaped[: limit - hash_length - 1]}-{digest[:hash_length]}".lower()


def build_slug(repo_url):
    """The slug BinderHub's repo provider would give: ``user-repo`` for
    GitHub, the URL itself for other Git repositories."""
    u = urlparse(repo_url)
    if u.hostname in ("github.com", "www.github.com"):
        parts = [p for p in u.path.split("/") if p]
        if len(parts) >= 2:
            repo = parts[1][:-4] if parts[1].endswith(".git") else parts[1]
            return f"{parts[0]}-{repo}"
    return repo_url


def image_name(repo_url, ref, prefix):
    slug = safe_build_slug(build_slug(repo_url), limit=255 - len(prefix))
    return f"{prefix}{slug}:{ref}".replace("_", "-").lower()


class RefError(ValueError):
    """A ref that cannot be resolved; the message is for the user."""


def _has_control(text):
    return any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in text)


def _said(text, limit=500):
    """What git said, escaped for a message (it may quote the server's
    replies: a stranger's text, line breaks included)."""
    text = text.strip()
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def resolve_ref(repo, ref, timeout=60, env=None):
    """A commit SHA for `ref`: local checkouts through rev-parse, remote
    repositories through ls-remote (as BinderHub's providers do). Raises
    RefError, also when git takes longer than `timeout` seconds, and for a
    repository URL with NUL, line breaks or other control characters. `env`
    is git's environment (default: ours, without a terminal prompt).
    Messages quote the repository, the ref and git's words escaped."""
    if not repo or _has_control(repo) or len(repo) > 4096:
        raise RefError(f"{repo[:200]!r} is not a repository URL: it is empty, too long or has control characters")
    ref = ref or "HEAD"
    if SHA1.match(ref):
        return ref
    if ref.startswith("-") or _has_control(ref) or len(ref) > 1024:
        raise RefError(f"{ref[:100]!r} is not a git ref")
    env = {**(os.environ if env is None else env), "GIT_TERMINAL_PROMPT": "0"}
    if os.path.isdir(repo):
        argv = ["git", "-C", repo, "rev-parse", "--verify", "--end-of-options", ref + "^{commit}"]
    else:
        argv = ["git", "ls-remote", "--", repo, ref]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RefError(f"cannot resolve {ref!r} in {repo!r}: git gave no answer in {timeout:.0f} s") from None
    if os.path.isdir(repo):
        if out.returncode == 0:
            return out.stdout.strip()
        raise RefError(f"cannot resolve {ref!r} in {repo!r}: git said {_said(out.stderr)}")
    for line in out.stdout.splitlines():
        sha, _, name = line.partition("\t")
        if name in (ref, f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}"):
            return sha
    if not out.stderr.strip():
        raise RefError(f"cannot resolve {ref!r} in {repo!r}: no such ref")
    raise RefError(f"cannot resolve {ref!r} in {repo!r}: git said {_said(out.stderr)}")


# -- what BinderHub would send ------------------------------------------------------


def temporary_username(repo_url, rng=random):
    """A BinderHub-style temporary user name: the repository's path, dashed
    and shortened, plus a random suffix (e.g. ``org-repo-k3j9x0ab``)."""
    if "://" not in repo_url and "@" in repo_url and ":" in repo_url:
        path = repo_url.split(":", 1)[1]  # git@host:org/repo
    else:
        path = urlparse(repo_url).path
    # only what a user name may hold: letters, digits, '-', '.', '_' (a
    # stranger's URL may carry NUL, line breaks or '/..')
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.strip("/").replace("/", "-").lower())
    if stem.endswith(".git"):
        stem = stem[:-4]
    if len(stem) > 32:
        stem = f"{stem[:15]}-{stem[-15:]}"
    suffix = "".join(rng.choices(string.ascii_lowercase + string.digits, k=8))
    return f"{stem}-{suffix}" if stem else suffix


def session_token():
    """A server token the way BinderHub makes one (url-safe base64 of a uuid4)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=\n")


def binder_spec(repo_url, ref):
    """(provider prefix, spec, ref URL) as BinderHub's repo providers give them:
    ``gh/org/repo/<ref>`` for GitHub, ``git/<quoted URL>/<ref>`` otherwise."""
    u = urlparse(repo_url)
    if u.hostname in ("github.com", "www.github.com"):
        parts = [p for p in u.path.split("/") if p]
        if len(parts) >= 2:
            org, repo = parts[0], parts[1][:-4] if parts[1].endswith(".git") else parts[1]
            return "gh", f"{org}/{repo}/{ref}", f"https://github.com/{org}/{repo}/tree/{ref}"
    return "git", f"{quote(repo_url, safe='')}/{quote(ref, safe='')}", repo_url


def user_options(image, repo_url, ref, resolved_ref, launch_host):
    """The ``user_options`` BinderHub's launcher hands the spawner."""
    provider, spec, _ = binder_spec(repo_url, ref)
    _, resolved_spec, ref_url = binder_spec(repo_url, resolved_ref)
    return {
        "image": image,
        "repo_url": repo_url,
        "token": session_token(),
        "binder_ref_url": ref_url,
        "binder_launch_host": launch_host,
        "binder_request": f"v2/{provider}/{spec}",
        "binder_persistent_request": f"v2/{provider}/{resolved_spec}",
    }


def normalize_repo(repo):
    """Local checkouts become absolute ``file://`` URLs: the image name then
    matches the one a Binder link to the same URL builds."""
    if "://" not in repo and os.path.isdir(repo):
        return "file://" + os.path.abspath(repo)
    return repo
