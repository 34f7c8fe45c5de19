"""Client inference cost: CollaFuse's client half (t_c -> 0) vs FedAvg's whole chain (T -> 0).

    python -m benchmarks.infer_time                       # app defaults: small UNet, 8x8, T=200, c=0.2
    python -m benchmarks.infer_time --cut-ratio 0.4 --batch 128 --repeats 7

The client in CollaFuse receives x_{t_c} from the server and runs only the last t_c of the T
denoising steps; under FedAvg (and local-only) it runs all T. This times exactly that:
`diffusion.client_finish` on the same model (the app's client denoiser for the configured
model-size / image-size), the same batch and thread count, started at t_c and at T, alternated
`--repeats` times after a warm-up, medians compared. It also counts the FLOPs of both with the
app's FlopMeter (torch's FLOP counter on the real passes).

Target: time ratio <= 0.25 at c = 0.2 (ideal t_c / T = 0.2 plus fixed per-call costs).
Prints PASS/FAIL and writes benchmarks/results/infer_time.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.models import build_denoiser, count_parameters, default_device

from .common import (
    RESULTS_DIR,
    BenchmarkError,
    client_chain,
    command_line,
    machine_info,
    parse_overrides,
    validate_overrides,
    verdict,
    write_result,
)

TARGET = 0.25


def finish_seconds(model: torch.nn.Module, sched: D.Schedule, x: torch.Tensor, t_start: int,
                   num_steps: int | None, seed: int) -> float:
    """Wall seconds of one client_finish call from t_start (same noise draws for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    _sync(x.device)
    t0 = time.perf_counter()
    D.client_finish(model, sched, x.clone(), t_start, num_steps, gen)
    _sync(x.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for queued kernels so the clock measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(model: torch.nn.Module, sched: D.Schedule, x: torch.Tensor, t_start: int,
                    num_steps: int | None) -> float:
    meter = FlopMeter()
    with torch.no_grad():
        D.client_finish(meter.wrap(model, "infer"), sched, x.clone(), t_start, num_steps,
                        torch.Generator().manual_seed(0))
    return meter.totals.get("infer", 0) / x.shape[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.infer_time", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--cut-ratio", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=None, help="images per call (default: num-eval-samples, 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each, alternated")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the app's choice, CUDA when present)")
    p.add_argument("--extra", default="", help='run-config overrides, e.g. "model-size=\'tiny\' diffusion-steps=50"')
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "infer_time.json")
    a = p.parse_args(argv)
    try:
        cfg = validate_overrides({**parse_overrides(a.extra), "method": "collafuse", "cut-ratio": a.cut_ratio})
        if a.repeats < 1:
            raise BenchmarkError("--repeats must be >= 1")
        batch = a.batch or cfg.num_eval_samples
        if batch < 1:
            raise BenchmarkError("--batch must be >= 1")
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(cfg.seed)
    T = cfg.diffusion_steps  # noqa: N806 - the paper's name
    chain = client_chain(cfg)
    sched, t_start, s_cli, full_steps = chain.sched, chain.t_start, chain.client_steps, chain.full_steps
    channels = cfg.image_channels
    device = torch.device(a.device) if a.device else default_device()
    model = build_denoiser(cfg.image_size, channels, cfg.model_size).eval().to(device)
    x = torch.randn((batch, channels, cfg.image_size, cfg.image_size),
                    generator=torch.Generator().manual_seed(1)).to(device)
    print(f"infer_time: {cfg.model_size} UNet ({count_parameters(model):,} parameters), "
          f"{channels}x{cfg.image_size}x{cfg.image_size}, batch {batch}, T={T}, c={cfg.cut_ratio} -> client starts "
          f"at t={t_start}, {torch.get_num_threads()} thread(s), device {device}", flush=True)
    with torch.no_grad():
        finish_seconds(model, sched, x, max(1, t_start), s_cli, 0)  # warm-up: allocator, kernels
        collafuse_s, fedavg_s = [], []
        for r in range(a.repeats):
            collafuse_s.append(finish_seconds(model, sched, x, t_start, s_cli, r))
            fedavg_s.append(finish_seconds(model, sched, x, T, full_steps, r))
            print(f"  repeat {r + 1}/{a.repeats}: c={cfg.cut_ratio} {collafuse_s[-1]:.3f}s, "
                  f"FedAvg {fedavg_s[-1]:.3f}s", flush=True)
    cf, fa = statistics.median(collafuse_s), statistics.median(fedavg_s)
    ratio = cf / fa if fa > 0 else float("inf")
    f_cf = flops_per_image(model, sched, x, t_start, s_cli)
    f_fa = flops_per_image(model, sched, x, T, full_steps)
    f_ratio = f_cf / f_fa if f_fa > 0 else float("nan")
    ok = ratio <= TARGET
    print()
    print(f"client inference per image: CollaFuse c={cfg.cut_ratio} {1e3 * cf / batch:.3f} ms, "
          f"FedAvg {1e3 * fa / batch:.3f} ms")
    print(f"time ratio  {ratio:.3f}  (target <= {TARGET}; ideal t_c/T = {t_start / T:.3f})  {verdict(ok)}")
    print(f"FLOPs ratio {f_ratio:.3f}  ({f_cf:.4g} vs {f_fa:.4g} FLOPs per image)")
    result: dict[str, Any] = {
        "benchmark": "infer_time", "command": command_line(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model_size": cfg.model_size, "parameters": count_parameters(model), "image_size": cfg.image_size,
        "channels": channels, "batch": batch, "diffusion_steps": T, "cut_ratio": cfg.cut_ratio, "t_start": t_start,
        "sampling_steps": cfg.sampling_steps, "threads": torch.get_num_threads(), "device": str(device),
        "collafuse_seconds": collafuse_s, "fedavg_seconds": fedavg_s,
        "collafuse_ms_per_image": 1e3 * cf / batch, "fedavg_ms_per_image": 1e3 * fa / batch,
        "time_ratio": ratio, "flops_per_image_collafuse": f_cf, "flops_per_image_fedavg": f_fa,
        "flops_ratio": f_ratio, "target": TARGET, "pass": ok, "machine": machine_info(),
    }
    write_result(a.json, result)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
