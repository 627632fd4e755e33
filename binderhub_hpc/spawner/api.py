"""The hub endpoint a session job reports its port to, restricted.

batchspawner registers ``POST /hub/api/batchspawner``, which sets *any*
attribute of the caller's spawner from the JSON body. Its caller is
identified by the server's API token, and in authenticated Binder that
token is inside the container too (jupyterhub-singleuser needs it), so a
stranger's notebook could set its own spawner's ``exec_prefix`` or
``batch_cancel_cmd`` and have the hub run that command when the session
stops. This handler replaces batchspawner's at the same path (the job
scripts need no change) and takes only what a job reports: the port, and
for our spawners the node it runs on, once per launch, while the spawn is
pending.
"""

import json

from jupyterhub.apihandlers import APIHandler, default_handlers
from tornado import web

PATH = r"/api/batchspawner"


class JobReportHandler(APIHandler):
    @web.authenticated
    def post(self):
        token = self.get_auth_token()
        user = self.current_user
        spawner = next((s for s in getattr(user, "spawners", {}).values() if s.api_token == token), None)
        if spawner is None:
            raise web.HTTPError(403, "This token belongs to no server of this user.")
        data = self.get_json_body()
        if not isinstance(data, dict):
            raise web.HTTPError(400, "Expected a JSON object.")
        report = getattr(spawner, "accept_job_report", None)
        if report is not None:
            report(data)  # raises HTTPError with the reason
        else:
            spawner.port = plain_port(data)
        self.set_status(201)
        self.finish(json.dumps({"message": "port recorded"}))


def plain_port(data):
    """The port a plain batchspawner spawner's job reports: nothing else, and
    a number (True is an int to Python, and would be port 1)."""
    port = data.get("port")
    if set(data) != {"port"} or type(port) is not int or not 0 < port < 65536:
        raise web.HTTPError(400, "Only a port (1-65535) can be reported.")
    return port


def install():
    """Put our handler in place of batchspawner's (idempotent). Runs when
    the spawner module is imported, which JupyterHub does while loading its
    configuration, before it builds its handlers."""
    import batchspawner.api  # noqa: F401  (registers its handler first)

    default_handlers[:] = [h for h in default_handlers if h[0] != PATH]
    default_handlers.append((PATH, JobReportHandler))
