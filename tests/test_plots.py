"""helpers.plots: Japanese text renders with a Japanese font (no tofu), charts build."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib import font_manager
from PIL import Image

from helpers import plots
from helpers.timing import ResultsTable, Timing


def test_japanese_font_has_no_missing_glyphs(tmp_path) -> None:
    family = plots.setup_japanese()
    path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    assert "ipa" in path.lower() or "noto" in path.lower() or "fontja" in path.lower()
    fig, ax = plt.subplots()
    ax.set_title("猫と犬の確率")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font" would be a warning
        fig.savefig(tmp_path / "ja.png")
    plt.close(fig)


def test_throughput_bar(tmp_path) -> None:
    table = ResultsTable(title="テスト")
    table.add(Timing("1 枚ずつ", 2.0, 10))
    table.add(Timing("バッチ", 0.5, 10))
    fig = plots.throughput_bar(table)
    fig.savefig(tmp_path / "bar.png")
    assert len(fig.axes[0].patches) == 2
    assert fig.axes[0].get_legend() is None  # no runs: no range to draw
    plt.close(fig)
    table.add(Timing("交互", 1.0, 10, runs=(0.8, 1.0, 1.25)))
    fig = plots.throughput_bar(table)
    (errorbar,) = fig.axes[0].containers[1:]
    low, high = errorbar.lines[2][0].get_segments()[0][:, 0]  # the one bar with runs
    assert (low, high) == pytest.approx((8.0, 12.5))
    plt.close(fig)


def test_sweep_line() -> None:
    fig = plots.sweep_line(
        [1, 2, 4], {"画像/秒": [1, 2, 3], "メモリ": [3, 2, 1]}, "バッチサイズ", "値", logx=True
    )
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    assert list(ax.get_xticks()) == [1, 2, 4]  # a tick at each swept value, base-2 spacing
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["画像/秒", "メモリ"]
    plt.close(fig)
    timings = [Timing("b", 1.0, 4, runs=(0.8, 1.0, 2.0)), Timing("b", 1.0, 4)]
    ranged = plots.sweep_line(
        [1, 2], {"画像/秒": [4, 4]}, "x", "y", ranges={"画像/秒": plots.timing_ranges(timings)}
    )
    assert plots.timing_ranges(timings) == ([2.0, 4.0], [5.0, 4.0])
    assert [t.get_text() for t in ranged.axes[0].get_legend().get_texts()] == ["画像/秒 (縦線は最小〜最大)"]
    plt.close(ranged)
    single = plots.sweep_line([0.5, 1.5], {"温度": [1, 2]}, "x", "y")
    assert single.axes[0].get_legend() is not None  # one line still has its legend entry
    plt.close(single)


def test_image_grid_captions() -> None:
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    fig = plots.image_grid(images, ["赤", "青", "緑"], ncols=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["赤", "青", "緑"]
    plt.close(fig)


def test_training_curves_one_line_per_run_and_a_chance_line(tmp_path) -> None:
    histories = {
        "DALI": {"loss": [1.3, 0.9, 0.6], "val_acc": [0.3, 0.6, 0.8]},
        "PIL": {"loss": [1.3, 1.0], "val_acc": [0.3, 0.5]},
    }
    fig = plots.training_curves(histories, {"loss": "損失", "val_acc": "検証の正解率"}, chance=0.25)
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.lines) == 2  # no chance line on a loss panel
    assert len(acc_ax.lines) == 3
    assert list(acc_ax.lines[0].get_xdata()) == [1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(tmp_path / "curves.png")
    plt.close(fig)


def test_speedup_bar_marks_quoted_figures(tmp_path) -> None:
    fig = plots.speedup_bar({"DALI CPU / DataLoader": 1.3}, {"元記事": 1.6})
    measured, quoted = fig.axes[0].patches
    assert measured.get_width() == 1.3 and quoted.get_width() == 1.6
    assert quoted.get_hatch() == "//" and not measured.get_hatch()
    fig.savefig(tmp_path / "ratios.png")
    plt.close(fig)
