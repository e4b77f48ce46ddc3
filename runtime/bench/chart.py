"""A benchmark run as a bar chart (matplotlib, imported only here: the `bench` extra)."""
from __future__ import annotations

import math
from typing import Sequence

from .report import dtype_name, rate_unit
from .timing import SetResult


def plot(results: Sequence[SetResult], path) -> None:
    """One bar chart per set: effective throughput per peer, labelled with ms and natgen's speed-up;
    a peer without a figure is an empty slot labelled with the reason."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'natgen[bench]' (or pip install matplotlib)") from None
    count = len(results)
    columns = min(count, 2)
    lines = math.ceil(count / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(7 * columns, 4 * lines), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, result in zip(axes.flat, results):
        unit, scale = rate_unit(result.device)
        natgen = result.by_peer("natgen")
        names, heights, labels = [], [], []
        for m in result.measurements:
            names.append(m.peer)
            if m.seconds is None:
                heights.append(0.0)
                labels.append(m.status[:40])
            else:
                heights.append(result.flops / m.seconds / scale)
                speed = (f"\nnatgen {m.seconds / natgen.seconds:.2f}x" if natgen and natgen.seconds and m.peer != "natgen"
                         else "")
                labels.append(f"{m.seconds * 1e3:.3g} ms{speed}")
        colours = ["tab:green" if n == "natgen" else "tab:grey" for n in names]
        bars = ax.bar(names, heights, color=colours)
        top = max(heights + [1e-9])
        for bar, label, height in zip(bars, labels, heights):
            ax.text(bar.get_x() + bar.get_width() / 2, height + top * 0.02, label, ha="center", va="bottom",
                    fontsize=7, rotation=0 if height else 90)
        ax.set_ylim(0, top * 1.35)
        mode = "fwd+bwd" if result.backward else "fwd"
        ax.set_title(f"{result.ps.name} ({dtype_name(result.dtype)}, {mode}, {result.device}, "
                     f"batch {result.ps.batch})", fontsize=9)
        ax.set_ylabel(f"effective {unit}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
