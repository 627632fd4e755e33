"""The SIF registry on a real filesystem: names -> paths, atomic publish,
listing and eviction.

Image names come from Binder links, i.e. from anyone on the internet: every
name is either refused with a message a person can read, or mapped to one
file strictly inside the registry root, and two names never share a file.
"""

import json
import os
import random
import re
import string
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from binderhub_hpc.registry import (
    FORMATS,
    MAX_COMPONENT,
    MAX_IMAGE_NAME,
    InvalidImageName,
    SIFRegistry,
    escape,
    split_image_name,
)

FILE_NAME = re.compile(r"^[a-z0-9_-]+\.(sif|oci\.tar)$")
COMPONENT = re.compile(r"^[a-z0-9_-]+$")


# gc's grace period is tested in test_gc.py: here images are evicted by LRU alone
@pytest.fixture
def reg(tmp_path):
    return SIFRegistry(root=str(tmp_path / "root"), grace_period=0)


@pytest.fixture
def reg2(tmp_path):
    """A registry publishing both SIF and OCI archives."""
    return SIFRegistry(root=str(tmp_path / "root"), formats=["sif", "oci-archive"], grace_period=0)


def publish_bytes(reg, image, data=b"x", oci=None, metadata=None):
    """Publish a complete SIF holding `data` (and an OCI archive holding `oci`)."""
    files = {}
    tmp = reg.tempfile(image, "sif")
    tmp.write_bytes(_sif(data))
    files["sif"] = tmp
    if oci is not None:
        tmp = reg.tempfile(image, "oci-archive")
        tmp.write_bytes(_tar(oci))
        files["oci-archive"] = tmp
    return reg.publish(image, files, metadata)


def _sif(payload=b"x"):
    from binderhub_hpc.sif import minimal_sif

    return minimal_sif(payload)


def _tar(payload=b"o"):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("blobs/x")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def all_files(top):
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            yield Path(dirpath) / n


# --------------------------------------------------------------- hostile names

LONG = "a" * 1000
HOSTILE = [
    # path traversal, absolute paths, separators
    "../../etc/passwd:tag",
    "../../../../../../etc/passwd:latest",
    "..:..",
    ".:.",
    "name:..",
    "name:.",
    "/etc/passwd:tag",
    "/:tag",
    "//:x",
    "a/../../b:c",
    "./a:b",
    "prefix/../..:x",
    "a\\..\\..\\b:c",
    "name:ta/g",
    "name:../../x",
    "name:/abs",
    "~root/.ssh/authorized_keys:x",
    "$HOME:x",
    "`id`:$(id)",
    "name:*",
    "name:?",
    # controls
    "na\x00me:tag",
    "name:ta\x00g",
    "name:tag\n",
    "name\n:tag",
    "name:\r",
    "name:\t",
    "na\x1bme:tag",
    "name:\x7f",
    # unicode
    "\u202eevil\u202c:tag",
    "name:\u202egpj.exe",
    "\u0645\u0631\u062d\u0628\u0627:\u05e9\u05dc\u05d5\u05dd",
    "\ufeffname:tag",
    "name:\u200b",
    "\ud800:tag",
    "name:\udfff",
    "\ud83d\ude00:x",
    "\U0001f600:x",
    "\u0130:tag",  # upper-case dotted I, lowercases to two code points
    "\uff0e\uff0e\uff0fetc:tag",  # full-width ../
    "\u2215etc\u2215passwd:tag",  # division slash
    # case and escape look-alikes
    "Name:Tag",
    "name:tag",
    "NAME:TAG",
    "a_2f:x",
    "a/:x",
    "a_5f:x",
    "a_:x",
    "a_h:x",
    "_h" + "0" * 64 + ":x",
    "-:-",
    "name:-",
    # length
    LONG + ":tag",
    "name:" + LONG,
    LONG + ":" + "b" * 20,
    "x" * (MAX_IMAGE_NAME - 2) + ":t",
    "x" * (MAX_IMAGE_NAME - 1) + ":t",
    "x" * 5000 + ":t",
    "\u00e9" * 900 + ":t",
    # not name:tag
    "",
    "name",
    "name:",
    ":tag",
    ":",
    "::",
    "a::",
    "registry.example.org:5000/prefix/repo",  # ':' only in the host part
    "registry.example.org:5000/prefix/repo:tag",
    "a:b:c",
]


def _readable(msg):
    return bool(msg) and msg.isprintable() and msg[0].isupper()


@pytest.mark.parametrize("image", HOSTILE, ids=lambda s: repr(s)[:40])
def test_hostile_name_refused_or_inside_root(tmp_path, image):
    root = tmp_path / "root"
    for r in (
        SIFRegistry(root=str(root)),
        SIFRegistry(root=str(root), formats=["sif", "oci-archive"]),
    ):
        try:
            paths = [r.path(image, f) for f in ("sif", "oci-archive")]
        except InvalidImageName as e:
            assert _readable(str(e)), str(e)
            assert r.exists(image) is False
            with pytest.raises(InvalidImageName):
                r.lookup(image)
            continue
        for p in paths:
            assert FILE_NAME.match(p.name), p.name
            assert COMPONENT.match(p.parent.name), p.parent.name
            assert p.parent.parent == root / "images"
            assert len(p.name.encode()) <= 255 and len(p.parent.name.encode()) <= 255
        for side in (r.metadata_path(image), r.used_path(image), r.lock_path(image)):
            assert side.parent == paths[0].parent
            assert side.name.startswith(paths[0].name[: -len(".sif")] + ".")


def test_hostile_names_publish_nothing_outside_root(tmp_path):
    root = tmp_path / "root"
    reg = SIFRegistry(root=str(root), formats=["sif", "oci-archive"])
    published = []
    for image in HOSTILE:
        try:
            reg.path(image)
        except InvalidImageName:
            continue
        publish_bytes(reg, image, image.encode("utf-8", "surrogatepass"), oci=b"o")
        reg.touch(image)
        published.append(image)
    assert len(published) > 40
    outside = [p for p in all_files(tmp_path) if root not in p.parents and p != root]
    assert outside == []
    for image in published:
        assert reg.exists(image)
        sif = reg.lookup(image).read_bytes()
        assert sif[-len(image.encode("utf-8", "surrogatepass")) :] == image.encode("utf-8", "surrogatepass")
        assert reg.metadata(image)["image"] == image
    # one file per published image and format: nothing overwrote anything
    assert len(list(root.glob("images/*/*.sif"))) == len(published)
    assert len(list(root.glob("images/*/*.oci.tar"))) == len(published)
    assert sorted(r.image for r in reg.images()) == sorted(published)


def test_refusals():
    for image, words in [
        ("", "No image name"),
        (None, "No image name"),
        (b"a:b", "No image name"),
        ("name", "name:tag"),
        ("name:", "name:tag"),
        (":tag", "name:tag"),
        ("a:b/c", "name:tag"),
        ("a\x00:b", "control characters"),
        ("a:b\n", "control characters"),
        ("x" * (MAX_IMAGE_NAME + 1), "longer than"),
        ("\ud83d\ude00:x", "not valid Unicode"),
        ("a:\udfff", "not valid Unicode"),
    ]:
        with pytest.raises(InvalidImageName, match=words):
            split_image_name(image)


def test_split_uses_last_colon():
    assert split_image_name("host:5000/p/r:t") == ("host:5000/p/r", "t")


def test_escape_alphabet_and_look_alikes():
    assert escape("abc-09") == "abc-09"
    assert escape("a/") == "a_2f"
    assert escape("a_2f") == "a_5f2f"
    assert escape("A") != escape("a")
    assert escape("..") == "_2e_2e"
    long = escape("a" * 1000)
    assert len(long) <= MAX_COMPONENT and "_h" in long
    # a name spelled like a shortened one does not collide with it
    assert escape(long) != long


# --------------------------------------------------------------- injectivity


def _random_component(rnd):
    kind = rnd.random()
    if kind < 0.3:
        alphabet = "ab_/.-2fAB"
        n = rnd.randint(1, 8)
    elif kind < 0.5:
        alphabet = string.printable.strip() + "\u202e\u00e9\ud800\U0001f600\u0130"
        n = rnd.randint(1, 20)
    elif kind < 0.8:
        # around the shortening threshold, sharing long prefixes
        alphabet = "ab_"
        n = rnd.randint(MAX_COMPONENT // 3 - 5, MAX_COMPONENT + 5)
    else:
        alphabet = "ab"
        n = rnd.randint(MAX_COMPONENT - 5, 600)
    return "".join(rnd.choice(alphabet) for _ in range(n))


def _check_injective(reg, images):
    seen = {}
    for image in images:
        try:
            p = reg.path(image)
        except InvalidImageName:
            continue
        assert FILE_NAME.match(p.name)
        other = seen.setdefault(p, image)
        assert other == image, f"{other!r} and {image!r} share {p}"
    return len(seen)


def test_injective_random_corpus(reg):
    rnd = random.Random(20240601)
    images = set()
    prefix = "x" * (MAX_COMPONENT)  # long shared prefix: only the hash tells them apart
    while len(images) < 4000:
        name = _random_component(rnd)
        tag = _random_component(rnd).replace(":", "").replace("/", "") or "t"
        images.add(f"{name}:{tag}")
        if rnd.random() < 0.1:
            images.add(f"{prefix}{rnd.randint(0, 10**6)}:{tag}")
            images.add(f"{name}:{prefix}{rnd.randint(0, 10**6)}")
    assert _check_injective(reg, images) > 3500
    paths = []
    for image in images:
        try:
            paths.append(reg.path(image))
        except InvalidImageName:
            pass
    # the shortened branch was exercised, on names and on tags
    assert sum("_h" in p.parent.name for p in paths) > 100
    assert sum("_h" in p.name for p in paths) > 100


components = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(alphabet="a_2f/.A", min_size=1, max_size=10),
    st.text(alphabet="ab_", min_size=MAX_COMPONENT // 3 - 3, max_size=MAX_COMPONENT + 3),
    st.builds(lambda s: "y" * MAX_COMPONENT + s, st.text(max_size=5)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(components, components), min_size=1, max_size=40, unique=True))
def test_injective_property(reg, pairs):
    images = {f"{n}:{t}" for n, t in pairs}
    _check_injective(reg, images)
    for image in images:
        try:
            name, tag = split_image_name(image)
        except InvalidImageName:
            continue
        assert COMPONENT.match(escape(name)) and COMPONENT.match(escape(tag))
        assert len(escape(name)) <= MAX_COMPONENT


# --------------------------------------------------------------- publish


def test_publish_leaves_only_final_files(reg2):
    image = "prefix/repo:abc"
    p = publish_bytes(reg2, image, b"s" * 10, oci=b"o" * 20, metadata={"repo_url": "u"})
    assert p == reg2.path(image)
    names = sorted(f.name for f in p.parent.iterdir())
    assert names == ["abc.json", "abc.oci.tar", "abc.sif", "abc.used"]
    assert reg2.metadata(image)["size"] == len(_sif(b"s" * 10)) + len(_tar(b"o" * 20))
    assert reg2.metadata(image)["repo_url"] == "u"
    assert reg2.metadata(image)["formats"] == ["oci-archive", "sif"]
    assert (p.stat().st_mode & 0o777) == 0o644


def test_exists_needs_every_format(reg2):
    image = "prefix/repo:abc"
    tmp = reg2.tempfile(image, "sif")
    tmp.write_bytes(_sif())
    reg2.publish(image, {"sif": tmp})
    assert not reg2.exists(image)
    assert reg2.lookup(image) is not None
    publish_bytes(reg2, image, b"s", oci=b"o")
    assert reg2.exists(image)


def test_atomic_publish_under_concurrent_readers(reg):
    """Readers polling the registry never see a partial image, a temporary
    file, or an image without its metadata."""
    image = "prefix/big:v1"
    sizes = [len(_sif(b"\xab" * n)) for n in (8 << 20, 3 << 20, 12 << 20, 1 << 20)]
    published = set()
    stop = threading.Event()
    errors = []
    seen = {"hits": 0, "polls": 0}

    def reader():
        while not stop.is_set():
            seen["polls"] += 1
            p = reg.lookup(image)
            if p is not None:
                seen["hits"] += 1
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue
                if size not in published:
                    errors.append(f"saw size {size}")
                meta = reg.metadata(image)
                if not meta or meta.get("image") != image:
                    errors.append(f"image without metadata: {meta}")
            for r in reg.images():
                if r.path.name != "v1.sif" or r.size not in published:
                    errors.append(f"listed {r.path.name} size {r.size}")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for size in sizes:
            tmp = reg.tempfile(image)
            sif = memoryview(_sif(b"\xab" * (size - len(_sif(b"x")) + 1)))
            with open(tmp, "wb") as f:
                for i in range(0, size, 1 << 16):
                    f.write(sif[i : i + (1 << 16)])
                    f.flush()
            # readers may legitimately see the previous version until the rename
            published.add(size)
            reg.publish(image, {"sif": tmp}, {"n": size})
            time.sleep(0.02)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert errors == []
    assert seen["hits"] > 0
    assert reg.lookup(image).stat().st_size == sizes[-1]
    assert reg.metadata(image)["n"] == sizes[-1]
    assert [f.name for f in reg.path(image).parent.glob(".*")] == []


def test_temporary_files_are_never_listed(reg2):
    image = "prefix/repo:abc"
    tmps = [reg2.tempfile(image, f) for f in ("sif", "oci-archive")]
    for t in tmps:
        t.write_bytes(b"partial")
        assert t.name.startswith(".") and t.name.endswith(".tmp")
        assert t.parent == reg2.path(image).parent
    assert reg2.images() == []
    assert not reg2.exists(image) and reg2.lookup(image) is None
    reg2.discard(*tmps, tmps[0])
    assert list(reg2.path(image).parent.iterdir()) == []


def test_remove_stale_temporaries(reg):
    publish_bytes(reg, "p/a:1")
    old = [reg.tempfile("p/a:2"), reg.tempfile("p/b:1", "oci-archive")]
    fresh = reg.tempfile("p/a:3")
    long_ago = time.time() - 7200
    for t in old:
        os.utime(t, (long_ago, long_ago))
    # a stale-looking published image is not a temporary
    os.utime(reg.path("p/a:1"), (long_ago, long_ago))
    assert reg.remove_stale_temporaries(older_than=3600) == 2
    assert not any(t.exists() for t in old)
    assert fresh.exists()
    assert reg.exists("p/a:1")
    assert reg.remove_stale_temporaries(older_than=3600) == 0
    assert reg.remove_stale_temporaries(older_than=-1) == 1
    assert SIFRegistry(root=str(Path(reg.root) / "missing")).remove_stale_temporaries() == 0


def test_compute_path(tmp_path):
    r = SIFRegistry(root=str(tmp_path / "root"), compute_root="/mnt/registry")
    assert r.compute_path("p/a:1") == Path("/mnt/registry") / r.path("p/a:1").relative_to(r.root)
    assert SIFRegistry(root=str(tmp_path)).compute_path("p/a:1") == SIFRegistry(root=str(tmp_path)).path("p/a:1")


# --------------------------------------------------------------- listing, eviction

#: the size of one image published by _publish_in_use_order
UNIT = len(_sif(b"s" * 100))


def _publish_in_use_order(reg, order):
    """Publish images of UNIT bytes, then touch them in `order` (first = least
    recently used)."""
    for image in order:
        publish_bytes(reg, image, b"s" * 100)
    for image in order:
        reg.touch(image)
        time.sleep(0.02)  # beyond the filesystem's timestamp granularity


def test_images_lru_order_follows_touch(reg):
    names = [f"p/r{i}:t" for i in range(5)]
    _publish_in_use_order(reg, names)
    assert [r.image for r in reg.images()] == names
    reg.touch(names[0])
    assert [r.image for r in reg.images()] == names[1:] + names[:1]
    r = reg.images()[0]
    assert r.size == UNIT and r.path == reg.path(names[1]) and r.metadata["image"] == names[1]
    assert r.created <= r.last_used


def test_images_size_includes_oci_archive(reg2):
    publish_bytes(reg2, "p/a:1", b"s" * 100, oci=b"o" * 300)
    both = len(_sif(b"s" * 100)) + len(_tar(b"o" * 300))
    (rec,) = reg2.images()
    assert rec.size == both
    assert reg2.total_size() == both
    # the OCI archive counts even when only the SIF is the configured format
    assert SIFRegistry(root=reg2.root).images()[0].size == both


def test_evict_lru_until_quota(reg):
    names = [f"p/r{i}:t" for i in range(5)]
    _publish_in_use_order(reg, names)
    assert reg.evict(max_size=0) == []  # 0: no quota
    assert reg.evict(max_size=100 * UNIT) == []
    evicted = reg.evict(max_size=int(2.5 * UNIT))
    assert [r.image for r in evicted] == names[:3]
    assert all(r.size == UNIT for r in evicted)
    assert [r.image for r in reg.images()] == names[3:]
    assert reg.total_size() == 2 * UNIT
    for image in names[:3]:
        assert not reg.exists(image)
        assert not reg.metadata_path(image).exists() and not reg.used_path(image).exists()


def test_evict_never_removes_in_use(reg):
    names = [f"p/r{i}:t" for i in range(5)]
    _publish_in_use_order(reg, names)
    evicted = reg.evict(max_size=int(3.5 * UNIT), in_use={names[0], names[2]})
    assert [r.image for r in evicted] == [names[1], names[3]]
    assert [r.image for r in reg.images()] == [names[0], names[2], names[4]]
    # everything in use: over quota, but nothing goes
    assert reg.evict(max_size=1, in_use=names) == []
    assert len(reg.images()) == 3


def test_evict_uses_configured_quota(tmp_path):
    reg = SIFRegistry(root=str(tmp_path / "root"), max_size=int(1.5 * UNIT), grace_period=0)
    _publish_in_use_order(reg, ["p/a:1", "p/b:1"])
    assert [r.image for r in reg.evict()] == ["p/a:1"]


def test_evict_survives_damaged_metadata(reg):
    names = [f"p/r{i}:t" for i in range(3)]
    _publish_in_use_order(reg, names)
    reg.metadata_path(names[0]).write_text("{ truncated")
    evicted = reg.evict(max_size=int(1.5 * UNIT))
    assert len(evicted) == 2
    assert not reg.path(names[0]).exists() and not reg.metadata_path(names[0]).exists()
    assert [r.image for r in reg.images()] == [names[2]]


def test_touch_on_read_only_registry_is_quiet(reg, tmp_path):
    publish_bytes(reg, "p/a:1")
    d = reg.path("p/a:1").parent
    reg.used_path("p/a:1").unlink()
    os.chmod(d, 0o555)
    try:
        reg.touch("p/a:1")  # must not raise (root ignores modes, which is fine too)
    finally:
        os.chmod(d, 0o755)


def test_remove(reg2):
    publish_bytes(reg2, "p/a:1", oci=b"o")
    reg2.remove("p/a:1")
    assert list(reg2.path("p/a:1").parent.iterdir()) == []
    reg2.remove("p/a:1")  # twice is fine


def test_evict_in_use_holds_with_damaged_metadata(reg):
    names = [f"p/r{i}:t" for i in range(3)]
    _publish_in_use_order(reg, names)
    reg.metadata_path(names[0]).unlink()
    evicted = reg.evict(max_size=int(1.5 * UNIT), in_use=[names[0], "not an image name"])
    assert [r.image for r in evicted] == [names[1], names[2]]
    assert reg.exists(names[0])


# --------------------------------------------------------------- symlinks


def test_symlink_below_root_leading_out_is_refused(tmp_path, reg):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "t.sif").write_bytes(b"not ours")
    image = "p/escaper:t"
    d = reg.path("p/other:t").parent.parent / reg.path(image).parent.name
    d.parent.mkdir(parents=True)
    d.symlink_to(outside)
    with pytest.raises(InvalidImageName, match="outside the registry"):
        reg.path(image)
    assert reg.exists(image) is False
    # the same through a symlinked file
    reg.path("p/a:1").parent.mkdir()
    reg.path("p/a:1").symlink_to(outside / "t.sif")
    assert reg.exists("p/a:1") is False
    with pytest.raises(InvalidImageName):
        reg.lookup("p/a:1")


def test_symlinks_inside_root_and_symlinked_root_are_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    reg = SIFRegistry(root=str(tmp_path / "link"))
    publish_bytes(reg, "p/a:1")
    assert reg.exists("p/a:1")
    target = reg.path("p/a:1").parent
    alias = target.parent / SIFRegistry(root="/").path("p/b:1").parent.name
    alias.symlink_to(target)
    publish_bytes(reg, "p/b:1")
    assert reg.exists("p/b:1") and reg.exists("p/a:1")


def test_root_moved_after_first_lookup(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    link = tmp_path / "root"
    link.symlink_to(a)
    reg = SIFRegistry(root=str(link))
    assert not reg.exists("p/a:1")
    link.unlink()
    link.symlink_to(b)
    publish_bytes(reg, "p/a:1")
    assert reg.exists("p/a:1")
    assert (b / "images").is_dir() and not (a / "images").exists()


def _plant_image_dir_link(reg, tmp_path, image="p/victim:t"):
    """An image directory that is a symlink to files outside the root, laid
    out like an image (with a stale-looking temporary); returns the outside dir."""
    outside = tmp_path / "outside"
    outside.mkdir()
    stem = reg.path(image).name[: -len(".sif")]
    for name in (stem + ".sif", stem + ".oci.tar", stem + ".json", stem + ".used", ".x.tmp"):
        (outside / name).write_bytes(b"precious")
    (outside / (stem + ".json")).write_text(json.dumps({"image": image}))
    long_ago = time.time() - 7 * 86400
    for p in outside.iterdir():
        os.utime(p, (long_ago, long_ago))
    link = reg.path(image).parent
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    return outside


def test_listing_and_gc_never_follow_a_symlinked_image_directory(reg, tmp_path):
    outside = _plant_image_dir_link(reg, tmp_path)
    before = sorted(p.name for p in outside.iterdir())
    publish_bytes(reg, "p/real:t", b"r" * 100)
    assert [r.image for r in reg.images()] == ["p/real:t"]
    assert reg.total_size() == reg.images()[0].size
    assert [r.image for r in reg.evict(max_size=1)] == ["p/real:t"]
    assert reg.remove_stale_temporaries(older_than=0) == 0
    reg.remove("p/victim:t")
    assert sorted(p.name for p in outside.iterdir()) == before
    assert all(p.read_bytes() != b"" for p in outside.iterdir())


def test_a_symlinked_images_directory_is_not_walked(reg, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "t.sif").write_bytes(b"precious")
    (outside / "d" / ".t.sif.1.tmp").write_bytes(b"precious")
    os.utime(outside / "d" / ".t.sif.1.tmp", (1, 1))
    Path(reg.root).mkdir()
    (Path(reg.root) / "images").symlink_to(outside)
    assert reg.images() == []
    assert reg.evict(max_size=1) == []
    assert reg.remove_stale_temporaries(older_than=0) == 0
    assert sorted(p.name for p in (outside / "d").iterdir()) == [".t.sif.1.tmp", "t.sif"]


def test_symlinked_files_in_an_image_directory_are_neither_listed_nor_followed(reg, tmp_path):
    publish_bytes(reg, "p/a:1", b"a" * 100)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = reg.path("p/a:1").parent
    (d / "2.sif").symlink_to(victim)
    (d / ".2.sif.x.tmp").symlink_to(victim)
    os.utime(d / ".2.sif.x.tmp", (1, 1), follow_symlinks=False)
    assert [r.image for r in reg.images()] == ["p/a:1"]
    assert [r.image for r in reg.evict(max_size=1)] == ["p/a:1"]
    # the planted links may go, what they point to stays
    reg.remove_stale_temporaries(older_than=0)
    reg.remove("p/a:2")
    assert victim.read_bytes() == b"precious"


def test_planted_used_links_are_not_followed(reg, tmp_path):
    """`.used` is written by the hub and BinderHub side: a symlink planted
    there must not let them touch or create another file."""
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    os.utime(target, (1, 1))
    for image, dest in (("p/a:1", target), ("p/a:2", tmp_path / "created-through-link")):
        reg.path(image).parent.mkdir(parents=True, exist_ok=True)
        reg.used_path(image).symlink_to(dest)
        reg.touch(image)
        publish_bytes(reg, image)  # publishing records a use too
        assert reg.exists(image)
    assert target.stat().st_mtime == 1 and target.read_bytes() == b"precious"
    assert not (tmp_path / "created-through-link").exists()


@pytest.fixture(params=[0o077, 0o000], ids=["umask077", "umask000"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_modes_do_not_depend_on_the_umask(tmp_path, umask):
    reg = SIFRegistry(root=str(tmp_path / "root"), formats=["sif", "oci-archive"])
    image = "p/a:1"
    with reg.lock(image):
        publish_bytes(reg, image, oci=b"o")
    reg.touch(image)
    root = Path(reg.root)
    for d in (root, root / "images", reg.path(image).parent):
        assert (d.stat().st_mode & 0o7777) == 0o2775, d
    for f in (
        reg.path(image),
        reg.path(image, "oci-archive"),
        reg.metadata_path(image),
        reg.used_path(image),
        reg.lock_path(image),
    ):
        assert (f.stat().st_mode & 0o7777) == 0o644, f
    custom = SIFRegistry(root=str(tmp_path / "custom"), dir_mode=0o750, file_mode=0o640)
    publish_bytes(custom, image)
    assert (custom.path(image).parent.stat().st_mode & 0o7777) == 0o750
    assert (custom.path(image).stat().st_mode & 0o7777) == 0o640
    assert (custom.used_path(image).stat().st_mode & 0o7777) == 0o640


# --------------------------------------------------------------- damaged files

DAMAGED_METADATA = [
    b"[1, 2]",
    b'"just a string"',
    b"null",
    b"42",
    b"{ truncated",
    b"",
    b"\xff\xfe\x00\x00not utf-8",
    b'{"image": "caf\xe9"}',  # latin-1, not UTF-8
    b"[" * 100_000,  # deeper than the parser's recursion limit
]


@pytest.mark.parametrize("data", DAMAGED_METADATA, ids=lambda d: repr(d[:12]))
def test_damaged_metadata_counts_as_absent_everywhere(reg, data, caplog):
    names = [f"p/r{i}:t" for i in range(3)]
    _publish_in_use_order(reg, names)
    reg.metadata_path(names[0]).write_bytes(data)
    caplog.set_level("WARNING")
    assert reg.metadata(names[0]) == {}
    assert reg.exists(names[0])
    records = reg.images()
    assert [r.path for r in records] == [reg.path(n) for n in names]
    assert records[0].metadata == {} and isinstance(records[0].image, str)
    # gc goes on past the damaged file, in LRU order
    assert [r.path for r in reg.evict(max_size=int(1.5 * UNIT))] == [reg.path(n) for n in names[:2]]
    assert [r.image for r in reg.images()] == names[2:]
    warnings = [r for r in caplog.records if "metadata" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert str(reg.metadata_path(names[0])) in warnings[0].getMessage()


def test_metadata_fields_of_the_wrong_type_are_ignored(reg, capsys):
    from binderhub_hpc.cli import main

    publish_bytes(reg, "p/a:1")
    reg.metadata_path("p/a:1").write_text(json.dumps({"image": 5, "created": "yesterday"}))
    publish_bytes(reg, "p/b:1")
    # metadata copied from another image does not rename this one
    reg.metadata_path("p/b:1").write_text(json.dumps({"image": "p/other:1", "created": True}))
    os.utime(reg.used_path("p/a:1"), (1000, 1000))  # a is the least recently used
    (a, b) = sorted(reg.images(), key=lambda r: r.path)
    assert isinstance(a.image, str) and isinstance(a.created, float)
    assert b.image != "p/other:1" and isinstance(b.created, float)
    assert main(["images", "--registry-root", reg.root]) == 0
    assert main(["images", "--json", "--registry-root", reg.root]) == 0
    assert main(["gc", "--registry-root", reg.root, "--max-size", str(b.size), "--grace-period", "0"]) == 0
    assert "evicted p_2fa/1.sif" in capsys.readouterr().out
    assert [r.path for r in reg.images()] == [b.path]


@pytest.mark.parametrize("data", DAMAGED_METADATA[:3] + DAMAGED_METADATA[6:7], ids=repr)
async def test_binderhub_lookup_survives_damaged_metadata(tmp_path, data):
    pytest.importorskip("binderhub")
    from traitlets.config import LoggingConfigurable

    from binderhub_hpc.binderhub import SIFDockerRegistry

    class App(LoggingConfigurable):
        image_prefix = "prefix/x-"

    reg = SIFRegistry(root=str(tmp_path / "root"))
    publish_bytes(reg, "prefix/repo:abc")
    reg.metadata_path("prefix/repo:abc").write_bytes(data)
    docker = SIFDockerRegistry(sif_registry=reg, parent=App())
    manifest = await docker.get_image_manifest("repo", "abc")
    assert manifest["path"] == str(reg.path("prefix/repo:abc"))
    assert manifest["size"] is None and manifest["created"] is None


def test_minimal_sif_is_a_sif_to_siftool(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("siftool"):
        pytest.skip("siftool is not installed")
    p = tmp_path / "m.sif"
    p.write_bytes(_sif(b"payload" * 100))
    out = subprocess.run(["siftool", "list", str(p)], capture_output=True, text=True, check=True)
    assert "FS (Squashfs/*System/amd64)" in out.stdout
    assert subprocess.run(["siftool", "dump", "1", str(p)], capture_output=True, check=True).stdout == b"payload" * 100


def _broken_sifs(good):
    """(what, bytes) of SIFs that must not count as built, made from the
    complete SIF `good` (one object, the root partition)."""
    from binderhub_hpc.sif import DESCRIPTOR, HEADER

    def header(**changes):
        names = [
            "launch",
            "magic",
            "version",
            "arch",
            "id",
            "created",
            "modified",
            "free",
            "total",
            "d_off",
            "d_size",
            "data_off",
            "data_size",
        ]
        f = list(HEADER.unpack_from(good))
        for k, v in changes.items():
            f[names.index(k)] = v
        return HEADER.pack(*f) + good[HEADER.size :]

    def descriptor(**changes):
        names = ["type", "used", "id", "group", "link", "offset", "size"]
        f = list(DESCRIPTOR.unpack_from(good, HEADER.size))
        for k, v in changes.items():
            f[names.index(k)] = v
        return good[: HEADER.size] + DESCRIPTOR.pack(*f) + good[HEADER.size + DESCRIPTOR.size :]

    assert HEADER.size == 128 and DESCRIPTOR.size == 585
    return [
        ("empty", b""),
        ("header only", good[:128]),
        ("half header", good[:60]),
        ("truncated data", good[:-1]),
        ("truncated descriptors", good[:200]),
        ("not a SIF", b"\x7fELF" + b"\0" * (len(good) - 4)),
        ("wrong magic", header(magic=b"SIF_MAGIX\0")),
        ("future version", header(version=b"02\0")),
        ("no object (siftool new)", header(free=1)),
        ("no data", header(data_size=0)),
        ("data beyond the end", header(data_size=len(good))),
        ("descriptors beyond the end", header(d_off=len(good))),
        ("no root filesystem partition", descriptor(type=0x4007)),
        ("root partition beyond the end", descriptor(size=len(good))),
    ]


def test_a_zero_byte_or_truncated_sif_counts_as_absent(reg):
    image = "p/a:1"
    good = _sif(b"s" * 1000)
    publish_bytes(reg, image, b"s" * 1000)
    assert reg.exists(image) and reg.lookup(image) == reg.path(image)
    for what, data in _broken_sifs(good):
        reg.path(image).write_bytes(data)
        assert not reg.exists(image), what
        assert reg.lookup(image) is None, what
        # still listed: it takes space, and gc may evict it
        assert [r.path for r in reg.images()] == [reg.path(image)], what
    reg.path(image).write_bytes(good)
    assert reg.exists(image)


def test_a_truncated_oci_archive_counts_as_absent(reg2):
    image = "p/a:1"
    publish_bytes(reg2, image, oci=b"o" * 5000)
    good = reg2.path(image, "oci-archive").read_bytes()
    assert reg2.exists(image) and reg2.lookup(image, "oci-archive")
    for data in (b"", good[:512], good[: len(good) // 2], good[:-1], b"\0" * len(good)):
        reg2.path(image, "oci-archive").write_bytes(data)
        assert not reg2.exists(image)
        assert reg2.lookup(image, "oci-archive") is None
        assert reg2.lookup(image, "sif") == reg2.path(image)


def test_validity_is_checked_once_per_file_version(reg, monkeypatch):
    """A lookup reads a SIF's header once; a replaced or rewritten file is
    checked again."""
    from binderhub_hpc import registry as registry_module

    checked = []
    real = registry_module._FILE_CHECKS["sif"]
    monkeypatch.setitem(registry_module._FILE_CHECKS, "sif", lambda fd, size: checked.append(size) or real(fd, size))
    image = "p/a:1"
    publish_bytes(reg, image)
    for _ in range(100):
        assert reg.exists(image) and reg.lookup(image)
    assert len(checked) == 1
    publish_bytes(reg, image, b"new")  # a new file (another inode) by rename
    assert reg.exists(image)
    assert len(checked) == 2
    with open(reg.path(image), "r+b") as f:  # rewritten in place: size changes
        f.truncate(10)
    assert not reg.exists(image) and not reg.exists(image)
    assert len(checked) == 3


# ------------------------------------------------------------- registry entries


@pytest.fixture
def header_reads(monkeypatch):
    """Counts the SIF header reads (every SIF check starts with one)."""
    from binderhub_hpc import sif

    reads = []
    real = sif._header
    monkeypatch.setattr(sif, "_header", lambda fd: reads.append(fd) or real(fd))
    return reads


@pytest.fixture
def validations(monkeypatch):
    """Counts the image names the registry validates."""
    from binderhub_hpc import registry as registry_module

    names = []
    real = registry_module.split_image_name
    monkeypatch.setattr(registry_module, "split_image_name", lambda image: names.append(image) or real(image))
    return names


@pytest.mark.parametrize("image", ["", "no-tag", "a:b/c", "a:", ":b", "a\x00:b", "a:\ud800", "a" * 2000 + ":b", None])
def test_an_entry_refuses_what_the_registry_refuses_with_the_same_message(reg, image):
    with pytest.raises(InvalidImageName) as from_entry:
        reg.entry(image)
    with pytest.raises(InvalidImageName) as from_lookup:
        reg.lookup(image)
    assert str(from_entry.value) == str(from_lookup.value) != ""
    assert reg.exists(image) is False


def test_an_entry_validates_its_name_once_for_all_it_does(reg, validations):
    image = "p/a:1"
    entry = reg.entry(image)
    with entry.lock():
        pass
    tmp = entry.tempfile("sif")
    tmp.write_bytes(_sif())
    entry.publish({"sif": tmp}, {"repo": "r"})
    assert entry.complete() and entry.lookup() and entry.session_image()
    assert entry.metadata()["repo"] == "r"
    entry.touch()
    for p in (entry.path(), entry.compute_path(), entry.metadata_path, entry.lock_path, entry.used_path):
        assert p.exists()
    assert validations == [image]


def test_an_entrys_paths_are_the_registrys(tmp_path):
    reg = SIFRegistry(root=str(tmp_path / "root"), compute_root="/compute/reg", formats=["sif", "oci-archive"])
    for image in ("p/a:1", "Prefix/Ünïcode_x:T.1", "a" * 300 + ":" + "b" * 300):
        entry = reg.entry(image)
        assert entry.image == image and entry.registry is reg
        for fmt in FORMATS:
            assert entry.path(fmt) == reg.path(image, fmt)
            assert entry.path(fmt).parent.parent == Path(reg.root) / "images"
            assert FILE_NAME.match(entry.path(fmt).name)
            assert entry.compute_path(fmt) == reg.compute_path(image, fmt)
            assert str(entry.compute_path(fmt)).startswith("/compute/reg/images/")
        assert entry.path() == entry.path("sif")  # the primary format
        assert entry.metadata_path == reg.metadata_path(image) == entry.path("sif").with_suffix(".json")
        assert entry.lock_path == reg.lock_path(image) == entry.path("sif").with_suffix(".lock")
        assert entry.used_path == reg.used_path(image) == entry.path("sif").with_suffix(".used")
        assert (entry.dirname, entry.stem + ".sif") == (entry.path().parent.name, entry.path().name)
    with pytest.raises(ValueError, match="unknown image format"):
        reg.entry("p/a:1").path("docker")


def test_an_entry_is_complete_only_when_every_configured_format_is_whole(reg2):
    image = "p/a:1"
    entry = reg2.entry(image)
    assert not entry.complete() and entry.lookup() is None and entry.session_image() is None
    tmp = entry.tempfile("sif")
    tmp.write_bytes(_sif())
    entry.publish({"sif": tmp})
    assert entry.complete("sif") and not entry.complete("oci-archive") and not entry.complete()
    assert entry.complete() == reg2.exists(image) is False
    tmp = entry.tempfile("oci-archive")
    tmp.write_bytes(_tar())
    entry.publish({"oci-archive": tmp})
    assert entry.complete() and reg2.exists(image)
    assert entry.lookup("oci-archive") == entry.path("oci-archive")
    entry.path("sif").write_bytes(_sif()[:-1])  # truncated
    assert not entry.complete() and entry.lookup() is None and entry.session_image() is None
    assert not reg2.exists(image)


def test_a_session_image_is_the_compute_nodes_path_and_the_root_partitions_offset(tmp_path):
    from binderhub_hpc import sif

    reg = SIFRegistry(root=str(tmp_path / "root"), compute_root="/compute/reg")
    image = "p/a:1"
    publish_bytes(reg, image, b"hsqs root filesystem")
    entry = reg.entry(image)
    root = sif.root_partition(entry.path())
    assert entry.session_image().path == str(reg.compute_path(image)) != str(reg.path(image))
    assert entry.session_image().root_offset == root.offset > 0
    assert entry.session_image(compute=False).path == str(reg.path(image))
    # nothing there, or damaged: nothing to run
    assert reg.entry("p/a:2").session_image() is None
    reg.path(image).write_bytes(b"SIF_MAGIC but not a SIF")
    assert reg.entry(image).session_image() is None


def test_a_lookup_and_its_session_image_read_the_sif_header_once(reg, header_reads):
    image = "p/a:1"
    publish_bytes(reg, image)
    fresh = SIFRegistry(root=reg.root)  # as a new spawner's registry
    header_reads.clear()
    entry = fresh.entry(image)
    assert entry.complete() and entry.lookup() and entry.session_image()
    assert len(header_reads) == 1
    # a later lookup of the same file version reads nothing
    assert fresh.entry(image).session_image() and fresh.exists(image)
    assert len(header_reads) == 1
    publish_bytes(reg, image, b"new")  # a new version: one more read
    assert fresh.entry(image).session_image() and fresh.exists(image)
    assert len(header_reads) == 2


def test_an_entry_refuses_an_image_directory_linked_out_of_the_root(reg, tmp_path):
    outside = _plant_image_dir_link(reg, tmp_path)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    entry = reg.entry("p/victim:t")
    with pytest.raises(InvalidImageName, match="outside the registry"):
        entry.path()
    for call in (entry.complete, entry.lookup, entry.session_image, entry.metadata, entry.lock, entry.tempfile):
        with pytest.raises(InvalidImageName):
            call()
    with pytest.raises(InvalidImageName):
        entry.publish({})
    entry.touch()  # never raises, and touches nothing
    entry.remove()  # walks the directory without following it: removes nothing
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_an_entry_follows_no_symlink_planted_for_its_use_record_or_lock(reg, tmp_path):
    from binderhub_hpc.lock import LockFileError

    target = tmp_path / "target"
    target.write_bytes(b"precious")
    os.utime(target, (1, 1))
    entry = reg.entry("p/a:1")
    entry.path().parent.mkdir(parents=True)
    entry.used_path.symlink_to(target)
    entry.lock_path.symlink_to(target)
    entry.touch()
    with pytest.raises(LockFileError, match="symlink"):
        entry.lock().try_acquire()
    assert target.read_bytes() == b"precious" and target.stat().st_mtime == 1


async def test_binderhubs_lookup_validates_once_and_reads_the_header_once(tmp_path, header_reads, validations):
    pytest.importorskip("binderhub")
    from binderhub_hpc.binderhub import SIFDockerRegistry

    reg = SIFRegistry(root=str(tmp_path / "root"))
    publish_bytes(reg, "repo:abc", metadata={"size": 7})
    docker = SIFDockerRegistry(sif_registry=SIFRegistry(root=reg.root))
    header_reads.clear()
    validations.clear()
    manifest = await docker.get_image_manifest("repo", "abc")
    assert len(header_reads) == 1 and validations == ["repo:abc"]
    assert manifest["path"] == str(reg.path("repo:abc")) and manifest["size"] == 7
    assert reg.used_path("repo:abc").exists()
