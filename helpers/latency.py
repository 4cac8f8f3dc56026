"""Latency distributions: time every call on its own, then read percentiles (the histogram is
:func:`helpers.plots.latency_histogram`).

``helpers.timing`` answers "how fast on average?" with a median; this module answers "how slow can
one call be?": the first call, p90/p99 and the worst call, which a median hides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.benchmark.utils.timer import timer as clock  # waits for the GPU before reading

PERCENTILES: tuple[int, ...] = (50, 90, 99)


@dataclass(frozen=True)
class Latency:
    """Per-call wall times of one variant, in call order (seconds)."""

    name: str
    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a Latency needs at least one sample")

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0–100) of the samples, in seconds (linear interpolation)."""
        return float(np.percentile(self.samples, q))

    @property
    def first(self) -> float:
        """The first call (the one that pays for lazy initialisation and compilation)."""
        return self.samples[0]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def worst(self) -> float:
        return max(self.samples)

    def steady(self, skip: int) -> Latency:
        """The same variant without its first ``skip`` calls (the warm-up)."""
        if not 0 <= skip < len(self.samples):
            raise ValueError(f"skip must be in [0, {len(self.samples)}), got {skip}")
        return Latency(self.name, self.samples[skip:])

    def slowest(self, share: float = 0.1) -> Latency:
        """The slowest ``share`` of the calls (at least 2, so a verdict can see their spread): the tail.

        Notebook 05 section 1.4 compares the tails of two variants with ``helpers.verdict.compare``.
        """
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        k = min(len(self.samples), max(2, math.ceil(len(self.samples) * share)))
        return Latency(self.name, tuple(sorted(self.samples)[-k:]))

    def row(self) -> dict[str, float | int | str]:
        """Name, number of calls, p50/p90/p99/max in milliseconds and max/p50."""
        row: dict[str, float | int | str] = {"name": self.name, "calls": len(self.samples)}
        for q in PERCENTILES:
            row[f"p{q}_ms"] = self.percentile(q) * 1e3
        row["max_ms"] = self.worst * 1e3
        row["max_over_p50"] = self.worst / self.p50 if self.p50 > 0 else float("inf")
        return row


def time_calls(fn: Callable[[], object], n: int, name: str = "", max_seconds: float | None = None) -> Latency:
    """Call ``fn()`` ``n`` times and time each call separately (no warm-up: call 1 is the first).

    With ``max_seconds``, stop early once the timed calls add up to that much (at least one call
    is always made), so a pathologically slow variant cannot stall a notebook.
    The clock is ``torch.utils.benchmark``'s: with CUDA it synchronises before each reading, so a
    call's time includes its GPU work.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    samples: list[float] = []
    for _ in range(n):
        start = clock()
        fn()
        samples.append(clock() - start)
        if max_seconds is not None and sum(samples) >= max_seconds:
            break
    return Latency(name, tuple(samples))


def time_calls_interleaved(fns: Mapping[str, Callable[[], object]], n: int) -> dict[str, Latency]:
    """Call every function of ``fns`` once per round, in order, for ``n`` rounds; time each call.

    Interleaving puts the variants under the same load at the same moments (a shared machine's
    slow spells hit all of them), so their distributions can be compared. Round 1 holds each one's
    first call; whatever a process initialises lazily falls on the first function's first call.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: Latency(name, tuple(values)) for name, values in samples.items()}


def to_markdown(latencies: Sequence[Latency]) -> str:
    """A Markdown table (Japanese headers): calls, p50, p90, p99, max and max/p50 per variant."""
    lines = [
        "| 方式 | 回数 | p50 (ms) | p90 (ms) | p99 (ms) | 最大 (ms) | 最大/p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for lat in latencies:
        r = lat.row()
        lines.append(
            f"| {r['name']} | {r['calls']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['max_ms']:.3f} | {r['max_over_p50']:.1f} 倍 |"
        )
    return "\n".join(lines)
