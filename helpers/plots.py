"""Japanese-capable matplotlib set-up and the few chart types the notebooks use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from helpers.latency import Latency
    from helpers.timing import ResultsTable, Timing


def setup_japanese() -> str:
    """Make matplotlib render Japanese text (matplotlib-fontja); return the font family used."""
    import matplotlib_fontja
    from matplotlib import rcParams

    matplotlib_fontja.japanize()
    family = rcParams["font.family"]
    return family[0] if isinstance(family, list) else str(family)


def throughput_bar(table: ResultsTable, title: str | None = None, unit: str = "画像/秒") -> Figure:
    """Horizontal bar chart of throughput per variant, each bar labelled with its speed-up."""
    import matplotlib.pyplot as plt

    setup_japanese()
    rows = table.rows()
    names = [str(r["name"]) for r in rows]
    values = [float(r["items_per_s"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    bars = ax.barh(names, values, color="tab:blue")
    ranged = [(i, t) for i, t in enumerate(table.timings) if len(t.runs) >= 2 and min(t.runs) > 0]
    if ranged:  # the slowest and the fastest timed call, around the median's bar
        low = [values[i] - t.n_items / max(t.runs) for i, t in ranged]
        high = [t.n_items / min(t.runs) - values[i] for i, t in ranged]
        ax.errorbar(
            [values[i] for i, _ in ranged],
            [i for i, _ in ranged],
            xerr=[low, high],
            fmt="none",
            ecolor="black",
            capsize=3,
            label="最小〜最大",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} (棒は中央値)" if ranged else unit)
    ax.set_title(title or table.title or "スループット")
    for bar, row in zip(bars, rows, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['speedup']:.2f}×", va="center")
    ax.margins(x=0.15)
    fig.tight_layout()
    return fig


def sweep_line(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    ranges: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Figure:
    """Line chart of one or more series over a swept parameter (batch size, temperature, ...).

    Whole-number sweeps (thread counts, batch sizes) get a tick at each swept value and no other
    (base-2 spacing with ``logx``); every line has a legend entry. ``ranges`` (optional) maps a
    series' label to its (lowest, highest) values, drawn as min–max error bars around the line
    (:func:`timing_ranges` makes them from measured runs).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    setup_japanese()
    xs = list(x)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in series.items():
        ys = list(ys)
        if ranges and label in ranges:
            lows, highs = ranges[label]
            errors = [
                [y - lo for y, lo in zip(ys, lows, strict=True)],
                [hi - y for y, hi in zip(ys, highs, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{label} (縦線は最小〜最大)")
        else:
            ax.plot(xs, ys, marker="o", label=label)
    try:
        whole = bool(xs) and all(float(v).is_integer() for v in xs)
    except (TypeError, ValueError):  # categories: matplotlib places them itself
        whole = False
    if logx:
        ax.set_xscale("log", base=2 if whole else 10)
    if whole:
        ax.set_xticks(xs, [str(int(v)) for v in xs])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def timing_ranges(timings: Sequence[Timing]) -> tuple[list[float], list[float]]:
    """(lowest, highest) items/s of each timing's runs, for ``sweep_line(ranges=...)``; the median's
    items/s where a timing has fewer than two runs."""
    lows, highs = [], []
    for t in timings:
        ok = len(t.runs) >= 2 and min(t.runs) > 0
        lows.append(t.n_items / max(t.runs) if ok else t.items_per_s)
        highs.append(t.n_items / min(t.runs) if ok else t.items_per_s)
    return lows, highs


def image_grid(
    images: Sequence[Image.Image], captions: Sequence[str] | None = None, ncols: int = 4
) -> Figure:
    """Show PIL images in a grid, each with an optional caption under it."""
    import matplotlib.pyplot as plt

    setup_japanese()
    n = len(images)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            if captions is not None:
                ax.set_title(captions[i], fontsize=10)
    fig.tight_layout()
    return fig


def training_curves(
    histories: Mapping[str, Mapping[str, Sequence[float]]],
    panels: Mapping[str, str],
    chance: float | None = None,
    title: str = "",
) -> Figure:
    """One panel per metric (``panels``: key → axis label), one line per run, over epochs 1, 2, ….

    ``histories`` maps a run's name to its per-epoch metrics, e.g. ``{"DALI": {"loss": [...],
    "val_acc": [...]}}``. ``chance`` draws a dashed line on panels whose key ends in ``acc``.
    """
    import matplotlib.pyplot as plt

    setup_japanese()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels.items(), strict=True):
        for run, metrics in histories.items():
            values = list(metrics[key])
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=run)
        if chance is not None and key.endswith("acc"):
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="当てずっぽう")
        ax.set_xlabel("エポック")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def speedup_bar(
    measured: Mapping[str, float], quoted: Mapping[str, float] | None = None, title: str = "速さの比"
) -> Figure:
    """Speed-up ratios as bars: this run's (blue) beside figures quoted from elsewhere (grey, hatched)."""
    import matplotlib.pyplot as plt

    setup_japanese()
    rows = [(name, value, False) for name, value in measured.items()]
    rows += [(name, value, True) for name, value in (quoted or {}).items()]
    if not rows:
        raise ValueError("speedup_bar needs at least one ratio")
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    bars = ax.barh(
        [r[0] for r in rows],
        [r[1] for r in rows],
        color=["lightgrey" if r[2] else "tab:blue" for r in rows],
    )
    for bar, (_, value, is_quoted) in zip(bars, rows, strict=True):
        if is_quoted:
            bar.set_hatch("//")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.2f}×", va="center")
    ax.axvline(1.0, color="grey", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("倍 (1.0 = 基準と同じ速さ)")
    ax.set_title(title)
    ax.margins(x=0.25)  # room for the value written after the longest bar
    fig.tight_layout()
    return fig


def latency_histogram(latencies: Sequence[Latency], title: str = "", bins: int = 40) -> Figure:
    """Overlaid histograms of per-call latency (ms, log-scaled x axis) of :class:`helpers.latency.Latency`
    samples, p50 and p99 marked per variant."""
    import matplotlib.pyplot as plt

    setup_japanese()
    all_ms = np.concatenate([np.asarray(lat.samples) * 1e3 for lat in latencies])
    low, high = float(all_ms.min()), float(all_ms.max())
    edges = np.geomspace(low * 0.95, high * 1.05, bins + 1) if high > low > 0 else bins
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, lat in enumerate(latencies):
        color = f"C{i}"
        ax.hist(
            np.asarray(lat.samples) * 1e3, bins=edges, histtype="step", lw=1.8, color=color, label=lat.name
        )
        ax.axvline(lat.p50 * 1e3, color=color, ls="-", lw=0.8, alpha=0.7)
        ax.axvline(lat.percentile(99) * 1e3, color=color, ls="--", lw=0.8, alpha=0.7)
    if high > low > 0:
        ax.set_xscale("log")
    ax.set_xlabel("1 回の呼び出しの時間 (ms, 対数軸)   実線: p50, 破線: p99")
    ax.set_ylabel("回数")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
