"""What a client pays to generate an image: CollaFuse's client half vs FedAvg's whole chain, in
FLOPs and in time, with the full-size private net and a half-width one (`client-model-size="half"`).

    python -m benchmarks.client_compute                     # ~1 min on 2 CPU cores
    python -m benchmarks.client_compute --cut-ratio 0.4 --repeats 7 --device cuda

FLOPs: the app's FlopMeter on every denoiser call at 8 px, as the ClientApp bills them, and one
measured pass x the calls at 28 px (the 8 px case checks the two agree). Targets: FLOPs ratio
(c = 0.2, half net) <= 0.1; time ratio (c = 0.2, full net) <= 0.25.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.models import (build_denoiser, client_preset, count_parameters, default_device,
                                        shared_denoiser)

from .common import RESULTS_DIR, print_checks, validate_overrides, write_result

FLOPS_TARGET, TIME_TARGET = 0.1, 0.25
NUM_CLIENTS = 5
#: (name, run-config keys, measured every call and timed?)
SETTINGS = (("digits-8px-small-T200", {"dataset": "digits"}, True),
            ("mnist-28px-base-T1000", {"image-size": 28, "model-size": "base", "diffusion-steps": 1000,
                                       "dataset": "mnist5k"}, False))


def count_calls(sched: D.Schedule, t_start: int, num_steps: int | None) -> int:
    """Denoiser calls `client_finish` makes from t_start (counted with a free stand-in model)."""
    calls = []
    D.client_finish(lambda x, t: calls.append(1) or torch.zeros_like(x), sched, torch.zeros(1, 1, 2, 2), t_start,
                    num_steps, torch.Generator().manual_seed(0))
    return len(calls)


def pass_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Measured FLOPs of one denoiser pass on one image."""
    meter = FlopMeter()
    with torch.no_grad(), meter.count("pass"):
        model(torch.randn(1, *shape), torch.tensor([1]))
    return meter.totals["pass"]


def finish(model: torch.nn.Module, sched: D.Schedule, x: torch.Tensor, t_start: int, steps: int | None,
           meter: FlopMeter | None = None) -> float:
    """Seconds of one `client_finish` call (its FLOPs go to `meter` when given)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        D.client_finish(meter.wrap(model, "infer") if meter else model, sched, x.clone(), t_start, steps,
                        torch.Generator().manual_seed(0))
    sync()
    return time.perf_counter() - t0


def measure(name: str, overrides: dict[str, Any], real: bool, cut_ratio: float, repeats: int,
            device: torch.device) -> dict[str, Any]:
    cfg = validate_overrides({**overrides, "method": "collafuse", "cut-ratio": cut_ratio})
    T = cfg.diffusion_steps
    sched = D.make_schedule(T, cfg.beta_schedule)
    t_start = D.client_start_step(cfg.cut_ratio, T, cfg.server_target)
    _, s_cli = D.split_step_budget(cfg.sampling_steps, T, D.cut_step(cfg.cut_ratio, T))
    full_steps = cfg.sampling_steps or None
    shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
    torch.manual_seed(cfg.seed)
    fedavg = shared_denoiser(cfg.image_size, shape[0], cfg.model_size, cfg.conditioning, NUM_CLIENTS).eval()
    fedavg.condition(0)
    sizes = {"full": cfg.model_size, "half": client_preset(cfg.model_size, "half")}
    nets = {"fedavg": fedavg, **{f"collafuse_{k}": build_denoiser(cfg.image_size, shape[0], v).eval()
                                 for k, v in sizes.items()}}
    chain = {k: (T, full_steps) if k == "fedavg" else (t_start, s_cli) for k in nets}
    calls = {k: count_calls(sched, *chain[k]) for k in nets}
    flops = {k: pass_flops(m, shape) * calls[k] for k, m in nets.items()}
    row: dict[str, Any] = {
        "setting": name, "image_size": cfg.image_size, "diffusion_steps": T, "cut_ratio": cfg.cut_ratio,
        "t_start": t_start, "sampling_steps": cfg.sampling_steps, "client_model_sizes": sizes,
        "parameters": {k: count_parameters(m) for k, m in nets.items()}, "denoiser_calls": calls,
        "flops_per_image": flops, "ratio_full": flops["collafuse_full"] / flops["fedavg"],
        "ratio_half": flops["collafuse_half"] / flops["fedavg"],
        "method": "measured every call" if real else "one measured pass x denoiser calls"}
    if real:  # the ClientApp's own way: FlopMeter around every call of a real client_finish, then the clock
        x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(1))
        meters = {k: FlopMeter() for k in nets}
        for k, m in nets.items():
            finish(m, sched, x, *chain[k], meters[k])
        measured = {k: meters[k].totals.get("infer", 0) / x.shape[0] for k in nets}
        row["measured_flops_per_image"] = measured
        row["pass_x_calls_matches_measured"] = all(abs(measured[k] - flops[k]) <= 1e-9 * flops[k] for k in flops)
        x = torch.randn((cfg.num_eval_samples, *shape), generator=torch.Generator().manual_seed(1)).to(device)
        nets = {k: m.to(device) for k, m in nets.items()}
        finish(nets["collafuse_full"], sched, x, max(1, t_start), s_cli)  # warm-up: allocator, kernels
        seconds: dict[str, list[float]] = {k: [] for k in nets}
        for _ in range(repeats):
            for k, m in nets.items():
                seconds[k].append(finish(m, sched, x, *chain[k]))
        med = {k: statistics.median(v) for k, v in seconds.items()}
        row.update(batch=x.shape[0], device=str(device), threads=torch.get_num_threads(), seconds=seconds,
                   ms_per_image={k: 1e3 * v / x.shape[0] for k, v in med.items()},
                   time_ratio_full=med["collafuse_full"] / med["fedavg"],
                   time_ratio_half=med["collafuse_half"] / med["fedavg"])
    return row


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m benchmarks.client_compute", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cut-ratio", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each net, alternated")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the app's choice, CUDA when present)")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "client_compute.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device) if a.device else default_device()
    rows = [measure(name, o, real, a.cut_ratio, max(1, a.repeats), device) for name, o, real in SETTINGS]
    for r in rows:
        f = r["flops_per_image"]
        print(f"{r['setting']}: c={r['cut_ratio']} (client starts at t={r['t_start']} of {r['diffusion_steps']}); "
              f"FLOPs/image FedAvg {f['fedavg']:.4g}, CollaFuse full net {f['collafuse_full']:.4g} "
              f"(x{r['ratio_full']:.4f}), half net {f['collafuse_half']:.4g} (x{r['ratio_half']:.4f})")
        if "ms_per_image" in r:
            ms = r["ms_per_image"]
            print(f"  time/image FedAvg {ms['fedavg']:.3f} ms, CollaFuse full {ms['collafuse_full']:.3f} ms "
                  f"(x{r['time_ratio_full']:.3f}), half {ms['collafuse_half']:.3f} ms (x{r['time_ratio_half']:.3f}); "
                  f"one pass x calls == every call measured: {r['pass_x_calls_matches_measured']}")
    checks = {f"FLOPs ratio (half net) <= {FLOPS_TARGET}": all(r["ratio_half"] <= FLOPS_TARGET for r in rows),
              f"time ratio (full net) <= {TIME_TARGET}": all(r["time_ratio_full"] <= TIME_TARGET
                                                            for r in rows if "time_ratio_full" in r),
              "pass x calls == measured": all(r.get("pass_x_calls_matches_measured", True) for r in rows)}
    ok = print_checks(checks)
    write_result(a.json, {"benchmark": "client_compute", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                          "flops_target": FLOPS_TARGET, "time_target": TIME_TARGET, "settings": rows,
                          "checks": checks, "pass": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
