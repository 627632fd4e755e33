"""gc never evicts an image a session uses or is about to use.

Against a real JupyterHub (loopback, no scheduler): its spawner either
answers at once (a running session) or never finishes starting (a job
waiting in the queue), and the hub lists users two per page, so gc must
follow JupyterHub's pagination, read `user_options` (set when the spawn is
requested) as well as the spawner's state (stored once start() returns), and
refuse when its token cannot see all of that.
"""

import os
import secrets
import textwrap
import time

import pytest

from binderhub_hpc.cli import main
from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc.sif import minimal_sif

from hubutil import Hub

OLD = 1000  # a last use long ago

SPAWNER = textwrap.dedent(
    '''
    import asyncio
    from jupyterhub.spawner import Spawner

    class GcTestSpawner(Spawner):
        """user_options "run": a server that answers at once; otherwise start()
        never returns, like a job waiting in the queue. "state_image": kept in
        the spawner's state, as our spawner keeps the image."""

        _answerer = None
        _state_image = ""

        async def start(self):
            self._state_image = self.user_options.get("state_image", "")
            if not self.user_options.get("run"):
                await asyncio.Event().wait()

            async def answer(reader, writer):
                try:
                    await reader.readuntil(b"\\r\\n\\r\\n")
                    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n"
                                 b"Connection: close\\r\\n\\r\\n")
                    await writer.drain()
                except (OSError, asyncio.IncompleteReadError):
                    pass
                writer.close()

            self._answerer = await asyncio.start_server(answer, "127.0.0.1", 0)
            return ("127.0.0.1", self._answerer.sockets[0].getsockname()[1])

        async def poll(self):
            return None if self._answerer else 0

        async def stop(self, now=False):
            if self._answerer:
                self._answerer.close()
                self._answerer = None

        def get_state(self):
            state = super().get_state()
            if self._state_image:
                state["image"] = self._state_image
            return state

        def load_state(self, state):
            super().load_state(state)
            self._state_image = state.get("image", "")

    c.JupyterHub.spawner_class = GcTestSpawner
    c.JupyterHub.api_page_default_limit = 2
    c.JupyterHub.api_page_max_limit = 2
    '''
)

#: service name -> scopes; "gc" has exactly what gc needs
TOKENS = {
    "gc": ["list:users", "read:servers", "admin:server_state"],
    "no-state": ["list:users", "read:servers"],
    "no-list": ["read:servers", "admin:server_state"],
    "no-servers": ["list:users", "admin:server_state"],
    "filtered": ["list:users", "read:servers!user=queued", "admin:server_state"],
}
MISSING = {
    "no-state": "admin:server_state",
    "no-list": "list:users",
    "no-servers": "read:servers",
    "filtered": "read:servers",
}

IMG = {
    k: f"binderhub-hpc/binder-{k}:{'0' * 39}{i}"
    for i, k in enumerate(["queued", "queued-named", "running", "in-state", "last-page", "unused1", "unused2"])
}
#: user -> [(server name, user_options)]
SESSIONS = {
    "queued": [("", {"image": IMG["queued"]}), ("second", {"image": IMG["queued-named"]})],
    "running": [("", {"image": IMG["running"], "run": "1"})],
    "in-state": [("", {"run": "1", "state_image": IMG["in-state"]})],
    "filler": [("", {"run": "1"})],
    "last": [("", {"image": IMG["last-page"]})],
}
IN_USE = {IMG[k] for k in ("queued", "queued-named", "running", "in-state", "last-page")}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tokens = {name: secrets.token_hex(16) for name in TOKENS}
    extra = SPAWNER + "\n".join(
        f"c.JupyterHub.services.append({{'name': {name!r}, 'api_token': {tokens[name]!r}}})\n"
        f"c.JupyterHub.load_roles.append({{'name': 'r-{name}', 'services': [{name!r}], "
        f"'scopes': {scopes!r}}})"
        for name, scopes in TOKENS.items()
    )
    h = Hub(tmp_path_factory.mktemp("gc-hub"), extra)
    h.start()
    try:
        for user, servers in SESSIONS.items():
            h.create_user(user)
            for server, options in servers:
                r = h.start_server(user, options, server)
                assert r.status_code in (201, 202), r.text
        h.create_user("idle")  # no server: not listed as active
        for user, servers in SESSIONS.items():
            for _, options in servers:
                if options.get("run"):
                    h.wait_for(lambda u=user: h.server_ready(u), timeout=60, what=f"{user} ready")
        h.tokens = tokens
        yield h
    finally:
        h.stop()


@pytest.fixture
def registry(tmp_path):
    reg = SIFRegistry(root=str(tmp_path / "registry"))
    for image in IMG.values():
        tmp = reg.tempfile(image)
        tmp.write_bytes(minimal_sif(b"s" * 1000))
        reg.publish(image, {"sif": tmp})
        os.utime(reg.used_path(image), (OLD, OLD))
    return reg


def gc(reg, hub, token, monkeypatch, *extra):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)
    return main(["gc", "--registry-root", reg.root, "--max-size", "1", "--hub-url", hub.url, *extra])


def test_gc_keeps_images_of_queued_starting_and_running_servers_on_every_page(hub, registry, monkeypatch, capsys):
    assert gc(registry, hub, hub.tokens["gc"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "2 images evicted" in out, out
    assert {i for i in IMG.values() if registry.exists(i)} == IN_USE
    # the use of a session's image is recorded by gc, for the LRU order
    for image in IN_USE:
        assert time.time() - registry.used_path(image).stat().st_mtime < 600


@pytest.mark.parametrize("service", sorted(MISSING))
def test_gc_refuses_when_its_token_cannot_see_every_server(hub, registry, monkeypatch, capsys, service):
    assert gc(registry, hub, hub.tokens[service], monkeypatch) == 1
    err = capsys.readouterr().err
    assert MISSING[service] in err and "nothing evicted" in err, err
    assert all(registry.exists(i) for i in IMG.values())


def test_gc_refuses_an_invalid_token_and_an_unreachable_hub(hub, registry, monkeypatch, capsys):
    assert gc(registry, hub, "not-a-token", monkeypatch) == 1
    assert "not a valid token" in capsys.readouterr().err
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.tokens["gc"])
    assert main(["gc", "--registry-root", registry.root, "--max-size", "1", "--hub-url", "http://127.0.0.1:9"]) == 1
    assert "cannot ask" in capsys.readouterr().err
    assert all(registry.exists(i) for i in IMG.values())


# --------------------------------------------------------------- without a hub


def _publish(reg, image, used):
    tmp = reg.tempfile(image)
    tmp.write_bytes(minimal_sif(b"s" * 1000))
    reg.publish(image, {"sif": tmp})
    os.utime(reg.used_path(image), (used, used))


def test_gc_never_evicts_an_image_used_or_published_within_the_grace_period(tmp_path, capsys):
    reg = SIFRegistry(root=str(tmp_path / "registry"))
    now = time.time()
    _publish(reg, "p/old:1", now - 7200)
    _publish(reg, "p/recent:1", now - 600)
    tmp = reg.tempfile("p/new:1")
    tmp.write_bytes(minimal_sif(b"n"))
    reg.publish("p/new:1", {"sif": tmp})  # publishing records a use
    assert main(["gc", "--registry-root", reg.root, "--max-size", "1"]) == 0
    assert "1 images evicted" in capsys.readouterr().out
    assert [r.image for r in reg.images()] == ["p/recent:1", "p/new:1"]
    assert main(["gc", "--registry-root", reg.root, "--max-size", "1", "--grace-period", "300"]) == 0
    assert [r.image for r in reg.images()] == ["p/new:1"]
    cfg = tmp_path / "conf.py"
    cfg.write_text(f"c.SIFRegistry.root = {reg.root!r}\nc.SIFRegistry.grace_period = 0\n")
    assert main(["gc", "--config", str(cfg), "--max-size", "1"]) == 0
    assert reg.images() == []


def test_a_use_recorded_while_gc_runs_keeps_the_image(tmp_path):
    """gc reads the last use again just before removing an image: BinderHub
    may have found it for a launch since gc listed the registry."""

    class LookedUpMeanwhile(SIFRegistry):
        def images(self):
            records = super().images()
            if records:
                self.touch(records[0].image)
            return records

    reg = LookedUpMeanwhile(root=str(tmp_path / "registry"))
    _publish(reg, "p/a:1", OLD)
    _publish(reg, "p/b:1", OLD + 1)
    assert [r.image for r in reg.evict(max_size=1)] == ["p/b:1"]
    assert reg.exists("p/a:1")


async def test_binderhub_lookup_records_the_use_of_the_image(tmp_path):
    """BinderHub looks an image up before every launch, as the account that
    owns the registry: that is where a launch's use is recorded."""
    pytest.importorskip("binderhub")
    from traitlets.config import LoggingConfigurable

    from binderhub_hpc.binderhub import SIFDockerRegistry

    class App(LoggingConfigurable):
        image_prefix = "prefix/x-"

    reg = SIFRegistry(root=str(tmp_path / "registry"))
    _publish(reg, "prefix/repo:abc", OLD)  # long ago, by the build
    docker = SIFDockerRegistry(sif_registry=SIFRegistry(root=reg.root), parent=App())
    assert await docker.get_image_manifest("repo", "abc")
    assert time.time() - reg.used_path("prefix/repo:abc").stat().st_mtime < 600
    # at most once a minute per image and process: the shared FS is not
    # written on every launch of a popular image
    os.utime(reg.used_path("prefix/repo:abc"), (OLD, OLD))
    assert await docker.get_image_manifest("repo", "abc")
    assert reg.used_path("prefix/repo:abc").stat().st_mtime == OLD
    # a miss records nothing
    assert await docker.get_image_manifest("other", "abc") is None
    assert not reg.used_path("prefix/other:abc").exists()
