"""Run outputs every method writes the same way (metrics.csv, samples.png/.npz, results.json), so one
report can read them all."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from collafuse_flwr.imports import load


def _clean(v: Any) -> Any:
    """NaN -> null, +-inf -> "inf"/"-inf" (epsilon = inf means no privacy), so the file stays standard JSON."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else "inf" if v > 0 else "-inf"
    return v


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2))
    tmp.replace(path)


class MetricsCsv:
    """Appends one row per round; new columns extend the header by rewriting the file."""

    def __init__(self, path: Path, keep_rounds_upto: int = 0) -> None:
        """keep_rounds_upto: a resumed run keeps the rows of the rounds its checkpoint covers."""
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if keep_rounds_upto and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["round"]) <= keep_rounds_upto]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        cols = list(dict.fromkeys(k for r in self.rows for k in r))  # first seen first
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows({k: _clean(r.get(k)) for k in cols} for r in self.rows)  # csv writes None as ""


def save_samples(out_dir: Path, images: dict[int, np.ndarray]) -> None:
    """samples.npz (all images) and samples.png (one row per client, at most 16 images)."""
    if not images:
        return
    clients = sorted(images)
    stacked = np.concatenate([images[c] for c in clients])  # N x C x H x W
    labels = np.concatenate([np.full(images[c].shape[0], c, dtype=np.int64) for c in clients])
    np.savez_compressed(out_dir / "samples.npz", images=stacked.transpose(0, 2, 3, 1).astype(np.uint8),
                        client=labels)
    save_grid(out_dir / "samples.png", [images[c][:16] for c in clients], [f"client {c}" for c in clients])


def save_grid(path: Path, rows: list[np.ndarray], row_labels: list[str], title: str | None = None) -> None:
    """A readable image grid: one labelled row per list entry (uint8 N x C x H x W each)."""
    load("matplotlib").use("Agg")
    plt = load("matplotlib.pyplot")

    ncols = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(0.6 * ncols + 1.2, 0.7 * len(rows) + 0.5),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set(xticks=[], yticks=[])
            ax.spines[:].set_visible(False)
            if j < r.shape[0]:
                img = r[j].transpose(1, 2, 0)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255,
                          interpolation="nearest")
        axes[i][0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(rows: list[tuple[str, Any]]) -> str:
    """A two-column plain-text table for the end-of-run summary."""
    def fmt(v: Any) -> str:
        if not isinstance(v, float) or not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"

    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {fmt(v)}" for k, v in rows]
    bar = "-" * max(len(line) for line in lines)
    return "\n".join([bar, *lines, bar])
