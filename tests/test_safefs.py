"""The filesystem calls the registry and the build lock share: none follows
a symlink planted by whoever can write the registry, and modes do not depend
on the umask."""

import os
import stat

import pytest

from binderhub_hpc import safefs


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim"
    v.write_bytes(b"precious")
    return v


def test_open_regular_refuses_a_symlink_a_fifo_and_a_directory(tmp_path, victim):
    (tmp_path / "link").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, why in (("link", "symlink"), ("fifo", "not a regular file"), ("dir", "not a regular file")):
        with pytest.raises(safefs.LockFileError, match=why):
            safefs.open_regular(tmp_path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_files_and_directories_get_their_mode_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        fd = safefs.open_regular(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        safefs.makedirs(tmp_path / "a" / "b", 0o2775)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o2775


def test_remove_and_walk_never_go_through_a_symlink(tmp_path, victim):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"precious")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"x")
    (tree / "to-dir").symlink_to(outside)
    (tree / "to-file").symlink_to(victim)
    assert safefs.open_dir(tree / "to-dir") is None
    safefs.remove(tree)
    safefs.remove(tree)  # already gone: fine
    assert not tree.exists()
    (tmp_path / "link").symlink_to(outside)
    safefs.remove(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link")
    assert (outside / "keep").read_bytes() == victim.read_bytes() == b"precious"


def test_a_path_is_inside_the_root_only_if_its_symlinks_resolve_inside(tmp_path):
    root = tmp_path / "root"
    (root / "images" / "d").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "images" / "in").symlink_to(root / "images" / "d")
    (root / "images" / "out").symlink_to(tmp_path / "outside")
    assert safefs.inside(root, "images/d/x.sif")
    assert safefs.inside(root, "images/not-yet/x.sif")
    assert safefs.inside(root, "images/in/x.sif")
    assert not safefs.inside(root, "images/out/x.sif")
    assert not safefs.inside(root, "../outside/x.sif")


def test_lstat_mtime_is_the_links_own(tmp_path, victim):
    os.utime(victim, (1, 1))
    (tmp_path / "link").symlink_to(victim)
    os.utime(tmp_path / "link", (5, 5), follow_symlinks=False)
    assert safefs.lstat_mtime(tmp_path / "link") == 5
    assert safefs.lstat_mtime(tmp_path / "missing") == 0
