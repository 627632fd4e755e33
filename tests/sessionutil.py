"""Act in a running session as its user would in a notebook: run Python in a
kernel of the session's own server, through the proxy, with the session's
token (the Jupyter server's REST API and kernel websocket)."""

import asyncio
import json
import uuid
from urllib.parse import quote

import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


class KernelError(RuntimeError):
    """The code raised in the kernel; the message is the traceback's last line."""


def run_code(server_url, token, code, timeout=300, ca_certs=None):
    """Run `code` in a fresh python3 kernel of the server at `server_url`
    (ending in '/'; https with `ca_certs`, the CA to trust); return what it
    printed. Raises KernelError."""
    auth = {"Authorization": f"token {token}"}
    verify = ca_certs or True
    r = requests.post(server_url + "api/kernels", headers=auth, json={"name": "python3"}, verify=verify, timeout=60)
    r.raise_for_status()
    kernel = r.json()["id"]
    try:
        return asyncio.run(asyncio.wait_for(_execute(server_url, token, kernel, code, ca_certs), timeout))
    finally:
        requests.delete(server_url + f"api/kernels/{kernel}", headers=auth, verify=verify, timeout=60)


async def _execute(server_url, token, kernel, code, ca_certs=None):
    # http -> ws, https -> wss
    ws_url = "ws" + server_url[4:] + f"api/kernels/{kernel}/channels?token={quote(token)}"
    conn = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}, ca_certs=ca_certs))
    msg_id = uuid.uuid4().hex
    conn.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "msg_type": "execute_request",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            }
        )
    )
    out, error = [], None
    try:
        while True:
            raw = await conn.read_message()
            if raw is None:
                raise KernelError("the kernel's websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                error = f"{msg['content']['ename']}: {msg['content']['evalue']}"
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        conn.close()
    if error:
        raise KernelError(error + "\n" + "".join(out))
    return "".join(out)
