"""Conclusions computed from this run's numbers, never asserted: the sentence a notebook prints.

The prose of a notebook states what is true on a Colab T4 with the real model, from sourced evidence.
What *this* run (a CPU in CI, the embedded model) shows is one printed line, built here::

    verdict.say(verdict.compare(t_e, t_g, "e", "g"))
    # この実行では: g は e より 2.4 倍速い (揺れ ±6 % を超える差)
    verdict.say(verdict.largest_stage(stages), f"GPU なしで {n} 枚")
    # この実行では: いちばん長い段階は「デコード」(3.1 ms、全体の 61 %)。GPU なしで 64 枚

Two timings differ only when the ranges of their runs do not overlap **and** the ratio of their
medians (or its inverse, when b is slower) is further from 1 than the larger relative spread
(half of (max - min) / median): on a noisy 2-core machine a 10 % difference with ±15 % spread is
"揺れの範囲内"; medians further apart than the spread whose runs still overlap are "はっきりしない"
(measure again, or more times).
A timing with a single run has no spread: the verdict says so and only calls a difference of
:data:`SINGLE_RUN_FACTOR` or more.

For per-call latency samples (many single calls with rare spikes), use :func:`compare_distributions`:
it compares the medians with a seeded bootstrap interval, so a few slow calls do not drown a clear shift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from helpers.latency import Latency
from helpers.timing import Timing

__all__ = [
    "BOOTSTRAP_LEVEL",
    "MIN_SAMPLES",
    "RUN_PREFIX",
    "SINGLE_RUN_FACTOR",
    "Verdict",
    "compare",
    "compare_distributions",
    "largest_stage",
    "ratio_words",
    "say",
    "this_run",
]

SINGLE_RUN_FACTOR = 1.5
"""With one run of either timing (no spread known), only a ratio this far from 1 counts as a difference."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`compare`: ``str()`` is the Japanese sentence a notebook prints."""

    text: str
    ratio: float
    """How many times faster ``b`` is than ``a`` (median against median; < 1: slower)."""
    differs: bool
    """True when the difference is beyond the noise (see the module docstring)."""
    noise: float
    """The larger relative half-spread of the two (0.06 = ±6 %); NaN when a timing has one run."""

    def __str__(self) -> str:
        return self.text


def _half_spread(timing: Timing) -> float | None:
    if len(timing.runs) < 2 or timing.seconds <= 0:
        return None
    return (max(timing.runs) - min(timing.runs)) / timing.seconds / 2


def ratio_words(ratio: float) -> str:
    """How many times faster (``ratio`` > 1) or slower, in the course's words: "25 % 速い" below 1.95,
    "2.4 倍遅い" from there (a speed ratio, so 0.5 reads "2.0 倍遅い", never "50 % 遅い")."""
    if ratio >= 1:
        return f"{ratio:.1f} 倍速い" if ratio >= 1.95 else f"{(ratio - 1) * 100:.0f} % 速い"
    slower = 1 / ratio
    return f"{slower:.1f} 倍遅い" if slower >= 1.95 else f"{(slower - 1) * 100:.0f} % 遅い"


def compare(a: Timing, b: Timing, a_label: str | None = None, b_label: str | None = None) -> Verdict:
    """Is ``b`` faster or slower than ``a`` beyond the noise of this run? Per item (images/s).

    ``a_label``/``b_label`` name the two in the sentence (default: the timings' names).
    """
    a_name, b_name = a_label or a.name, b_label or b.name
    ratio = b.items_per_s / a.items_per_s if a.items_per_s > 0 else float("inf")
    spreads = [_half_spread(a), _half_spread(b)]
    if None in spreads:
        differs = ratio >= SINGLE_RUN_FACTOR or ratio <= 1 / SINGLE_RUN_FACTOR
        if differs:
            text = (
                f"{b_name} は {a_name} より {ratio_words(ratio)}"
                f" (1 回だけの測定で揺れは分からないが、{SINGLE_RUN_FACTOR} 倍以上の差)"
            )
        else:
            text = (
                f"{b_name} と {a_name} に {SINGLE_RUN_FACTOR} 倍以上の差はない"
                f" (速さの比 {b_name}/{a_name} = {ratio:.2f}、1 回だけの測定で揺れは分からない)"
            )
        return Verdict(text, ratio, differs, float("nan"))
    noise = max(s for s in spreads if s is not None)
    # per-item rates scale with 1/seconds: compare the runs' ranges in seconds per item
    a_lo, a_hi = min(a.runs) / a.n_items, max(a.runs) / a.n_items
    b_lo, b_hi = min(b.runs) / b.n_items, max(b.runs) / b.n_items
    apart = b_hi < a_lo or a_hi < b_lo
    far = max(ratio, 1 / ratio) - 1 > noise  # symmetric: 100x slower is as far as 100x faster
    differs = apart and far
    ratio_text = f"速さの比 {b_name}/{a_name} = {ratio:.2f}"  # images/s: the inverse of the times' ratio
    if differs:
        text = f"{b_name} は {a_name} より {ratio_words(ratio)} (揺れ ±{noise * 100:.0f} % を超える差)"
    elif far:  # the medians are far apart, but the runs' ranges overlap
        runs = min(len(a.runs), len(b.runs))
        text = (
            f"{b_name} と {a_name} の差ははっきりしない ({ratio_text}。"
            f"揺れ ±{noise * 100:.0f} % より大きいが、{runs} 回の測定の範囲が重なる)"
        )
    else:
        text = f"{b_name} と {a_name} の差は揺れの範囲内 ({ratio_text}、揺れ ±{noise * 100:.0f} %)"
    return Verdict(text, ratio, differs, noise)


BOOTSTRAP_LEVEL = 0.95
"""Coverage of the bootstrap interval :func:`compare_distributions` puts around the ratio of medians."""

MIN_SAMPLES = 5
"""Fewer per-call samples than this on either side: :func:`compare_distributions` calls no difference."""


def _samples(x: Latency | Sequence[float]) -> np.ndarray:
    return np.asarray(x.samples if isinstance(x, Latency) else x, dtype=float)


def compare_distributions(
    a: Latency | Sequence[float],
    b: Latency | Sequence[float],
    a_label: str | None = None,
    b_label: str | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> Verdict:
    """Are ``b``'s single calls typically faster or slower than ``a``'s? For per-call latency samples.

    :func:`compare` takes half of (max - min) / median as the noise, which suits a few repeats of a
    long measurement but not hundreds of single calls: one 300 ms spike among 4 ms calls makes any
    difference of medians "noise". Here the statistic is the ratio of the medians (how many times
    faster ``b`` is: median(a) / median(b)) and its uncertainty is a percentile bootstrap: resample
    each side with replacement ``n_boot`` times (generator seeded with ``seed``, so a notebook prints
    the same verdict for the same samples) and take the central :data:`BOOTSTRAP_LEVEL` interval of
    the resampled ratios. A difference is called only when that interval does not contain 1; rare
    spikes move a median little, so a clear shift stays a difference, while two draws of one
    distribution give an interval around 1. Fewer than :data:`MIN_SAMPLES` calls on either side:
    no difference is called, and the sentence says so. ``noise`` is the interval's half-width
    relative to the ratio. ``Latency`` objects lend their names as the default labels.
    Notebook 05 section 1.4 compares CPU contention with it.
    """
    a_name = a_label or (a.name if isinstance(a, Latency) else "a")
    b_name = b_label or (b.name if isinstance(b, Latency) else "b")
    xa, xb = _samples(a), _samples(b)
    if len(xa) == 0 or len(xb) == 0:
        raise ValueError("both sides need at least one sample")
    ma, mb = float(np.median(xa)), float(np.median(xb))
    ratio = ma / mb if mb > 0 else float("inf")
    ratio_text = (
        f"速さの比 {b_name}/{a_name} = {ratio:.2f}"  # median(a) / median(b): the inverse of the times
    )
    if min(len(xa), len(xb)) < MIN_SAMPLES:
        text = (
            f"{b_name} と {a_name} の差は判定できない ({ratio_text}。"
            f"呼び出しが {min(len(xa), len(xb))} 回しかなく、{MIN_SAMPLES} 回に足りない)"
        )
        return Verdict(text, ratio, False, float("nan"))
    rng = np.random.default_rng(seed)
    boot_a = np.median(rng.choice(xa, (n_boot, len(xa))), axis=1)
    boot_b = np.median(rng.choice(xb, (n_boot, len(xb))), axis=1)
    with np.errstate(divide="ignore"):
        ratios = boot_a / boot_b
    tail = (1 - BOOTSTRAP_LEVEL) / 2 * 100
    lo, hi = (float(v) for v in np.percentile(ratios, [tail, 100 - tail]))
    differs = lo > 1 or hi < 1
    noise = (hi - lo) / 2 / ratio if ratio > 0 else float("nan")
    interval = f"中央値の比の {BOOTSTRAP_LEVEL * 100:.0f} % 区間 {lo:.2f}〜{hi:.2f}"
    if differs:
        text = (
            f"{b_name} は {a_name} より {ratio_words(ratio)} (中央値どうし。{interval} が 1 をまたがない差)"
        )
    else:
        text = f"{b_name} と {a_name} の中央値の差は揺れの範囲内 ({ratio_text}、{interval} が 1 を含む)"
    return Verdict(text, ratio, differs, noise)


def largest_stage(stages: Mapping[str, float], unit: str = "ms") -> str:
    """The largest stage of a breakdown and its share.

    For example "いちばん長い段階は「モデル」(12.3 ms、全体の 54 %)".
    """
    if not stages:
        raise ValueError("no stages given")
    total = sum(stages.values())
    name, value = max(stages.items(), key=lambda item: item[1])
    share = value / total if total > 0 else 0.0
    return f"いちばん長い段階は「{name}」({value:.3g} {unit}、全体の {share * 100:.0f} %)"


RUN_PREFIX = "この実行では: "
"""How the one line about this run begins (COURSE.md: the prose never has to hold both ways)."""


def this_run(*findings: Verdict | str) -> str:
    """The line about this run: :data:`RUN_PREFIX`, then the findings joined into sentences with "。".

    A finding is a :class:`Verdict` (from :func:`compare`, :func:`compare_distributions`) or a string
    the notebook built from this run's values (:func:`largest_stage`, a share, a count).
    """
    parts = [str(finding).strip().removesuffix("。") for finding in findings]
    if not parts or not all(parts):
        raise ValueError("this_run needs at least one finding, and no empty one")
    if any(RUN_PREFIX.strip() in part for part in parts):
        raise ValueError(f"a finding already starts with {RUN_PREFIX.strip()!r}: pass the finding itself")
    return RUN_PREFIX + "。".join(parts)


def say(*findings: Verdict | str) -> None:
    """Print :func:`this_run`'s line: the one call a notebook makes after a measurement."""
    print(this_run(*findings))
