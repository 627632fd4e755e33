"""The JupyterHub REST calls BinderHub's launcher makes, as a small
synchronous client: used by ``binderhub-hpc launch`` and ``gc``."""

import json
import time
from urllib.parse import quote

import requests

TOKEN_ENV = "JUPYTERHUB_API_TOKEN"


class LaunchError(RuntimeError):
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
                stream=True, timeout=(self.request_timeout, timeout),
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


class LaunchTimeout(LaunchError):
    pass


def _why(response):
    try:
        msg = response.json().get("message") or response.text
    except ValueError:
        msg = response.text
    return f"{response.status_code} {msg.strip()[:300]}"
