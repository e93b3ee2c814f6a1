"""The run's rows as a table and as a plot (the rows of a run just made, or of a saved JSON)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from .cases import MODES
from .ops import OPS
from .providers import PROVIDERS

_HEADER = (
    "op", "mode", "shape", "dtype", "provider",
    "median ms", "min ms", "native x", "peak MB", "x pred", "GB/s", "% copy",
    "H100 floor us", "H200 floor us", "% floor",
)  # fmt: skip
_RATIO_HEADER = "x fp32"
_LEGEND = (
    "min ms: the fastest round (far below the median: a busy machine). "
    "native x: the provider's median time / native's (how many times faster native is). "
    "peak MB: peak bytes allocated during the step beyond those before it (pred.grad "
    "included); x pred: that over pred's size. GB/s: the byte model (bytes_moved) over "
    "the time; % copy: that over a dst.copy_(src) moving as many bytes, timed in the same rounds. "
    "H100/H200 floor us: the byte model at the copy bandwidth each GPU reaches (3.0, 4.3 TB/s: "
    "gfl_ops/bench/roofline.py), the fastest the step could run there; % floor: that floor over "
    "the median, on an H100 or H200 only."
)
_RATIO_LEGEND = (
    " x fp32: the median over the float32 row of the same provider and shape in this run "
    "(the cases ran one after the other, not in the same rounds)."
)


def _format(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _microseconds(milliseconds):
    return None if milliseconds is None else 1e3 * milliseconds


def _cells(row: dict, ratio_column: bool) -> tuple:
    key = (row["op"], row["mode"], row["shape_label"], row["dtype"], row["provider"])
    if row.get("error"):  # the message spans the figures' columns
        return key + ("error: " + row["error"],)
    peak = row["peak_extra_bytes"]
    fraction = row["bandwidth_fraction"]
    cells = key + (
        _format(row["median_ms"], ".3f"),
        _format(row["min_ms"], ".3f"),
        _format(row["native_speedup"], ".2f"),
        _format(None if peak is None else peak / 2**20, ".1f"),
        _format(row["peak_extra_over_pred"], ".2f"),
        _format(row["achieved_gbps"], ".2f"),
        _format(None if fraction is None else 100 * fraction, ".1f"),
        _format(_microseconds(row.get("floor_ms_h100")), ".1f"),
        _format(_microseconds(row.get("floor_ms_h200")), ".1f"),
        _format(None if row.get("floor_fraction") is None else 100 * row["floor_fraction"], ".1f"),
    )
    return cells + (_format(row.get("fp32_ratio"), ".2f"),) if ratio_column else cells


def _renderer(header: tuple, lines: Sequence[tuple]) -> Tuple[Callable[[tuple], str], tuple]:
    """render(cells): names left-aligned, figures right-aligned, in columns wide enough;
    and the rule under the header."""
    widths = [len(name) for name in header]
    for cells in lines:
        # An error row's last cell is its message, which spans the figures' columns.
        for index, cell in enumerate(cells if len(cells) == len(header) else cells[:-1]):
            widths[index] = max(widths[index], len(cell))
    numeric = set(range(_HEADER.index("median ms"), len(header)))

    def render(cells: tuple) -> str:
        if len(cells) < len(header):  # an error row: the message spans the figures
            return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])) + "  " + cells[-1]
        return "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(cells)
        )

    return render, tuple("-" * width for width in widths)


def format_table(rows: List[dict]) -> str:
    """One line per row, a blank line between measurements; the x fp32 column where a row
    of another dtype has a float32 counterpart."""
    ratio_column = any(row.get("fp32_ratio") is not None and row["dtype"] != "fp32" for row in rows)
    header = _HEADER + ((_RATIO_HEADER,) if ratio_column else ())
    lines = [_cells(row, ratio_column) for row in rows]
    render, rule = _renderer(header, lines)
    out = [render(header), render(rule)]
    previous = None
    for row, cells in zip(rows, lines):
        key = (row["op"], row["mode"], row["shape_label"], row["dtype"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(render(cells))
    out.append("")
    out += textwrap.wrap(_LEGEND + (_RATIO_LEGEND if ratio_column else ""), width=100)
    return "\n".join(out)


def format_not_run(not_run: Dict[str, str]) -> List[str]:
    """'not run: <provider>: <why>' for each provider that a run wanted and could not run."""
    return [f"not run: {name}: {reason}" for name, reason in not_run.items()]


def _draw_panel(axis, rows: List[dict], others: List[str], title: str) -> None:
    """Bars of native's speedup over each of `others`, per shape and dtype, on a log scale."""
    import matplotlib.ticker

    def label(row):
        return f"{row['shape_label']} {row['dtype']}"

    labels = list(dict.fromkeys(map(label, rows)))
    width = 0.8 / max(len(others), 1)
    for index, provider in enumerate(others):
        speedups = {label(row): row["native_speedup"] for row in rows if row["provider"] == provider}
        positions = [i + (index - (len(others) - 1) / 2) * width for i in range(len(labels))]
        values = [speedups.get(name, 1.0) for name in labels]
        # Bars grow from 1x (no speedup), up or down.
        bars = axis.bar(positions, [v - 1.0 for v in values], width, bottom=1.0, label=f"vs {provider}")
        texts = [f"{speedups[name]:.1f}" if name in speedups else "" for name in labels]
        axis.bar_label(bars, labels=texts, fontsize=7)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("native speedup (x)")
    axis.set_title(title)
    axis.legend(fontsize=8)


def write_plot(rows: List[dict], path: Path) -> str:
    """A PNG of native's speedup over each other provider, per shape; one panel per op and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no plot written: matplotlib is not installed (pip install matplotlib), {path} skipped"
    measured = [row for row in rows if not row.get("error") and row.get("native_speedup") is not None]
    panels = sorted(
        {(row["op"], row["mode"]) for row in measured}, key=lambda key: (OPS.index(key[0]), MODES.index(key[1]))
    )
    if not panels:
        return f"no plot written: no provider was measured against native, {path} skipped"
    others = [name for name in PROVIDERS if name != "native" and any(row["provider"] == name for row in measured)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for axis, (op, mode) in zip(axes[:, 0], panels):
        panel_rows = [row for row in measured if (row["op"], row["mode"]) == (op, mode)]
        _draw_panel(axis, panel_rows, others, f"{op} {mode}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot written to {path}"
