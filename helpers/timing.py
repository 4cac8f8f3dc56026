"""Honest timing: warm-up, CUDA-synchronised repeats, the median, images/s, and a results table.

The clock is the one ``torch.utils.benchmark.Timer`` uses: it calls ``torch.cuda.synchronize()``
before reading the time whenever CUDA is there, so GPU work is timed to its end, not to its launch.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.benchmark.utils.timer import timer as clock


@dataclass(frozen=True)
class Timing:
    """One measured variant: the median of ``repeats`` timed calls of ``fn``."""

    name: str
    seconds: float
    """Median wall time of one call, in seconds."""
    n_items: int
    """How many items (images) one call processes."""
    runs: tuple[float, ...] = field(default=())
    """Every timed call, in seconds (warm-up calls excluded)."""

    @property
    def items_per_s(self) -> float:
        """Throughput: items per second at the median."""
        return self.n_items / self.seconds if self.seconds > 0 else float("inf")

    @property
    def spread(self) -> float:
        """(max - min) / median of the runs: how noisy the measurement was."""
        if len(self.runs) < 2 or self.seconds <= 0:
            return 0.0
        return (max(self.runs) - min(self.runs)) / self.seconds


def measure(
    fn: Callable[[], object], name: str, n_items: int = 1, warmup: int = 1, repeats: int = 5
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones; keep the median.

    The clock (``torch.utils.benchmark``'s) waits for the GPU before each reading, so a
    timed call ends when its GPU work ends.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = clock()
        fn()
        runs.append(clock() - start)
    return Timing(name=name, seconds=statistics.median(runs), n_items=n_items, runs=tuple(runs))


@dataclass
class ResultsTable:
    """Timings of several variants of one job, compared with a baseline (the first by default)."""

    title: str = ""
    timings: list[Timing] = field(default_factory=list)
    baseline: str | None = None

    def add(self, timing: Timing) -> Timing:
        """Append a timing and return it (so a notebook can ``t = table.add(measure(...))``)."""
        self.timings.append(timing)
        return timing

    def _baseline(self) -> Timing | None:
        if not self.timings:
            return None
        if self.baseline is None:
            return self.timings[0]
        for timing in self.timings:
            if timing.name == self.baseline:
                return timing
        raise KeyError(f"baseline {self.baseline!r} is not in the table")

    def speedup(self, timing: Timing) -> float:
        """Throughput of ``timing`` divided by the baseline's."""
        base = self._baseline()
        return timing.items_per_s / base.items_per_s if base else float("nan")

    def rows(self) -> list[dict[str, object]]:
        """One dict per variant: name, seconds, items, items_per_s, speedup, spread."""
        return [
            {
                "name": t.name,
                "seconds": t.seconds,
                "items": t.n_items,
                "items_per_s": t.items_per_s,
                "speedup": self.speedup(t),
                "spread": t.spread,
            }
            for t in self.timings
        ]

    def to_markdown(self) -> str:
        """The table in Markdown (Japanese headers), for notebooks and reports. The 揺れ column shows
        the fastest and slowest timed call and (max - min) / median; "1 回" when there was one run."""
        lines = [
            "| 方式 | 時間 (中央値) | 揺れ (最小〜最大) | 画像数 | 画像/秒 | 基準比 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for timing, row in zip(self.timings, self.rows(), strict=True):
            lines.append(
                f"| {row['name']} | {row['seconds']:.3f} s | {_spread_cell(timing)} | {row['items']} | "
                f"{row['items_per_s']:.1f} | {row['speedup']:.2f}× |"
            )
        return "\n".join(lines)

    def to_dicts(self) -> list[dict[str, object]]:
        """Raw timings (runs included) for JSON."""
        return [asdict(t) for t in self.timings]

    def _repr_markdown_(self) -> str:
        title = f"**{self.title}**\n\n" if self.title else ""
        return title + self.to_markdown()

    def __str__(self) -> str:
        return self.to_markdown()


def _spread_cell(timing: Timing) -> str:
    """「0.742〜0.863 s (16 %)」: the range of the timed calls and the spread; 「1 回」 with one run."""
    if len(timing.runs) < 2:
        return "1 回"
    return f"{min(timing.runs):.3f}〜{max(timing.runs):.3f} s ({timing.spread:.0%})"


@contextlib.contextmanager
def pinned_threads(threads: int | None = 1) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: leave it), then restore the old
    count. On a 2-core machine shared with other work, one thread keeps a microbenchmark from
    waiting for a busy core (notebook 02 sections 5 and its 発展, via ``helpers.bench``;
    ``tiny_clip.train``; notebook 05 shows the effect)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def op_counts(fn: Callable[[], object], calls: int = 100) -> dict[str, float]:
    """How many times each ATen operator runs per call of ``fn`` (``torch.profiler``, CPU events,
    ``calls`` calls averaged), e.g. ``{"aten::nonzero": 1.0, "aten::empty": 1.0, ...}``.

    The profiler's own start/stop lines, which its C++ side writes to file descriptor 2, are
    discarded for the duration (they would be a cell's stderr); Python exceptions still propagate.
    Notebook 06 section 2.
    """
    import os
    import sys

    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return {event.key: event.count / calls for event in prof.key_averages()}
