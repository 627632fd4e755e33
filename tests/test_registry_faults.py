"""Faults of a real registry: what dead builders leave behind."""

import fnmatch
import os
import subprocess
import sys
import time
from pathlib import Path

from binderhub_hpc.registry import SIFRegistry

REPO = str(Path(__file__).resolve().parent.parent)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_stale_cleanup_removes_what_dead_builders_left(tmp_path):
    """Temporary files and directories (the converters' work directories,
    apptainer's build directory, also under its old ``.apptainer-*`` name)
    go once older than --stale-after; fresh ones and images stay."""
    reg = SIFRegistry(root=str(tmp_path / "root"))
    image = "p/a:1"
    tmp = reg.tempfile(image)
    tmp.write_bytes(b"partial")
    d = tmp.parent
    work = d / (tmp.name + ".abc.tmp")  # SquashfsSIFConverter's work directory
    (work / "files").mkdir(parents=True)
    (work / "files" / "x").write_text("x")
    (work / "pseudo").write_text("")
    legacy = d / ".apptainer-xyz"
    (legacy / "rootfs" / "etc").mkdir(parents=True)
    (legacy / "rootfs" / "etc" / "passwd").write_text("x")
    (legacy / "rootfs" / "link").symlink_to("/etc")
    apptainer = d / (tmp.name + ".apptainer-q.tmp")
    apptainer.mkdir()
    fresh = d / ".apptainer-fresh"
    fresh.mkdir()
    for p in (tmp, work, legacy, apptainer):
        _age(p, 7200)
    assert reg.remove_stale_temporaries(older_than=3600) == 4
    assert sorted(p.name for p in d.iterdir()) == [".apptainer-fresh"]
    assert Path("/etc/passwd").exists()


def test_a_killed_apptainer_conversion_leaves_only_what_the_next_build_removes(tmp_path):
    """apptainer's build directory is named after the image's temporary, so
    the next build of that image (which removes ``.<name>.*.tmp`` under its
    lock) and gc both find it."""
    reg = SIFRegistry(root=str(tmp_path / "root"))
    image = "p/a:1"
    dest = reg.tempfile(image)
    record = tmp_path / "tmpdir"
    fake = tmp_path / "apptainer"
    fake.write_text(f'#!/bin/sh\necho "$APPTAINER_TMPDIR" > {record}\nexec sleep 60\n')
    fake.chmod(0o755)
    code = (
        "import sys\n"
        "from binderhub_hpc.build.sif import ApptainerConverter, ConversionSource\n"
        f"ApptainerConverter(executable={str(fake)!r}).convert(\n"
        f"    ConversionSource({image!r}, None, None, '/nonexistent.tar'), {str(dest)!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 30
        while not record.exists() or not record.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    left = Path(record.read_text().strip())
    assert left.is_dir() and left.parent == dest.parent
    final = reg.path(image)
    assert fnmatch.fnmatch(left.name, f".{final.name}.*.tmp")
    assert reg.remove_stale_temporaries(older_than=-1) == 2  # the temporary and the directory
    assert not left.exists()
