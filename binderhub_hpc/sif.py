"""The SIF container format, read without Apptainer: enough to tell a whole
image from a broken one and to find its root filesystem partition (which
podman sessions mount with squashfuse at its offset).

The layout is Apptainer's (``github.com/apptainer/sif/v2``, pkg/sif: the
``header`` and ``rawDescriptor`` structs, written little-endian by
encoding/binary without padding).
"""

import os
import struct
import time
import uuid
from dataclasses import dataclass

#: launch script, magic, version, arch, ID, created, modified, descriptors
#: free, total, offset, size, data offset, size
HEADER = struct.Struct("<32s10s3s3s16s8q")
#: data type, used, ID, group ID, linked ID, offset, size, size with
#: padding, created, modified, UID, GID, name, type-specific extra
DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")
#: a partition's extra: filesystem type, partition type, architecture
PARTITION_EXTRA = struct.Struct("<ii3s")
MAGIC = b"SIF_MAGIC\0"
VERSION = b"01\0"
DATA_PARTITION = 0x4004
FS_SQUASHFS = 1
PART_PRIMSYS = 2
#: the group bit every object's group ID carries
GROUP_MASK = 0xF0000000
#: descriptor tables larger than this are not read (a real SIF has a few dozen)
MAX_DESCRIPTORS = 4096


class SIFError(ValueError):
    """Not a (whole) SIF file."""


@dataclass(frozen=True)
class Partition:
    offset: int
    size: int
    fstype: int
    parttype: int


def _header(fd):
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size:
        raise SIFError("too short for a SIF header")
    fields = HEADER.unpack(head)
    if fields[1] != MAGIC or fields[2] != VERSION:
        raise SIFError("no SIF magic (or an unknown SIF version)")
    return fields


def root_partition(path):
    """The primary system partition (the image's root filesystem) of the
    SIF at `path`; raises SIFError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return check(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def check(fd, size):
    """The root partition of the whole SIF open as `fd` (`size` bytes);
    raises SIFError for anything less: a 0-byte or truncated file, an empty
    ``siftool new``, descriptors or data the header declares beyond the end
    of the file, no root filesystem partition."""
    (_, _, _, _, _, _, _, free, total, d_off, d_size, data_off, data_size) = _header(fd)
    if not 0 < total <= MAX_DESCRIPTORS:
        raise SIFError(f"implausible descriptor count {total}")
    if not 0 <= free < total:
        raise SIFError("no object in use")
    if d_off < HEADER.size or d_size < total * DESCRIPTOR.size or data_off < d_off + d_size:
        raise SIFError("descriptors and data overlap")
    if data_size <= 0 or data_off + data_size > size:
        raise SIFError("cut short: its data ends beyond the file")
    table = os.pread(fd, total * DESCRIPTOR.size, d_off)
    if len(table) < total * DESCRIPTOR.size:
        raise SIFError("descriptor table cut short")
    for i in range(total):
        (dtype, used, _, _, _, offset, length, *_rest, extra) = DESCRIPTOR.unpack_from(table, i * DESCRIPTOR.size)
        if not used or dtype != DATA_PARTITION:
            continue
        fstype, parttype, _ = PARTITION_EXTRA.unpack_from(extra)
        if parttype != PART_PRIMSYS:
            continue
        if offset <= 0 or length <= 0 or offset + length > size:
            raise SIFError("the root partition lies outside the file")
        return Partition(offset, length, fstype, parttype)
    raise SIFError("no root filesystem partition")


def minimal_sif(payload):
    """The smallest whole SIF whose root partition holds `payload`: for
    tests and benchmarks that need a registry image but never run it."""
    if not payload:
        raise ValueError("a SIF partition needs data")
    now = int(time.time())
    d_off = HEADER.size
    data_off = d_off + DESCRIPTOR.size
    header = HEADER.pack(
        b"#!/usr/bin/env run-singularity\n",
        MAGIC,
        VERSION,
        b"02\0",
        uuid.uuid4().bytes,
        now,
        now,
        0,
        1,
        d_off,
        DESCRIPTOR.size,
        data_off,
        len(payload),
    )
    extra = PARTITION_EXTRA.pack(FS_SQUASHFS, PART_PRIMSYS, b"02\0")
    descriptor = DESCRIPTOR.pack(
        DATA_PARTITION,
        True,
        1,
        GROUP_MASK | 1,
        0,
        data_off,
        len(payload),
        len(payload),
        now,
        now,
        0,
        0,
        b"",
        extra,
    )
    return header + descriptor + bytes(payload)
