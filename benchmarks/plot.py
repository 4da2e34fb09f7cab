"""A PNG of one run's headline figures: a horizontal bar chart per figure, systems in table order.

The tables are the record; the picture is for a reader who wants the
comparison at a glance (docs/performance.md shows it). matplotlib is imported
only when a plot is written, with the Agg backend (no display needed), so the
harness runs without it: run.py asks :func:`unavailable` before measuring and
prints a note instead of failing after a long run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import report

#: tunnelkit's rows stand out; ``direct`` (no proxy, a reference) is pale.
TUNNELKIT_COLOUR = "#d95f02"
PEER_COLOUR = "#4c72b0"
DIRECT_COLOUR = "#b8c4d6"
#: A panel whose largest value is this many times its smallest gets a log scale
#: (socat's RSS per idle connection, a process each, is ~1,000x the others').
LOG_SPREAD = 100.0
#: 16 x 9 inches at 100 dpi: 1600 x 900 pixels.
SIZE_INCHES = (16.0, 9.0)
DPI = 100


def unavailable() -> str | None:
    """Why no plot can be written here, or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install -r benchmarks/requirements.txt)"
    return None


def colour(name: str) -> str:
    if name.startswith("tunnelkit"):
        return TUNNELKIT_COLOUR
    return DIRECT_COLOUR if name == "direct" else PEER_COLOUR


def label(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def panel(
    ax: Any, figure: report.Figure, summary: dict[str, dict[str, Any]], names: list[str]
) -> None:
    """One figure's bars (medians), min-max whiskers where there were several runs, value labels."""
    entries = [summary[n][figure.key] for n in names]
    medians = [e["median"] for e in entries]
    widths = [m or 0.0 for m in medians]
    low = [
        m - e["min"] if m is not None and e["n"] > 1 else 0.0
        for m, e in zip(medians, entries, strict=True)
    ]
    high = [
        e["max"] - m if m is not None and e["n"] > 1 else 0.0
        for m, e in zip(medians, entries, strict=True)
    ]
    rows = range(len(names))
    ax.barh(
        rows,
        widths,
        color=[colour(n) for n in names],
        # No whiskers at all after one repetition: a cap on every bar would say nothing.
        xerr=[low, high] if any(low) or any(high) else None,
        error_kw={"ecolor": "#555555", "elinewidth": 0.8, "capsize": 2},
    )
    ax.set_yticks(list(rows), names, fontsize=9)
    ax.invert_yaxis()  # the first system of the table on top
    reach = max((w + h for w, h in zip(widths, high, strict=True)), default=0.0) or 1.0
    positive = [w for w in widths if w > 0]
    # A log axis starts at half the smallest value (0 = linear axis).
    log_left = (
        min(positive) / 2
        if len(positive) > 1 and max(positive) / min(positive) > LOG_SPREAD
        else 0.0
    )
    if log_left:
        ax.set_xscale("log")
        ax.set_xlim(log_left, reach * 4)
    else:
        ax.set_xlim(0, reach * 1.28)
    for row, (m, w, h) in enumerate(zip(medians, widths, high, strict=True)):
        x = max(w + h, log_left) * 1.1 if log_left else w + h + reach * 0.015
        ax.text(x, row, label(m, figure.digits), va="center", fontsize=8)
    better = "higher" if figure.higher_is_better else "lower"
    scale = ", log scale" if log_left else ""
    ax.set_title(f"{figure.title}\n{figure.unit}, {better} is better{scale}", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:,.0f}" if x >= 100 else f"{x:g}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def legend(ax: Any, notes: Sequence[str]) -> None:
    """The last grid cell: what the colours and whiskers mean, and the run's notes."""
    from matplotlib.patches import Patch

    ax.axis("off")
    handles = [
        Patch(color=TUNNELKIT_COLOUR, label="tunnelkit"),
        Patch(color=PEER_COLOUR, label="other proxies"),
        Patch(color=DIRECT_COLOUR, label="direct (no proxy)"),
    ]
    ax.legend(handles=handles, loc="upper left", frameon=False, fontsize=10)
    text = [
        "bars: medians over the repetitions",
        "whiskers: min-max of the repetitions",
        "n/a: not measured (direct has no proxy",
        "process; a skipped or failed run)",
        *notes,
    ]
    ax.text(0.0, 0.62, "\n".join(text), va="top", fontsize=9, transform=ax.transAxes, wrap=True)


def write_plot(
    summary: dict[str, dict[str, Any]],
    names: list[str],
    path: Path,
    *,
    date: str,
    reps: int,
    seconds: float,
    notes: Sequence[str] = (),
) -> None:
    """Write ``path`` (PNG): one panel per :data:`report.FIGURES`, ``summary`` from report.summarize."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=SIZE_INCHES, dpi=DPI)
    cells = list(axes.flat)
    for ax, figure in zip(cells, report.FIGURES, strict=False):
        panel(ax, figure, summary, names)
    legend(cells[-1], notes)
    fig.suptitle(
        f"tunnelkit loopback benchmark, {date}: {reps} rep{'s' if reps != 1 else ''} x "
        f"{seconds:g} s (medians)",
        fontsize=13,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
