"""The PNG `dejavu bench --json OUT` writes beside its report: ms/token against MLP density, per batch
size, with dense as a line and the speed the sparse step's bytes allow as a second marker (how far
the measured point is from its byte bound)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def plot_path(json_out: Path) -> Path:
    return Path(json_out).with_suffix(".png")


def write_speed_plot(report: dict[str, Any], path: Path) -> Path | None:
    """Write the plot to `path` (atomically); None when there is nothing to plot (no speed measured)
    or matplotlib, an optional extra (`pip install dejavu[plot]`), is missing."""
    speed = report.get("speed") or {}
    batches = speed.get("batches") or {}
    if not batches:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    density = report.get("mlp_density") or 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (batch, row) in enumerate(sorted(batches.items(), key=lambda item: int(item[0]))):
        dense, sparse = row.get("dense_ms_per_token"), row.get("sparse_ms_per_token")
        if dense is None:
            continue
        color = f"C{i}"
        ax.axhline(dense, linestyle=":", color=color, label=f"dense, batch {batch}")
        if sparse is not None:
            ax.plot([density], [sparse], marker="o", linestyle="none", color=color,
                    label=f"sparse, batch {batch} ({row.get('speedup', 0):.2f}x)")
        if row.get("bound_speedup"):
            ax.plot([density], [dense / row["bound_speedup"]], marker="_", markersize=18, linestyle="none",
                    color=color, label=f"byte bound, batch {batch}")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("MLP density (share of neurons computed; with thresholds, of down's input kept)")
    ax.set_ylabel("ms / token")
    weights = "synthetic weights, speed only" if report.get("synthetic") else "real weights"
    ax.set_title(f"{report.get('model')} ({weights}), {speed.get('dtype')}, {speed.get('device_name')}, "
                 f"heads {report.get('head_density')}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent.resolve(), prefix=f".{path.name}.", suffix=".png")
    from dejavu.artifacts import FILE_MODE

    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
