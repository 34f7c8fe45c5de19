"""Turn a sweep folder into results.csv, report.md and plots, without running anything (after
adding seeds, or after a partial sweep): `python -m benchmarks.report benchmarks/results/comparison`.

Reads OUT/runs/*/results.json (the app's record, written by collafuse_flwr/harness/report.py),
OUT/runs/*/sweep.json (the whole call's time, errors) and OUT/sweep.json (command, run set, machine).
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

from .common import BenchmarkError, machine_info, pyplot, read_json, save_figure

METHOD_LABEL = {"collafuse": "CollaFuse", "fedavg": "FedAvg", "local": "Local-only", "centralized": "Centralized"}
BASELINE_STYLE = {"fedavg": "tab:orange", "local": "tab:green", "centralized": "tab:red"}
FINAL = ("fid", "kid", "fid_pooled", "client_train_flops", "client_train_flops_per_round",
         "client_train_flops_per_client_round", "client_infer_flops_per_image", "server_train_flops",
         "server_infer_flops_per_image", "bytes_up_per_round", "bytes_down_per_round", "bytes_up", "bytes_down")
DISCLOSURE = ("reid_server", "reid_scaled", "reid_reference", "psnr_server", "ssim_server", "psnr_reference",
              "ssim_reference", "upload_fid", "inference_fid")


def _num(v: Any) -> float:
    """results.json stores inf as "inf" and NaN as null; back to floats."""
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def _epsilon(r: dict) -> float:
    """A DP run's realised epsilon (its worst client), else the diffusion noise's own accounting."""
    d = r.get("final", {}).get("disclosure", {})
    dp = d.get("dp_per_client") or {}
    return max(_num(p.get("epsilon_realised") or 0.0) for p in dp.values()) if dp else _num(d.get("epsilon"))


def _short(error: str | None) -> str | None:
    """The sentence that says why, out of a run's error (a node's refusal carries its fix)."""
    for key in ("upload epsilon", "cannot be met", "refused"):
        if error and key in error:
            return error[error.find(key):].split(";")[0][:300]
    return error[:300] if error else error


def _status(r: dict, s: dict) -> str | None:
    return r.get("status") or s.get("status")


#: results.csv columns: (column, where in results.json r / sweep.json s it comes from)
COLUMNS: list[tuple[str, Callable[[dict, dict], Any]]] = [
    ("run", lambda r, s: s["_name"]), ("tag", lambda r, s: s.get("tag") or s["_name"].rsplit("-s", 1)[0]),
    ("status", _status), ("method", lambda r, s: r.get("method") or s.get("method")),
    ("c", lambda r, s: r.get("cut_ratio") if "cut_ratio" in r else s.get("cut_ratio")),
    ("cut_step", lambda r, s: r.get("cut_step")),
    ("cut_steps", lambda r, s: ",".join(map(str, (r.get("cut_step_per_client") or {}).values())) or None),
    ("seed", lambda r, s: r.get("seed", s.get("seed"))),
    *[(k, lambda r, s, k=k: r.get(k)) for k in ("dataset", "num_clients", "num_rounds", "diffusion_steps")],
    *[(k, lambda r, s, k=k: _num(r.get("final", {}).get(k))) for k in FINAL],
    ("fid_backbone", lambda r, s: r.get("final", {}).get("fid_backbone")),
    *[(k, lambda r, s, k=k: _num(r.get("final", {}).get("disclosure", {}).get(k))) for k in DISCLOSURE],
    ("epsilon", lambda r, s: _epsilon(r)),
    ("uploads", lambda r, s: _num(sum((r.get("final", {}).get("uploads_per_client") or {}).values()) or None)),
    ("wall_seconds", lambda r, s: _num(r.get("wall_seconds"))),
    ("call_seconds", lambda r, s: _num(s.get("call_seconds"))),
    ("count_flops", lambda r, s: r.get("config", {}).get("count-flops")),
    ("error", lambda r, s: _short(r.get("error") or s.get("error")) if _status(r, s) != "ok" else None),
]

#: report.md's table: (column, header, formatter kind)
TABLE: list[tuple[str, str, str]] = [
    ("fid", "FID ↓", "num"), ("kid", "KID ↓", "num"), ("fid_pooled", "FID pooled ↓", "num"),
    ("client_train_flops_per_round", "client train FLOPs / round", "flops"),
    ("client_infer_flops_per_image", "client infer FLOPs / image", "flops"),
    ("server_train_flops", "server train FLOPs (total)", "flops"),
    ("bytes_up_per_round", "bytes up / round", "bytes"), ("bytes_down_per_round", "bytes down / round", "bytes"),
    ("reid_server", "re-id rate (server model)", "num"), ("reid_reference", "re-id rate (reference attacker)", "num"),
    ("psnr_server", "PSNR (dB)", "num"), ("ssim_server", "SSIM", "num"), ("upload_fid", "upload FID", "num"),
    ("epsilon", "ε (δ=1e-5; DP: realised)", "num"), ("uploads", "images uploaded", "num"),
    ("wall_seconds", "wall s (ServerApp)", "num"), ("call_seconds", "wall s (whole call)", "num"),
]


def _order(row: dict[str, Any]) -> tuple:
    """CollaFuse by c, its variants (tradeoff) after the plain cuts, then the baselines."""
    plain = str(row.get("tag") or "").startswith("collafuse-c") or row.get("method") != "collafuse"
    c = _num(row.get("c"))
    rank = list(METHOD_LABEL).index(row["method"]) if row.get("method") in METHOD_LABEL else 9
    return rank, not plain, 0.0 if math.isnan(c) else c, row.get("tag") or "", row.get("seed") or 0


def load_runs(out: Path) -> list[dict[str, Any]]:
    """One row per run folder under OUT/runs (folders with neither record are ignored)."""
    runs_dir = Path(out) / "runs"
    if not runs_dir.is_dir():
        raise BenchmarkError(f"{runs_dir} does not exist: point the report at a sweep's output folder "
                             f"(the one that holds runs/)")
    rows = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        res, sw = read_json(d / "results.json"), read_json(d / "sweep.json")
        if res or sw:
            rows.append({**{col: get(res, {**sw, "_name": d.name}) for col, get in COLUMNS}, "_dir": d})
    return sorted(rows, key=_order)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    def cell(v: Any) -> Any:
        if isinstance(v, float):
            return "" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.6g}"
        return "" if v is None else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in COLUMNS])
        w.writerows([cell(r.get(c)) for c, _ in COLUMNS] for r in rows)


def label(row: dict[str, Any]) -> str:
    tag, method, c = row.get("tag") or "", row.get("method"), _num(row.get("c"))
    if method == "collafuse" and tag.startswith("collafuse-c") and not math.isnan(c):
        return f"CollaFuse c={c:g}"
    return METHOD_LABEL.get(method, tag) if tag in METHOD_LABEL or tag == method else tag


def stats(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std, n) over the values that are numbers; inf when any is +inf (raw data's epsilon)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals or any(math.isinf(v) for v in vals):
        return (math.inf if vals else math.nan), math.nan, len(vals)
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean / std / n per configuration (tag) over its runs with status ok, in report order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:  # rows are in report order already
        if r.get("status") == "ok":
            groups.setdefault(r["tag"], []).append(r)
    out = []
    for tag, g in groups.items():
        c = _num(g[0].get("c"))
        out.append({"tag": tag, "label": label(g[0]), "method": g[0]["method"], "c": None if math.isnan(c) else c,
                    "plain": label(g[0]) != tag or tag.startswith("collafuse-c"), "n": len(g),
                    "seeds": sorted(r["seed"] for r in g), "rows": g,
                    "stats": {col: stats([r[col] for r in g]) for col, _ in COLUMNS
                              if col not in ("c", "seed") and all(_is_num(r.get(col)) for r in g)}})
    return out


def _si(v: float, unit: str) -> str:
    if not math.isfinite(v):
        return "inf" if v == math.inf else "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _fmt_num(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.3g}"


def fmt_stat(s: tuple[float, float, int] | None, kind: str = "num") -> str:
    if s is None or s[2] == 0:
        return "–"
    mean, std, _ = s
    one = {"num": _fmt_num, "flops": lambda v: _si(v, "FLOP"), "bytes": lambda v: _si(v, "B")}[kind]
    return one(mean) if math.isnan(std) or not math.isfinite(mean) or std == 0 else f"{one(mean)} ± {one(std)}"


# -- plots -----------------------------------------------------------------------------------------------------
C_LABEL = "cut ratio c = t_c / T (share of the denoising steps run on the client)"


def _finite(g: dict, col: str) -> bool:
    return col in g["stats"] and math.isfinite(g["stats"][col][0])


def _figure(path: Path, panels: list[tuple[str, list[tuple[str, str, str]], str, str, Callable]], groups: list[dict],
            title: str, unit: str = "") -> None:
    """One panel per (title, [(column, curve label, color)], y label, baseline column, value format) vs c:
    plain CollaFuse as mean ± std over seeds, the baselines as horizontal lines and bands."""
    from matplotlib.ticker import EngFormatter

    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.6), squeeze=False)
    for ax, (name, curves, ylabel, base, fmt) in zip(axes[0], panels):
        for col, curve, color in curves:
            pts = [(g["c"], *g["stats"][col][:2]) for g in groups
                   if g["method"] == "collafuse" and g["plain"] and _finite(g, col)]
            if pts:
                x, y, e = (np.array(v, dtype=float) for v in zip(*pts))
                ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=4, lw=2, color=color, label=curve)
        for g in groups if base else []:
            if g["method"] in BASELINE_STYLE and _finite(g, base):
                mean, std, n = g["stats"][base]
                color = BASELINE_STYLE[g["method"]]
                ax.axhline(mean, ls="--", color=color, lw=1.5, label=f"{g['label']} ({fmt(mean)})")
                if n > 1 and math.isfinite(std):
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        if unit:
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(EngFormatter(unit=unit, sep=" "))
        ax.set(xlim=(-0.05, 1.05), xlabel=C_LABEL, ylabel=ylabel, title=name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_communication(groups: list[dict], path: Path, subtitle: str) -> None:
    from matplotlib.ticker import EngFormatter

    x = np.arange(len(groups))
    fig, ax = pyplot().subplots(figsize=(max(7.0, 0.9 * len(groups) + 2), 4.8))
    for off, col, name, color in ((-0.19, "bytes_up_per_round", "up (clients → server)", "tab:blue"),
                                  (0.19, "bytes_down_per_round", "down (server → clients)", "tab:orange")):
        vals = [g["stats"].get(col, (math.nan,))[0] for g in groups]
        ax.bar(x + off, [v if math.isfinite(v) and v > 0 else np.nan for v in vals], width=0.38, label=name,
               color=color)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(EngFormatter(unit="B", sep=" "))
    ax.set_xticks(x, [g["label"] for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="bytes per round, all clients together (log scale)", title=f"Communication per round ({subtitle})")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_samples(groups: list[dict], path: Path, per_client: int = 2, max_images: int = 12) -> bool:
    """One row per configuration from its lowest seed's samples.npz; False when no run has samples."""
    from collafuse_flwr.harness.outputs import save_grid

    rows, labels = [], []
    for g in groups:
        run = min(g["rows"], key=lambda r: r["seed"])
        if (run["_dir"] / "samples.npz").is_file():
            with np.load(run["_dir"] / "samples.npz") as s:
                images, client = s["images"], s["client"]
            picked = [i for c in np.unique(client) for i in np.flatnonzero(client == c)[:per_client]][:max_images]
            rows.append(images[picked].transpose(0, 3, 1, 2))  # N x H x W x C -> N x C x H x W
            labels.append(f"{g['label']} (s{run['seed']})")
    if rows:
        save_grid(path, rows, labels, title=f"Samples, {per_client}/client")
    return bool(rows)


def plot_all(groups: list[dict], out: Path, meta: dict) -> list[str]:
    sub = ", ".join(str(v) for v in (meta.get("dataset"), meta.get("num_clients") and f"{meta['num_clients']} clients",
                                     meta.get("num_rounds") and f"{meta['num_rounds']} rounds",
                                     meta.get("diffusion_steps") and f"T={meta['diffusion_steps']}") if v)
    feats = f"{meta.get('fid_backbone') or '?'} features"
    flop = lambda v: _si(v, "FLOP")
    _figure(out / "fid_vs_c.png", [("Sample quality vs cut ratio", [("fid", "CollaFuse (mean ± std over seeds)",
            "tab:blue")], f"FID vs the client's test images, {feats}\n(mean over clients; lower is better)", "fid",
            _fmt_num)], groups, sub)
    _figure(out / "disclosure_vs_c.png", [
        ("Re-identification of clients' training images",
         [("reid_server", "server's own model", "tab:blue"), ("reid_reference", "reference attacker", "tab:brown"),
          ("reid_scaled", "model-free x_tc / sqrt(abar_c)", "tab:purple")],
         "share of uploads matched to their source image", "reid_server", _fmt_num),
        ("How much the server's view resembles the data",
         [("upload_fid", "uploads x_tc (training)", "tab:blue"),
          ("inference_fid", "x_tc sent at inference", "tab:cyan")],
         f"FID vs the client's training images, {feats}", "", _fmt_num)],
        groups, f"Disclosure vs cut ratio ({sub}); c = 1 uploads nothing")
    _figure(out / "client_flops_vs_c.png", [
        ("Client training compute", [("client_train_flops_per_client_round", "CollaFuse", "tab:blue")],
         "client training FLOPs per client per round", "client_train_flops_per_client_round", flop),
        ("Client inference compute", [("client_infer_flops_per_image", "CollaFuse", "tab:blue")],
         "client inference FLOPs per generated image", "client_infer_flops_per_image", flop)],
        [g for g in groups if g["method"] != "centralized"], f"Client compute vs cut ratio ({sub})", unit="FLOP")
    plot_communication(groups, out / "communication.png", sub)
    return ["fid_vs_c.png", "disclosure_vs_c.png", "client_flops_vs_c.png", "communication.png"] + \
        (["samples_by_method.png"] if plot_samples(groups, out / "samples_by_method.png") else [])


# -- report.md ---------------------------------------------------------------------------------------------------
SETTING_KEYS = ("dataset", "partitioning", "image-size", "model-size", "diffusion-steps", "beta-schedule",
                "num-server-rounds", "local-steps", "server-steps", "batch-size", "learning-rate",
                "uploads-per-round", "num-eval-samples", "sampling-steps", "conditioning", "server-target",
                "fid-backbone", "count-flops", "test-fraction")
ABOUT = ("FID/KID: per-client FID of each client's generated images against its own held-out test images, averaged "
         "over clients; *pooled*: all generated vs all test images. FLOPs are measured on the real passes (0 where "
         "count-flops=false). Re-id rate: share of a client's last uploads whose reconstruction (by the server's own "
         "model, or by the reference attacker: a full-chain denoiser trained on held-out data of the same kind) is "
         "nearest (L2) to its true source image; PSNR/SSIM: of the server model's reconstruction; upload FID: "
         "uploads vs training images; ε: (ε, δ=1e-5) of the upload Gaussian mechanism per training image (inf = raw "
         "data), for a DP run (upload-epsilon) the realised ε of its worst client. c = 0 uploads raw images; c = 1 "
         "is CollaFuse without a server share.")


def write_markdown(path: Path, rows: list[dict], groups: list[dict], sweep: dict, plots: list[str]) -> None:
    ok, failed = [r for r in rows if r.get("status") == "ok"], [r for r in rows if r.get("status") != "ok"]
    cfg = read_json(ok[0]["_dir"] / "results.json").get("config", {}) if ok else {}
    lines = ["# CollaFuse sweep report", "",
             f"{len(ok)} run(s) ok, {len(failed)} failed; written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "## Command", "", "```", sweep.get("command") or "(not recorded: the folder has no sweep.json)", "```",
             f"Report: `python -m benchmarks.report {path.parent}`", "", "## Settings", "",
             "| setting | value |", "| --- | --- |", *[f"| {k} | `{cfg[k]}` |" for k in SETTING_KEYS if k in cfg]]
    if ok:
        lines += [f"| clients | {ok[0].get('num_clients')} |", f"| seeds | {sorted({r['seed'] for r in ok})} |"]
    if sweep:
        lines += ["", f"Run set `{sweep.get('preset')}`: {sweep.get('preset_about', '')}. Engine: "
                      f"{sweep.get('engine', 'flwr run')}. Keys sent to every run: "
                      f"`{json.dumps(sweep.get('run_config', {}))}`."]
    header = ["configuration", "n"] + [h for _, h, _ in TABLE]
    lines += ["", "## Results (mean ± std over seeds)", "", ABOUT, "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([g["label"], str(g["n"])] + [fmt_stat(g["stats"].get(c), k) for c, _, k in TABLE])
              + " |" for g in groups]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['run']}`: {r.get('error') or 'no results'} "
                                                f"(log: `runs/{r['run']}/flwr.log`)" for r in failed]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})\n" for p in plots]
    info = sweep.get("machine") or machine_info()
    lines += ["## Machine", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "Per-run numbers: `results.csv` (one row per run); each run's files: `runs/<tag>-s<seed>/`."]
    path.write_text("\n".join(lines) + "\n")


def write_report(out: Path) -> dict[str, Path]:
    """Write results.csv, the plots and report.md into `out`; returns their paths by name."""
    out = Path(out)
    rows = load_runs(out)
    if not rows:
        raise BenchmarkError(f"no runs under {out / 'runs'}: run `python -m benchmarks.sweep --out {out}` first")
    paths = {"csv": out / "results.csv", "report": out / "report.md"}
    write_csv(rows, paths["csv"])
    groups = aggregate(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    meta = {k: ok[0].get(k) for k in ("dataset", "num_clients", "num_rounds", "diffusion_steps", "fid_backbone")} \
        if ok else {}
    plots = plot_all(groups, out, meta) if groups else []
    paths.update({p.removesuffix(".png"): out / p for p in plots})
    write_markdown(paths["report"], rows, groups, read_json(out / "sweep.json"), plots)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the sweep's output folder (holds runs/)")
    try:
        paths = write_report(p.parse_args(argv).out)
    except BenchmarkError as exc:
        print(f"error: {exc}")
        return 2
    for name, path in paths.items():
        print(f"{name:22s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
