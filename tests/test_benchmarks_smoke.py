"""The benchmark runner without running benchmarks: listing and the table.
Nothing here measures or asserts a duration."""

import os
import subprocess
import sys

from benchmarks.common import Row, Stats, Target, format_table

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_list_names_every_benchmark():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"], cwd=TOP, capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["launch", "concurrent", "scale", "registry", "build", "convert", "cold", "dedup"]


def test_table_formats_units_targets_and_notes():
    rows = [
        Row(
            "launch",
            "warm",
            None,
            Stats.of([2.0, 3.0, 4.0]),
            baseline=Stats.of([2.5]),
            target=(Target("median", 4.0), Target("ratio", 1.15)),
            note="two targets",
        ),
        Row("dedup", "builds", 20, Stats.of([1, 1]), target=Target("median", 1, unit="builds"), unit="builds"),
        Row("concurrent", "squeue", 50, Stats.of([0.5]), baseline=Stats.of([5.0]), unit="cmd/s"),
    ]
    lines = format_table(rows, notes=True).splitlines()
    assert lines[0].split("|")[-2].strip() == "note"
    assert len({len(line) for line in lines}) == 1  # aligned
    warm, builds, squeue = lines[2:]
    assert "3.00 s" in warm and "median <= 4.00 s, ratio <= 1.15x" in warm
    assert "| NO " in warm  # ratio 1.2 misses 1.15
    assert "1 builds" in builds and "| yes " in builds
    assert "0.5 cmd/s" in squeue and "0.10x" in squeue
    assert rows[0].to_dict()["met"] is False and rows[1].to_dict()["unit"] == "builds"
