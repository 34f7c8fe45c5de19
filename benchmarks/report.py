"""Turn a sweep folder into results.csv, report.md and plots.

    python -m benchmarks.report benchmarks/results/sweep-cpu

Reads OUT/runs/*/results.json (the app's own record of each run; see collafuse_flwr/harness/report.py)
and OUT/runs/*/sweep.json (the sweep's record: wall time of the whole `flwr run` call, errors),
plus OUT/sweep.json for the command, settings and the machine the sweep ran on. Writes:

- results.csv: one row per run (failed runs too, with their status), unaggregated;
- report.md: the settings, the machine, the command, a table of mean ± std over seeds per
  method / cut ratio, and the plots;
- fid_vs_c.png, disclosure_vs_c.png, client_flops_vs_c.png, communication.png,
  samples_by_method.png.

Why a separate step: the report can be rebuilt from recorded runs at any time (after adding
seeds, or after a partial sweep) without running anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import BenchmarkError, machine_info

METHOD_LABEL = {"collafuse": "CollaFuse", "fedavg": "FedAvg", "local": "Local-only", "centralized": "Centralized"}
METHOD_ORDER = {"collafuse": 0, "fedavg": 1, "local": 2, "centralized": 3}
BASELINE_STYLE = {"fedavg": "tab:orange", "local": "tab:green", "centralized": "tab:red"}

#: results.csv columns: (column, where in results.json / sweep.json it comes from)
COLUMNS: list[tuple[str, Callable[[dict, dict], Any]]] = [
    ("run", lambda r, s: s.get("_name")),
    ("status", lambda r, s: r.get("status") or s.get("status")),
    ("method", lambda r, s: r.get("method") or s.get("method")),
    ("c", lambda r, s: r.get("cut_ratio") if "cut_ratio" in r else s.get("cut_ratio")),
    ("cut_step", lambda r, s: r.get("cut_step")),
    ("seed", lambda r, s: r.get("seed", s.get("seed"))),
    ("dataset", lambda r, s: r.get("dataset")),
    ("num_clients", lambda r, s: r.get("num_clients", s.get("num_clients"))),
    ("num_rounds", lambda r, s: r.get("num_rounds")),
    ("diffusion_steps", lambda r, s: r.get("diffusion_steps")),
    ("fid", lambda r, s: _f(r, "fid")),
    ("kid", lambda r, s: _f(r, "kid")),
    ("fid_pooled", lambda r, s: _f(r, "fid_pooled")),
    ("fid_backbone", lambda r, s: r.get("final", {}).get("fid_backbone")),
    ("client_train_flops", lambda r, s: _f(r, "client_train_flops")),
    ("client_train_flops_per_round", lambda r, s: _f(r, "client_train_flops_per_round")),
    ("client_train_flops_per_client_round", lambda r, s: _f(r, "client_train_flops_per_client_round")),
    ("client_infer_flops_per_image", lambda r, s: _f(r, "client_infer_flops_per_image")),
    ("server_train_flops", lambda r, s: _f(r, "server_train_flops")),
    ("server_infer_flops_per_image", lambda r, s: _f(r, "server_infer_flops_per_image")),
    ("bytes_up_per_round", lambda r, s: _f(r, "bytes_up_per_round")),
    ("bytes_down_per_round", lambda r, s: _f(r, "bytes_down_per_round")),
    ("bytes_up", lambda r, s: _f(r, "bytes_up")),
    ("bytes_down", lambda r, s: _f(r, "bytes_down")),
    ("reid_server", lambda r, s: _d(r, "reid_server")),
    ("reid_scaled", lambda r, s: _d(r, "reid_scaled")),
    ("reid_reference", lambda r, s: _d(r, "reid_reference")),
    ("psnr_server", lambda r, s: _d(r, "psnr_server")),
    ("ssim_server", lambda r, s: _d(r, "ssim_server")),
    ("psnr_reference", lambda r, s: _d(r, "psnr_reference")),
    ("ssim_reference", lambda r, s: _d(r, "ssim_reference")),
    ("upload_fid", lambda r, s: _d(r, "upload_fid")),
    ("inference_fid", lambda r, s: _d(r, "inference_fid")),
    ("epsilon", lambda r, s: _d(r, "epsilon")),
    ("wall_seconds", lambda r, s: _num(r.get("wall_seconds"))),
    ("call_seconds", lambda r, s: _num(s.get("call_seconds"))),
    ("count_flops", lambda r, s: r.get("config", {}).get("count-flops")),
    ("error", lambda r, s: (r.get("error") or s.get("error")) if (r.get("status") or s.get("status")) != "ok" else None),
]

#: report.md's table: (column, header, formatter kind)
TABLE: list[tuple[str, str, str]] = [
    ("fid", "FID ↓", "num"),
    ("kid", "KID ↓", "num"),
    ("fid_pooled", "FID pooled ↓", "num"),
    ("client_train_flops_per_round", "client train FLOPs / round", "flops"),
    ("client_infer_flops_per_image", "client infer FLOPs / image", "flops"),
    ("server_train_flops", "server train FLOPs (total)", "flops"),
    ("bytes_up_per_round", "bytes up / round", "bytes"),
    ("bytes_down_per_round", "bytes down / round", "bytes"),
    ("reid_server", "re-id rate (server model)", "num"),
    ("reid_reference", "re-id rate (reference attacker)", "num"),
    ("psnr_server", "PSNR (dB)", "num"),
    ("ssim_server", "SSIM", "num"),
    ("upload_fid", "upload FID", "num"),
    ("epsilon", "ε (δ=1e-5)", "num"),
    ("wall_seconds", "wall s (ServerApp)", "num"),
    ("call_seconds", "wall s (flwr run)", "num"),
]


# -- reading ---------------------------------------------------------------------------------------------------
def _num(v: Any) -> float:
    """results.json stores inf as "inf" and NaN as null; back to floats."""
    if v is None:
        return math.nan
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _f(r: dict, key: str) -> float:
    return _num(r.get("final", {}).get(key))


def _d(r: dict, key: str) -> float:
    return _num(r.get("final", {}).get("disclosure", {}).get(key))


def load_runs(out: Path) -> list[dict[str, Any]]:
    """One row per run folder under OUT/runs (folders with neither record are ignored)."""
    runs_dir = Path(out) / "runs"
    if not runs_dir.is_dir():
        raise BenchmarkError(f"{runs_dir} does not exist: point the report at a sweep's output folder "
                             f"(the one that holds runs/)")
    rows = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        res = _read_json(d / "results.json")
        sw = _read_json(d / "sweep.json")
        if not res and not sw:
            continue
        sw["_name"] = d.name
        row = {col: get(res, sw) for col, get in COLUMNS}
        row["_dir"] = d
        rows.append(row)
    rows.sort(key=_order)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _order(row: dict[str, Any]) -> tuple:
    c = row.get("c")
    return (METHOD_ORDER.get(row.get("method"), 9), _num(c) if c is not None else 0.0,
            row.get("seed") if row.get("seed") is not None else 0, row.get("run") or "")


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    def cell(v: Any) -> Any:
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return f"{v:.6g}"
        return "" if v is None else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in COLUMNS])
        for r in rows:
            w.writerow([cell(r.get(c)) for c, _ in COLUMNS])


# -- aggregation -----------------------------------------------------------------------------------------------
def group_key(row: dict[str, Any]) -> tuple[str, float | None]:
    c = row.get("c")
    return row["method"], (None if c is None else round(_num(c), 6))


def label(key: tuple[str, float | None]) -> str:
    method, c = key
    name = METHOD_LABEL.get(method, method)
    return f"{name} c={c:g}" if c is not None else name


def stats(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std, n) over the finite values; inf when every value is +inf (epsilon of raw data)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    if all(math.isinf(v) for v in vals):
        return vals[0], math.nan, len(vals)
    finite = [v for v in vals if math.isfinite(v)]
    if len(finite) < len(vals):  # a mix of inf and finite: the mean is inf
        return math.inf, math.nan, len(vals)
    arr = np.array(finite)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan, int(arr.size)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean/std/n per (method, c) over the runs with status ok, in report order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault(group_key(r), []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: (METHOD_ORDER.get(k[0], 9), k[1] if k[1] is not None else 0.0)):
        g = groups[key]
        agg: dict[str, Any] = {"key": key, "label": label(key), "method": key[0], "c": key[1],
                               "n": len(g), "seeds": sorted(r["seed"] for r in g), "rows": g, "stats": {}}
        for col, _ in COLUMNS:
            if col not in ("c", "seed") and all(isinstance(r.get(col), (int, float))
                                                and not isinstance(r.get(col), bool) for r in g):
                agg["stats"][col] = stats([r[col] for r in g])
        out.append(agg)
    return out


def _si(v: float, unit: str) -> str:
    if not math.isfinite(v):
        return "inf" if v == math.inf else "–"
    if v == 0:
        return f"0 {unit}"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def fmt_stat(s: tuple[float, float, int] | None, kind: str = "num") -> str:
    if s is None or s[2] == 0:
        return "–"
    mean, std, _ = s
    one = {"num": lambda v: ("inf" if v == math.inf else f"{v:.3g}"),
           "flops": lambda v: _si(v, "FLOP"), "bytes": lambda v: _si(v, "B")}[kind]
    if math.isnan(std) or not math.isfinite(mean) or std == 0:  # one seed, or seeds that agree exactly
        return one(mean)
    return f"{one(mean)} ± {one(std)}"


# -- plots -----------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _eng(unit: str):
    """Axis ticks as 1.5 GFLOP / 20 kB instead of a bare 1e8 offset."""
    from matplotlib.ticker import EngFormatter

    return EngFormatter(unit=unit, places=None, sep=" ")


def _series(groups: list[dict], col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x = c, y = mean, err = std (0 where one seed) for CollaFuse groups with a finite mean."""
    pts = [(g["c"], *g["stats"][col][:2]) for g in groups
           if g["method"] == "collafuse" and col in g["stats"] and math.isfinite(g["stats"][col][0])]
    if not pts:
        return np.array([]), np.array([]), np.array([])
    x, y, e = (np.array(v, dtype=float) for v in zip(*pts))
    return x, y, np.nan_to_num(e)


def _baselines(ax, groups: list[dict], col: str, fmt: Callable[[float], str] = lambda v: f"{v:.3g}") -> None:
    for g in groups:
        if g["method"] in BASELINE_STYLE and col in g["stats"] and math.isfinite(g["stats"][col][0]):
            mean, std, n = g["stats"][col]
            color = BASELINE_STYLE[g["method"]]
            ax.axhline(mean, ls="--", color=color, lw=1.5, label=f"{g['label']} ({fmt(mean)})")
            if n > 1 and math.isfinite(std):
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)


def _subtitle(meta: dict) -> str:
    parts = []
    if meta.get("dataset"):
        parts.append(str(meta["dataset"]))
    if meta.get("num_clients"):
        parts.append(f"{meta['num_clients']} clients")
    if meta.get("num_rounds"):
        parts.append(f"{meta['num_rounds']} rounds")
    if meta.get("diffusion_steps"):
        parts.append(f"T={meta['diffusion_steps']}")
    if meta.get("seeds"):
        parts.append(f"{len(meta['seeds'])} seed(s)")
    return ", ".join(parts)


C_LABEL = "cut ratio c = t_c / T (share of the denoising steps run on the client)"


def plot_fid(groups: list[dict], path: Path, meta: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    x, y, e = _series(groups, "fid")
    if x.size:
        ax.errorbar(x, y, yerr=e, marker="o", capsize=4, lw=2, color="tab:blue", label="CollaFuse (mean ± std over seeds)")
    _baselines(ax, groups, "fid")
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel(C_LABEL)
    ax.set_ylabel(f"FID vs client's test images, {meta.get('fid_backbone') or '?'} features\n(mean over clients; lower is better)")
    ax.set_title(f"Sample quality vs cut ratio ({_subtitle(meta)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_disclosure(groups: list[dict], path: Path, meta: dict) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for col, name, color in (("reid_server", "server's own model", "tab:blue"),
                             ("reid_reference", "reference attacker (full-chain model on public data)", "tab:brown"),
                             ("reid_scaled", "model-free x_tc / sqrt(abar_c)", "tab:purple")):
        x, y, e = _series(groups, col)
        if x.size:
            ax1.errorbar(x, y, yerr=e, marker="o", capsize=4, color=color, label=f"CollaFuse, {name}")
    _baselines(ax1, groups, "reid_server")
    ax1.set_ylim(-0.05, 1.1)
    ax1.set_xlim(-0.05, 1.05)
    ax1.set_xlabel(C_LABEL)
    ax1.set_ylabel("re-identification rate\n(fraction of uploads matched to their source image)")
    ax1.set_title("Re-identification of clients' training images")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    for col, name, color in (("upload_fid", "uploads x_tc (training)", "tab:blue"),
                             ("inference_fid", "server's x_tc sent at inference", "tab:cyan")):
        x, y, e = _series(groups, col)
        if x.size:
            ax2.errorbar(x, y, yerr=e, marker="s", capsize=4, color=color, label=name)
    ax2.set_xlim(-0.05, 1.05)
    ax2.set_xlabel(C_LABEL)
    ax2.set_ylabel(f"FID vs client's training images, {meta.get('fid_backbone') or '?'} features\n"
                   "(higher = what the server sees looks less like the data)")
    ax2.set_title("How much the server's view resembles the data")
    ax2.grid(alpha=0.3)
    if ax2.has_data():
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no CollaFuse uploads measured", ha="center", va="center", transform=ax2.transAxes)
    fig.suptitle(f"Disclosure vs cut ratio ({_subtitle(meta)}); c = 1 uploads nothing", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_client_flops(groups: list[dict], path: Path, meta: dict) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = ((ax1, "client_train_flops_per_client_round", "client training FLOPs per client per round",
               "Client training compute"),
              (ax2, "client_infer_flops_per_image", "client inference FLOPs per generated image",
               "Client inference compute"))
    for ax, col, ylabel, title in panels:
        x, y, e = _series(groups, col)
        measured = x.size and np.any(y > 0)
        if x.size:
            ax.errorbar(x, y, yerr=e, marker="o", capsize=4, lw=2, color="tab:blue", label="CollaFuse")
        _baselines(ax, [g for g in groups if g["method"] in ("fedavg", "local")], col, lambda v: _si(v, "FLOP"))
        if not measured and not any(g["method"] in ("fedavg", "local") and g["stats"].get(col, (0,))[0] > 0 for g in groups):
            ax.text(0.5, 0.5, "FLOPs not measured (count-flops=false)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(_eng("FLOP"))
        ax.set_xlabel(C_LABEL)
        ax.set_ylabel(f"{ylabel} (FLOPs)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"Client compute vs cut ratio ({_subtitle(meta)}); measured with torch's FLOP counter",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_communication(groups: list[dict], path: Path, meta: dict) -> None:
    plt = _plt()
    labels = [g["label"] for g in groups]
    up = [g["stats"].get("bytes_up_per_round", (math.nan,))[0] for g in groups]
    down = [g["stats"].get("bytes_down_per_round", (math.nan,))[0] for g in groups]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(groups) + 2), 4.8))
    w = 0.38
    for off, vals, name, color in ((-w / 2, up, "up (clients → server)", "tab:blue"),
                                   (w / 2, down, "down (server → clients)", "tab:orange")):
        shown = [v if math.isfinite(v) and v > 0 else np.nan for v in vals]
        ax.bar(x + off, shown, width=w, label=name, color=color)
        for xi, v in zip(x + off, vals):
            ax.annotate(_si(v, "B") if math.isfinite(v) else "–", (xi, v if math.isfinite(v) and v > 0 else 1),
                        ha="center", va="bottom", fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    finite = [v for v in up + down if math.isfinite(v) and v > 0]
    if finite:  # headroom for the value labels above the bars
        ax.set_ylim(min(finite) / 3, max(finite) * 30)
    ax.yaxis.set_major_formatter(_eng("B"))
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bytes per round, all clients together (log scale)")
    ax.set_title(f"Communication per round ({_subtitle(meta)})")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_samples(groups: list[dict], path: Path, per_client: int = 2, max_images: int = 12) -> bool:
    """One row per method / c from the lowest seed's samples.npz; False when no run has samples."""
    from collafuse_flwr.harness.outputs import save_grid

    rows, labels = [], []
    for g in groups:
        run = min(g["rows"], key=lambda r: r["seed"])
        npz = run["_dir"] / "samples.npz"
        if not npz.is_file():
            continue
        with np.load(npz) as s:
            images, client = s["images"], s["client"]
        picked = [i for c in np.unique(client) for i in np.flatnonzero(client == c)[:per_client]][:max_images]
        rows.append(images[picked].transpose(0, 3, 1, 2))  # N x H x W x C -> N x C x H x W
        labels.append(f"{g['label']} (s{run['seed']})")
    if not rows:
        return False
    save_grid(path, rows, labels, title=f"Samples, {per_client}/client")
    return True


# -- report.md ---------------------------------------------------------------------------------------------------
PLOTS = {
    "fid_vs_c.png": "Sample quality (FID, lower is better) vs cut ratio; baselines as dashed lines.",
    "disclosure_vs_c.png": "Disclosure: re-identification rate and upload FID vs cut ratio.",
    "client_flops_vs_c.png": "Client compute: training FLOPs and inference FLOPs per image vs cut ratio.",
    "communication.png": "Bytes per round up and down, per method (log scale).",
    "samples_by_method.png": "Samples: one row per method / cut ratio.",
}

SETTING_KEYS = ("dataset", "partitioning", "image-size", "model-size", "diffusion-steps", "beta-schedule",
                "num-server-rounds", "local-steps", "server-steps", "batch-size", "learning-rate",
                "uploads-per-round", "num-eval-samples", "sampling-steps", "conditioning", "server-target",
                "fid-backbone", "count-flops", "test-fraction")


def _settings(rows: list[dict], sweep: dict) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = []
    if ok:
        cfg = _read_json(ok[0]["_dir"] / "results.json").get("config", {})
        same = {k: cfg.get(k) for k in SETTING_KEYS if k in cfg}
        lines.append("| setting | value |\n| --- | --- |")
        lines += [f"| {k} | `{v}` |" for k, v in same.items()]
        lines.append(f"| clients | {ok[0].get('num_clients')} |")
        lines.append(f"| seeds | {sorted({r['seed'] for r in ok})} |")
        lines.append(f"| FID backbone | {ok[0].get('fid_backbone')} |")
    if sweep:
        lines.append("")
        lines.append(f"Preset `{sweep.get('preset')}`: {sweep.get('preset_about', '')}. Overrides sent to every run: "
                     f"`{json.dumps(sweep.get('run_config', {}))}`.")
    return lines


def _machine(sweep: dict) -> list[str]:
    info = sweep.get("machine")
    where = "the machine the sweep ran on"
    if not info:
        info, where = machine_info(), "the machine this report was written on (the sweep recorded none)"
    keys = ("platform", "processor", "cpu_count", "cpus_usable", "memory_gb", "python", "torch", "flwr", "ray",
            "diffusers", "cuda", "torch_threads")
    return [f"Measured on {where}:", "", "| | |", "| --- | --- |"] + [f"| {k} | {info[k]} |" for k in keys if k in info]


def write_markdown(path: Path, rows: list[dict], groups: list[dict], sweep: dict, plots: list[str]) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    lines = ["# CollaFuse sweep report", "",
             f"{len(ok)} run(s) ok, {len(failed)} failed; written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    lines += ["## Command", "", "```", sweep.get("command") or "(not recorded: the folder has no sweep.json)", "```",
              f"Report: `python -m benchmarks.report {path.parent}`", ""]
    lines += ["## Settings", "", *_settings(rows, sweep), ""]
    lines += ["## Results (mean ± std over seeds)", "",
              "FID/KID: per-client FID of each client's generated images against its own held-out test images, "
              "averaged over clients; *pooled*: all generated vs all test images. FLOPs are measured on the real "
              "passes (0 where count-flops=false). Re-id rate: share of a client's last uploads whose reconstruction "
              "(by the server's own model, or by the reference attacker: a full-chain denoiser trained on "
              "held-out data of the same kind) is nearest (L2) to its true source image; PSNR/SSIM: of the "
              "server model's reconstruction; upload FID: uploads vs training images; "
              "ε: (ε, δ=1e-5) of the upload Gaussian mechanism per training image (inf = raw data). "
              "c = 0 uploads raw images; c = 1 is CollaFuse without a server share.", ""]
    header = ["method", "n"] + [h for _, h, _ in TABLE]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for g in groups:
        cells = [g["label"], str(g["n"])] + [fmt_stat(g["stats"].get(col), kind) for col, _, kind in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['run']}`: {r.get('error') or 'no results'} "
                                            f"(log: `runs/{r['run']}/flwr.log`)" for r in failed] + [""]
    lines += ["## Plots", ""]
    for p in plots:
        lines += [f"**{PLOTS[p]}**", "", f"![{p}]({p})", ""]
    lines += ["## Machine", "", *_machine(sweep), ""]
    lines += ["Per-run numbers: `results.csv` (one row per run); each run's files: `runs/<tag>-s<seed>/`."]
    path.write_text("\n".join(lines) + "\n")


def write_report(out: Path) -> dict[str, Path]:
    """Write results.csv, the plots and report.md into `out`; returns their paths by name."""
    out = Path(out)
    rows = load_runs(out)
    if not rows:
        raise BenchmarkError(f"no runs under {out / 'runs'}: run `python -m benchmarks.sweep --out {out}` first")
    sweep = _read_json(out / "sweep.json")
    paths = {"csv": out / "results.csv", "report": out / "report.md"}
    write_csv(rows, paths["csv"])
    groups = aggregate(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    meta: dict[str, Any] = {}
    if ok:
        meta = {k: ok[0].get(k) for k in ("dataset", "num_clients", "num_rounds", "diffusion_steps", "fid_backbone")}
        meta["seeds"] = sorted({r["seed"] for r in ok})
    plots: list[str] = []
    if groups:
        for name, fn in (("fid_vs_c.png", plot_fid), ("disclosure_vs_c.png", plot_disclosure),
                         ("client_flops_vs_c.png", plot_client_flops), ("communication.png", plot_communication)):
            fn(groups, out / name, meta)
            plots.append(name)
        if plot_samples(groups, out / "samples_by_method.png"):
            plots.append("samples_by_method.png")
    for p in plots:
        paths[p.removesuffix(".png")] = out / p
    write_markdown(paths["report"], rows, groups, sweep, plots)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the sweep's output folder (holds runs/)")
    a = p.parse_args(argv)
    try:
        paths = write_report(a.out)
    except BenchmarkError as exc:
        print(f"error: {exc}")
        return 2
    for name, path in paths.items():
        print(f"{name:22s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
