"""What every benchmark shares: timing, statistics, result rows, output.

A benchmark is a module with ``run(args) -> list[Row]`` (and optionally
``add_arguments(parser)``), registered in :mod:`benchmarks.__main__`. Each row
is one case: the median, p95 and p99 of repeated timings, the median of a
baseline measured in the same run, their ratio, and the target it is held to.
"""

import gc
import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

# ----------------------------------------------------------------- statistics


def percentile(values, q):
    """The q-th percentile (0-100) of `values`, linearly interpolated."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True)
class Stats:
    count: int
    median: float
    p95: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, samples):
        return cls(
            count=len(samples),
            median=percentile(samples, 50),
            p95=percentile(samples, 95),
            p99=percentile(samples, 99),
            min=min(samples),
            max=max(samples),
        )


# ----------------------------------------------------------------- timing


def time_each(fn: Callable, args: Sequence, warmup: int = 100):
    """Call ``fn(a)`` for every `a` in `args`, timing each call alone.

    For fast operations (microseconds): the timer's own cost (tens of
    nanoseconds) is included, as it is in the baseline. Returns seconds.
    """
    for a in args[:warmup]:
        fn(a)
    clock = time.perf_counter_ns
    out = []
    append = out.append
    for a in args:
        t0 = clock()
        fn(a)
        append(clock() - t0)
    return [ns / 1e9 for ns in out]


def time_repeated(fn: Callable, repeat: int, warmup: int = 1, setup: Optional[Callable] = None):
    """Run ``fn()`` `repeat` times (after `warmup` untimed runs); seconds each.

    For slow operations (a launch, a build): `setup()` runs untimed before
    each call.
    """
    out = []
    for i in range(warmup + repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


def interleaved(measures, rounds=5):
    """Run each ``name -> callable() -> samples`` in turn, `rounds` times.

    Alternating subject and baseline spreads noise (other load, frequency
    changes) over both instead of charging it to one. Returns name -> samples.
    """
    out = {name: [] for name in measures}
    for _ in range(rounds):
        for name, m in measures.items():
            out[name].extend(m())
    return out


class no_gc:
    """Context manager: collect now, then keep the collector out of timings."""

    def __enter__(self):
        gc.collect()
        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self._was:
            gc.enable()


# ----------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A goal such as "p99 <= 1 ms" or "ratio <= 1.2".

    `stat` is one of median, p95, p99 (in the row's unit, seconds unless
    said otherwise) or ratio (median over the baseline's median). `unit`
    names the limit's unit when it is not seconds (e.g. "builds").
    """

    stat: str
    limit: float
    unit: str = "s"

    def value(self, row):
        return row.ratio if self.stat == "ratio" else getattr(row, self.stat)

    def met(self, row):
        v = self.value(row)
        return None if v is None else v <= self.limit

    def __str__(self):
        if self.stat == "ratio":
            limit = f"{self.limit:g}x"
        else:
            limit = fmt_value(self.limit, self.unit)
        return f"{self.stat} <= {limit}"


# ----------------------------------------------------------------- rows


@dataclass
class Row:
    benchmark: str
    case: str
    n: Optional[int]
    stats: Stats
    baseline: Optional[Stats] = None
    #: a Target, or a tuple of Targets that must all be met
    target: Optional[Target] = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    #: unit of the samples: "s" (seconds, the default) or any other word
    #: ("MB/s", "builds", "cmd/s"), printed after the number
    unit: str = "s"

    @property
    def median(self):
        return self.stats.median

    @property
    def p95(self):
        return self.stats.p95

    @property
    def p99(self):
        return self.stats.p99

    @property
    def baseline_median(self):
        return self.baseline.median if self.baseline else None

    @property
    def ratio(self):
        b = self.baseline_median
        return self.median / b if b else None

    @property
    def targets(self):
        if self.target is None:
            return ()
        return tuple(self.target) if isinstance(self.target, (tuple, list)) else (self.target,)

    @property
    def target_text(self):
        return ", ".join(map(str, self.targets)) or None

    @property
    def met(self):
        results = [t.met(self) for t in self.targets]
        if not results:
            return None
        if False in results:
            return False
        return None if None in results else True

    def to_dict(self):
        return {
            "benchmark": self.benchmark,
            "case": self.case,
            "n": self.n,
            "median_s": self.median,
            "p95_s": self.p95,
            "p99_s": self.p99,
            "samples": self.stats.count,
            "baseline_median_s": self.baseline_median,
            "baseline": asdict(self.baseline) if self.baseline else None,
            "ratio": self.ratio,
            "target": self.target_text,
            "met": self.met,
            "stats": asdict(self.stats),
            "note": self.note,
            **({"unit": self.unit} if self.unit != "s" else {}),
            **({"extra": self.extra} if self.extra else {}),
        }


# ----------------------------------------------------------------- output


def fmt_seconds(s):
    if s is None:
        return "-"
    a = abs(s)
    if a < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if a < 1e-3:
        return f"{s * 1e6:.2f} µs"
    if a < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_value(v, unit="s"):
    """`v` in `unit`: seconds as fmt_seconds, anything else as a number
    with three significant digits and the unit."""
    if unit == "s":
        return fmt_seconds(v)
    if v is None:
        return "-"
    if abs(v) >= 100 or float(v).is_integer():
        text = f"{v:.0f}"
    else:
        text = f"{v:.3g}"
    return f"{text} {unit}" if unit else text


COLUMNS = ["benchmark", "case", "n", "median", "p95", "p99", "baseline median", "ratio", "target", "met?"]


def table_cells(row):
    met = row.met
    unit = getattr(row, "unit", "s")
    return [
        row.benchmark,
        row.case,
        "-" if row.n is None else f"{row.n:,}".replace(",", " "),
        fmt_value(row.median, unit),
        fmt_value(row.p95, unit),
        fmt_value(row.p99, unit),
        fmt_value(row.baseline_median, unit),
        "-" if row.ratio is None else f"{row.ratio:.2f}x",
        row.target_text or "-",
        "-" if met is None else ("yes" if met else "NO"),
    ]


def format_table(rows, columns=None, notes=False):
    """A plain-text (and Markdown-compatible) table of `rows`.

    `columns`: the subset of COLUMNS to show, in order (default: all);
    `notes`: add each row's note as a last column.
    """
    columns = list(columns or COLUMNS)
    index = [COLUMNS.index(c) for c in columns]
    cells = [columns + (["note"] if notes else [])]
    for r in rows:
        full = table_cells(r)
        cells.append([full[i] for i in index] + ([r.note or ""] if notes else []))
    right = {j for j, i in enumerate(index) if i in {2, 3, 4, 5, 6, 7}}
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]

    def line(cs):
        return (
            "| "
            + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))
            + " |"
        )

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(c) for c in cells[1:]])


def environment():
    """Where the figures were measured."""
    return {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(rows, path, **meta):
    doc = {"environment": environment(), **meta, "results": [r.to_dict() for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
