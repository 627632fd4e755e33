"""The JupyterHub REST calls BinderHub's launcher makes, as a small
synchronous client: used by ``binderhub-hpc launch`` and ``gc``."""

import json
import time
from urllib.parse import quote

import requests

TOKEN_ENV = "JUPYTERHUB_API_TOKEN"
#: JupyterHub's paginated list responses ({"items", "_pagination"})
PAGINATION = "application/jupyterhub-pagination+json"
#: what :meth:`HubClient.images_in_use` needs, unfiltered: every user
#: (list:users), their servers with `user_options` (read:servers) and the
#: state our spawner keeps (admin:server_state)
IMAGE_SCOPES = ("list:users", "read:servers", "admin:server_state")


class HubError(RuntimeError):
    """The hub did not answer what we need; the message is for a person."""


class LaunchError(HubError):
    """A launch that failed; the message is for the person at the terminal."""


class HubClient:
    """The JupyterHub REST calls BinderHub's launcher makes."""

    def __init__(self, hub_url, token, api_url=None, request_timeout=30):
        self.hub_url = hub_url.rstrip("/") + "/"
        self.api_url = (api_url or self.hub_url + "hub/api").rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {token}"
        self.request_timeout = request_timeout

    def _url(self, path):
        return self.api_url + path

    def request(self, method, path, **kw):
        kw.setdefault("timeout", self.request_timeout)
        try:
            return self.session.request(method, self._url(path), **kw)
        except requests.RequestException as e:
            raise LaunchError(f"cannot reach the hub API at {self.api_url}: {e}") from None

    def check(self):
        r = self.request("GET", "/")
        if r.status_code != 200:
            raise LaunchError(f"the hub API at {self.api_url} answered {r.status_code}")
        r = self.request("GET", "/user")
        if r.status_code == 403 or r.status_code == 401:
            raise LaunchError(f"the hub refused ${TOKEN_ENV} ({r.status_code}): not a valid token")
        return r.json() if r.ok else {}

    def create_user(self, name):
        r = self.request("POST", f"/users/{quote(name, safe='@~')}")
        if r.status_code not in (201, 409):
            raise LaunchError(f"could not create the temporary user {name}: {_why(r)}")

    def start_server(self, name, options):
        r = self.request("POST", f"/users/{quote(name, safe='@~')}/server", data=json.dumps(options))
        if r.status_code not in (201, 202):
            raise LaunchError(f"the hub refused to start a server: {_why(r)}")
        return r.status_code

    def progress(self, name, timeout):
        """Yield the events of the server's progress stream (dicts)."""
        try:
            with self.session.get(
                self._url(f"/users/{quote(name, safe='@~')}/server/progress"),
                stream=True,
                timeout=(self.request_timeout, timeout),
            ) as r:
                if r.status_code != 200:
                    raise LaunchError(f"cannot follow the launch: {_why(r)}")
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data:"):
                        try:
                            yield json.loads(line[5:])
                        except ValueError:
                            continue
        except requests.Timeout:
            raise LaunchTimeout() from None
        except requests.RequestException as e:
            raise LaunchError(f"lost the launch's progress stream: {e}") from None

    def server(self, name):
        r = self.request("GET", f"/users/{quote(name, safe='@~')}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json().get("servers", {}).get("")

    def stop_server(self, name, timeout=120):
        """Stop the server and wait until the hub no longer lists it."""
        r = self.request("DELETE", f"/users/{quote(name, safe='@~')}/server")
        if r.status_code not in (202, 204, 400, 404):
            raise LaunchError(f"could not stop the server of {name}: {_why(r)}")
        deadline = time.monotonic() + timeout
        while self.server(name):
            if time.monotonic() > deadline:
                raise LaunchError(f"the server of {name} did not stop within {timeout:.0f} s")
            time.sleep(0.5)

    def delete_user(self, name):
        self.request("DELETE", f"/users/{quote(name, safe='@~')}")

    # -- what gc must not evict ---------------------------------------------------

    def images_in_use(self):
        """The images of every server the hub has: running, stopping, and
        starting or queued (a pending spawn).

        JupyterHub stores a spawner's state only once start() returns, but a
        server's `user_options` (BinderHub's ``image``) from the moment the
        spawn is requested, so both are read. Raises HubError, naming the
        scope, when the token cannot see all of it: an empty answer must never
        read as "nothing is in use".
        """
        self.require_scopes(IMAGE_SCOPES, "to see every server and its image")
        images = set()
        for user in self.users(state="active"):
            if "servers" not in user:
                raise HubError(_lacks(["read:servers"], f"to see the servers of {user.get('name')!r}"))
            for server in user["servers"].values():
                if "state" not in server:
                    raise HubError(
                        _lacks(["admin:server_state"], f"to see the state of {user.get('name')!r}'s servers")
                    )
                if "user_options" not in server:
                    raise HubError("the hub does not report servers' user_options (JupyterHub >= 2 does)")
                for source in (server.get("user_options"), server.get("state")):
                    image = source.get("image") if isinstance(source, dict) else None
                    if isinstance(image, str) and image:
                        images.add(image)
        return images

    def require_scopes(self, needed, why):
        """Raise HubError unless the token has every scope of `needed`, unfiltered."""
        r = self.request("GET", "/user")
        if r.status_code in (401, 403):
            raise HubError(f"the hub refused ${TOKEN_ENV} ({r.status_code}): not a valid token")
        have = set(self._json(r).get("scopes") or ())
        missing = [scope for scope in needed if scope not in have]
        if missing:
            raise HubError(_lacks(missing, why))

    def users(self, **params):
        """Every user the hub lists (with `params`, e.g. ``state="active"``),
        through JupyterHub's pagination: one page holds at most
        ``c.JupyterHub.api_page_max_limit`` (200) users."""
        seen = set()
        offset = 0
        while True:
            r = self.request("GET", "/users", params={**params, "offset": offset}, headers={"Accept": PAGINATION})
            if r.status_code == 403:
                raise HubError(_lacks(["list:users"], "to list the users"))
            data = self._json(r)
            if isinstance(data, list):  # a hub without pagination: all in one
                yield from data
                return
            items = data.get("items", [])
            for user in items:
                if user.get("name") not in seen:
                    seen.add(user.get("name"))
                    yield user
            following = (data.get("_pagination") or {}).get("next")
            if not following or not items:
                return
            # pages are offsets into a list that changes while we read it:
            # the culler deletes users, which moves later ones to lower
            # offsets. Overlapping the pages by a quarter keeps such a user
            # from falling between two pages (duplicates are skipped).
            offset = max(offset + 1, following["offset"] - len(items) // 4)

    def _json(self, r):
        if r.status_code != 200:
            raise HubError(f"the hub API at {self.api_url} answered {_why(r)}")
        try:
            return r.json()
        except ValueError:
            raise HubError(f"the hub API at {self.api_url} answered something that is not JSON") from None


class LaunchTimeout(LaunchError):
    pass


def _lacks(scopes, why):
    return (
        f"the token lacks the scope{'s' if len(scopes) > 1 else ''} {', '.join(scopes)} "
        f"({why}; needs {', '.join(IMAGE_SCOPES)})"
    )


def _why(response):
    try:
        msg = response.json().get("message") or response.text
    except ValueError:
        msg = response.text
    return f"{response.status_code} {msg.strip()[:300]}"
