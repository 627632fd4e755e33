"""A git smart-HTTP server for the dev cluster: ``git http-backend`` behind a
tiny Python HTTP server, optionally behind HTTP basic auth.

Repositories on a multi-node cluster cannot be ``file://`` URLs any more:
builds run as the build account, and git refuses to read a repository
another account owns ("dubious ownership"), as it should. So the demo, the
tests and the private-repository tests serve theirs the way a site's own
git server would, over HTTP on the head node (an address and port the build
node's firewall lets the build account reach: ``DevCluster.SITE_GIT_PORTS``),
or on loopback on a single node. Read-only: pushes are refused.

``python -m binderhub_hpc_testing.gitserver ROOT ADDRESS PORTS [--auth-file F]``
serves every repository under ROOT on the first free port of PORTS (``N``,
``N-M``, or ``0`` for any) and prints ``listening PORT`` once it has it;
``--auth-file`` holds ``user:password`` (a private file: the secret is never
on a command line). Requests are logged, one JSON line each, to ``--log``.

A hostile git server, for the attack tests: when ``ROOT/NAME.err-reply``
exists (``GitServer.answer_with_err(NAME, text)`` writes it), the server
answers ``NAME/info/refs`` (what ``git ls-remote`` and ``git clone`` ask
first) with an ``ERR`` pkt-line holding that text, line breaks and all,
as a stranger's server may; git prints it on stderr as ``remote error:``.
"""

import argparse
import base64
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

#: a repository name that may have an ERR reply (one path component, no dot first)
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def pkt_line(data):
    """``data`` (bytes) as one pkt-line of git's protocol."""
    return b"%04x" % (len(data) + 4) + data


class _Handler(BaseHTTPRequestHandler):
    server_version = "binderhub-hpc-gitserver"
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):
        pass

    def _record(self, status, user):
        if self.server.log_path:
            with open(self.server.log_path, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "method": self.command,
                            "path": self.path,
                            "status": status,
                            "user": user,
                            "client": self.client_address[0],
                        }
                    )
                    + "\n"
                )

    def _user(self):
        """The authenticated user ('' without auth), or None when refused."""
        if not self.server.credentials:
            return ""
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                given = base64.b64decode(header[6:], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                given = ""
            if hmac.compare_digest(given.encode(), self.server.credentials.encode()):
                return given.split(":", 1)[0]
        return None

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self):
        user = self._user()
        if user is None:
            self._record(401, None)
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="binderhub-hpc git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        url = urlsplit(self.path)
        if self._err_reply(url.path, user):
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.server.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": url.path,
            "QUERY_STRING": url.query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "REMOTE_ADDR": self.client_address[0],
            # read-only, whoever asks
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.receivepack",
            "GIT_CONFIG_VALUE_0": "false",
        }
        if user:
            env["REMOTE_USER"] = user
        for header, var in (("Content-Encoding", "HTTP_CONTENT_ENCODING"), ("Git-Protocol", "GIT_PROTOCOL")):
            if self.headers.get(header):
                env[var] = self.headers[header]
        body = self._body() if self.command == "POST" else b""
        env["CONTENT_LENGTH"] = str(len(body))
        p = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=300)
        head, _, payload = p.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self._record(status, user)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _err_reply(self, path, user):
        """Answer NAME/info/refs with the ERR text of NAME.err-reply, if any."""
        name = path.strip("/").removesuffix("/info/refs")
        if not path.endswith("/info/refs") or not _NAME.fullmatch(name):
            return False
        try:
            text = (Path(self.server.root) / f"{name}.err-reply").read_bytes()
        except OSError:
            return False
        body = pkt_line(b"# service=git-upload-pack\n") + b"0000" + pkt_line(b"ERR " + text)
        self._record(200, user)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    do_GET = _serve
    do_POST = _serve


def serve(root, address, ports, credentials="", log_path=None):
    """Serve on the first port of `ports` that is free; say which on stdout."""
    server = None
    for port in ports:
        try:
            server = ThreadingHTTPServer((address, port), _Handler)
            break
        except OSError:
            continue
    if server is None:
        sys.exit(f"no free port among {list(ports)} on {address}")
    print(f"listening {server.server_address[1]}", flush=True)
    server.root = str(root)
    server.credentials = credentials
    server.log_path = log_path
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.serve_forever()


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="binderhub_hpc_testing.gitserver")
    parser.add_argument("root")
    parser.add_argument("address")
    parser.add_argument("ports", help="N, N-M (the first free one), or 0 (any)")
    parser.add_argument("--auth-file", help="file holding user:password (basic auth)")
    parser.add_argument("--log", help="append one JSON line per request here")
    args = parser.parse_args(argv)
    lo, _, hi = args.ports.partition("-")
    creds = Path(args.auth_file).read_text().strip() if args.auth_file else ""
    serve(args.root, args.address, range(int(lo), int(hi or lo) + 1), creds, args.log)


class GitServer:
    """A git HTTP server in a subprocess, serving the repositories under `root`.

    `address` is where it listens (the head node's on a multi-node dev
    cluster), `ports` the ports it may take (the first free one);
    `user`/`password` turn on basic auth. ``url(name)`` is a repository's URL.
    """

    def __init__(self, root, address="127.0.0.1", ports=None, user="", password=""):
        self.root = Path(root)
        self.address = address
        self.ports = list(ports) if ports else [0]
        self.user, self.password = user, password
        self.proc = None
        self.port = None
        self.log_path = self.root / ".gitserver-requests.jsonl"

    def url(self, name, credentials=False):
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@" if credentials else ""
        return f"http://{auth}{self.address}:{self.port}/{name}"

    def start(self, timeout=20):
        env = dict(
            os.environ,
            # this package (testing/) and the checkout beside it
            PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
                + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            ),
        )
        auth = []
        if self.user:
            auth_file = self.root / ".gitserver-auth"
            fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.user}:{self.password}\n")
            auth = ["--auth-file", str(auth_file)]
        ports = f"{min(self.ports)}-{max(self.ports)}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "binderhub_hpc_testing.gitserver",
                str(self.root),
                self.address,
                ports,
                "--log",
                str(self.log_path),
                *auth,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        # the port it bound itself, not one that merely answers (another
        # server may hold a port of the range)
        ready = {}
        reader = threading.Thread(target=lambda: ready.update(line=self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = ready.get("line", "")
        if not line.startswith("listening "):
            err = self.proc.stderr.read() if self.proc.poll() is not None else "no answer"
            self.stop()
            raise RuntimeError(f"git server on {self.address}:{ports} did not start: {err}")
        self.port = int(line.split()[1])
        return self

    def answer_with_err(self, name, text):
        """From now on answer repository `name`'s ``info/refs`` with an
        ``ERR`` pkt-line holding `text` (the server reads it per request)."""
        assert _NAME.fullmatch(name), name
        path = self.root / f"{name}.err-reply"
        path.write_text(text)
        os.chmod(path, 0o644)
        return self.url(name)

    def requests(self):
        try:
            return [json.loads(line) for line in self.log_path.read_text().splitlines()]
        except OSError:
            return []

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            if stream:
                stream.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    _main()
