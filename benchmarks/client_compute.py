"""Client inference FLOPs per image: CollaFuse with a full-size or a smaller private net vs FedAvg.

    python -m benchmarks.client_compute    # seconds: 8 px small T=200 and 28 px base T=1000

A CollaFuse client receives x_{t_c} and runs only the last t_c of the T denoising steps with its
private denoiser; with `client-model-size = "half"` that denoiser is the server's preset at half
the channel widths (collafuse_flwr/core/models.py), which costs about a quarter of the FLOPs per pass.
A FedAvg client runs all T steps with the full (client-conditioned) global model.

FLOPs are measured with the app's FlopMeter (torch.utils.flop_counter on real passes):
- at digits 8x8 (pinned), `small`, T=200, c=0.2 by running `diffusion.client_finish`
  for real, exactly as the ClientApp does;
- at 28x28 / `base` / T=1000 (MNIST-sized, the GPU preset) as FLOPs of one measured pass x the
  number of denoiser calls `client_finish` makes (counted with a free stand-in model), which the
  8 px case checks is the same as measuring every call.
Target: FLOPs ratio CollaFuse(c=0.2, half-size client net) / FedAvg <= 0.1 at both settings.

The quality cost of the half net is the `half` row of `python -m benchmarks.tradeoff`.

Prints PASS/FAIL and writes benchmarks/results/client_compute.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.models import build_denoiser, client_preset, count_parameters, shared_denoiser

from .common import (
    RESULTS_DIR,
    client_chain,
    command_line,
    machine_info,
    validate_overrides,
    verdict,
    write_result,
)

TARGET = 0.1
NUM_CLIENTS = 5
#: (name, run-config overrides, measure every call for real?)
SETTINGS = (
    ("digits-8px-small-T200", {"dataset": "digits"}, True),
    ("mnist-28px-base-T1000", {"image-size": 28, "model-size": "base", "diffusion-steps": 1000,
                               "dataset": "mnist5k"}, False),
)


def count_calls(sched: D.Schedule, t_start: int, num_steps: int | None) -> int:
    """How many denoiser calls `client_finish` makes from t_start (with a free stand-in model)."""
    calls = 0

    def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.zeros_like(x)

    D.client_finish(zero, sched, torch.zeros(1, 1, 2, 2), t_start, num_steps, torch.Generator().manual_seed(0))
    return calls


def pass_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Measured FLOPs of one denoiser pass on one image."""
    meter = FlopMeter()
    with torch.no_grad(), meter.count("pass"):
        model(torch.randn(1, *shape), torch.tensor([1]))
    return meter.totals["pass"]


def measured_flops_per_image(model: torch.nn.Module, sched: D.Schedule, shape: tuple[int, ...], t_start: int,
                             num_steps: int | None, batch: int = 2) -> float:
    """FLOPs per image of a real `client_finish` call, as the ClientApp bills them."""
    meter = FlopMeter()
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        D.client_finish(meter.wrap(model, "infer"), sched, x, t_start, num_steps, torch.Generator().manual_seed(0))
    return meter.totals.get("infer", 0) / batch


def compute_setting(name: str, overrides: dict[str, Any], real: bool, cut_ratio: float) -> dict[str, Any]:
    cfg = validate_overrides({**overrides, "method": "collafuse", "cut-ratio": cut_ratio})
    T = cfg.diffusion_steps  # noqa: N806 - the paper's name
    chain = client_chain(cfg)
    sched, t_start, s_cli, full_steps = chain.sched, chain.t_start, chain.client_steps, chain.full_steps
    shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
    torch.manual_seed(cfg.seed)
    fedavg = shared_denoiser(cfg.image_size, shape[0], cfg.model_size, cfg.conditioning, NUM_CLIENTS).eval()
    fedavg.condition(0)
    nets = {"full": cfg.model_size, "half": client_preset(cfg.model_size, "half")}
    models = {k: build_denoiser(cfg.image_size, shape[0], v).eval() for k, v in nets.items()}
    calls = {"collafuse": count_calls(sched, t_start, s_cli), "fedavg": count_calls(sched, T, full_steps)}
    per_pass = {"fedavg": pass_flops(fedavg, shape), **{k: pass_flops(m, shape) for k, m in models.items()}}
    flops = {"fedavg": per_pass["fedavg"] * calls["fedavg"],
             **{f"collafuse_{k}": per_pass[k] * calls["collafuse"] for k in models}}
    row: dict[str, Any] = {
        "setting": name, "image_size": cfg.image_size, "channels": shape[0], "diffusion_steps": T,
        "cut_ratio": cfg.cut_ratio, "t_start": t_start, "sampling_steps": cfg.sampling_steps,
        "server_model_size": cfg.model_size, "client_model_sizes": nets,
        "parameters": {"fedavg": count_parameters(fedavg), **{k: count_parameters(m) for k, m in models.items()}},
        "denoiser_calls": calls, "flops_per_pass": per_pass, "flops_per_image": flops,
        "ratio_full": flops["collafuse_full"] / flops["fedavg"],
        "ratio_half": flops["collafuse_half"] / flops["fedavg"],
        "method": "measured every call" if real else "one measured pass x denoiser calls",
    }
    if real:  # the ClientApp's own way: FlopMeter around every call of a real client_finish
        measured = {"fedavg": measured_flops_per_image(fedavg, sched, shape, T, full_steps),
                    **{f"collafuse_{k}": measured_flops_per_image(m, sched, shape, t_start, s_cli)
                       for k, m in models.items()}}
        row["measured_flops_per_image"] = measured
        row["pass_x_calls_matches_measured"] = all(abs(measured[k] - flops[k]) <= 1e-9 * flops[k] for k in flops)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.client_compute", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--cut-ratio", type=float, default=0.2)
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "client_compute.json")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    for name, overrides, real in SETTINGS:
        r = compute_setting(name, overrides, real, a.cut_ratio)
        rows.append(r)
        f = r["flops_per_image"]
        print(f"{name}: c={r['cut_ratio']} (client starts at t={r['t_start']} of {r['diffusion_steps']}); "
              f"params FedAvg {r['parameters']['fedavg']:,}, client full {r['parameters']['full']:,}, "
              f"half {r['parameters']['half']:,} ({r['client_model_sizes']['half']})")
        print(f"  client infer FLOPs/image: FedAvg {f['fedavg']:.4g}, CollaFuse full net {f['collafuse_full']:.4g} "
              f"(ratio {r['ratio_full']:.4f}), half net {f['collafuse_half']:.4g} (ratio {r['ratio_half']:.4f})")
        if real:
            print(f"  one pass x calls == every call measured: {r['pass_x_calls_matches_measured']}")
    ok = all(r["ratio_half"] <= TARGET for r in rows) and all(r.get("pass_x_calls_matches_measured", True)
                                                               for r in rows)
    result: dict[str, Any] = {"benchmark": "client_compute", "command": command_line(),
                              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "target": TARGET, "settings": rows}
    result["pass"] = ok
    result["machine"] = machine_info()
    print(f"client infer FLOPs ratio CollaFuse(c={a.cut_ratio}, half-size client net) / FedAvg: "
          + ", ".join(f"{r['setting']} {r['ratio_half']:.4f}" for r in rows) + f" (target <= {TARGET})  {verdict(ok)}")
    write_result(a.json, result)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
