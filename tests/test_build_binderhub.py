"""The BinderHub-facing classes, driven as BinderHub drives them."""

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("binderhub")


class ListQueue:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


@pytest.mark.cluster
def test_executor_builds_and_registry_finds(fixture_repo, registry_root):
    from binderhub.build import ProgressEvent
    from traitlets.config import Config

    from binderhub_hpc.binderhub import SIFBuildExecutor

    url, sha = fixture_repo
    cfg = Config()
    cfg.SIFRegistry.root = str(registry_root)
    cfg.Repo2Docker.egress_restricted = True
    image = f"binderhub-hpc/binder-test-exec:{sha}"

    q = ListQueue()
    loop = asyncio.new_event_loop()

    async def go():
        ex = SIFBuildExecutor(config=cfg, q=q, name="build-x", repo_url=url, ref=sha, image_name=image)
        assert ex.builder_info["builder"] == "binderhub-hpc"
        await asyncio.get_running_loop().run_in_executor(None, ex.submit)
        await asyncio.sleep(0.1)  # let progress callbacks run on the loop
        # BinderHub strips the first component: binderhub-hpc/<rest>
        from binderhub.builder import _get_image_basename_and_tag

        base, tag = _get_image_basename_and_tag(image)
        return base, tag

    try:
        base, tag = loop.run_until_complete(go())
        statuses = [e.payload for e in q.items if e.kind == ProgressEvent.Kind.BUILD_STATUS_CHANGE]
        assert statuses == [
            ProgressEvent.BuildStatus.PENDING,
            ProgressEvent.BuildStatus.RUNNING,
            ProgressEvent.BuildStatus.BUILT,
        ]
        logs = [json.loads(e.payload) for e in q.items if e.kind == ProgressEvent.Kind.LOG_MESSAGE]
        assert logs and all("phase" in e and "message" in e for e in logs)

        class Parent:
            image_prefix = "binderhub-hpc/binder-"

        # the registry puts back the component BinderHub cut off (from image_prefix)
        found = loop.run_until_complete(_manifest(cfg, Parent, base, tag))
        assert found and found["path"].endswith(".sif")
        assert loop.run_until_complete(_manifest(cfg, Parent, base, "0" * 40)) is None
    finally:
        loop.close()
        subprocess.run(["podman", "rmi", "--force", image], capture_output=True)


async def _manifest(cfg, Parent, base, tag):
    from traitlets import Unicode
    from traitlets.config import LoggingConfigurable

    from binderhub_hpc.binderhub import SIFDockerRegistry

    class App(LoggingConfigurable):
        image_prefix = Unicode(Parent.image_prefix)

    app = App(config=cfg)
    reg = SIFDockerRegistry(parent=app)
    assert await reg.get_credentials(base, tag) is None
    return await reg.get_image_manifest(base, tag)


def test_executor_reports_failure(tmp_path, registry_root):
    from binderhub.build import ProgressEvent
    from traitlets.config import Config

    from binderhub_hpc.binderhub import SIFBuildExecutor

    cfg = Config()
    cfg.SIFRegistry.root = str(registry_root)
    cfg.Repo2Docker.command = ["/bin/false"]
    q = ListQueue()
    loop = asyncio.new_event_loop()

    async def go():
        ex = SIFBuildExecutor(
            config=cfg,
            q=q,
            name="b",
            repo_url="file:///nonexistent",
            ref="0" * 40,
            image_name="binderhub-hpc/binder-x:" + "0" * 40,
        )
        await asyncio.get_running_loop().run_in_executor(None, ex.submit)
        await asyncio.sleep(0.1)

    try:
        loop.run_until_complete(go())
    finally:
        loop.close()
    statuses = [e.payload for e in q.items if e.kind == ProgressEvent.Kind.BUILD_STATUS_CHANGE]
    assert statuses[-1] == ProgressEvent.BuildStatus.FAILED
    logs = [json.loads(e.payload) for e in q.items if e.kind == ProgressEvent.Kind.LOG_MESSAGE]
    assert logs[-1]["phase"] == "failed"


def test_only_binderhub_module_imports_binderhub():
    root = Path(__file__).resolve().parent.parent / "binderhub_hpc"
    offenders = [
        str(p)
        for p in root.rglob("*.py")
        if p.name != "binderhub.py"
        and any(
            line.startswith(("import binderhub\n", "from binderhub.", "from binderhub import"))
            for line in p.read_text().splitlines(keepends=True)
        )
    ]
    assert offenders == []


@pytest.mark.parametrize("runner", ["LocalRunner", "SSHRunner", "SlurmBatchRunner"])
def test_every_runner_is_one_binderhubs_config_may_name(runner):
    """runner_class took only LocalRunner and its subclasses: a config naming
    SSHRunner or SlurmBatchRunner stopped BinderHub at start."""
    from traitlets.config import Config

    from binderhub_hpc.binderhub import SIFBuildExecutor
    from binderhub_hpc.config import check_config

    cfg = Config()
    cfg.SIFBuildExecutor.runner_class = f"binderhub_hpc.builder.runners.{runner}"
    check_config(cfg)
    assert SIFBuildExecutor(config=cfg).runner_class.__name__ == runner
