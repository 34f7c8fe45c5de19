"""Framework overhead: the same CollaFuse job through Flower's simulation engine vs a plain loop.

    python -m benchmarks.overhead               # c=0.2, 5 clients, digits, 8 rounds (the old main job, FLOPs off)
    python -m benchmarks.overhead --repeats 2   # two back-to-back pairs, median ratio
    python -m benchmarks.overhead --threads 2   # both sides on 2 torch threads (all of this machine's cores)
    python -m benchmarks.overhead --rounds 16   # a longer job: the fixed start-up amortizes
    python -m benchmarks.overhead --quick       # tiny smoke check; its ratio means little

Both sides do the same work: the app's defaults (pyproject.toml) on digits for 8 rounds
(`MEASURED_ON`, the measured setting) with cut-ratio 0.2,
count-flops false, the same steps, batch sizes, uploads, seeds and the same evaluation (server
half of sampling, client half, per-client FID/KID, disclosure metrics, pooled FID, writing the
samples). The Flower side is `run_flower` (one `flwr run`, simulation engine, Ray). The plain
side calls the same functions (`training.train_steps` with `client_share_loss` /
`server_share_loss`, `diffusion.upload`, `diffusion.server_sample`, `diffusion.client_finish`,
the same metric functions) in one process, with no Flower message, record or process anywhere.

Two ratios, because they answer different questions:

- ServerApp ratio = results.json `wall_seconds` (measured inside the ServerApp from its start to
  the written results, pooled FID and sample files included) / plain seconds: what Flower's
  messaging, Ray start-up and dispatch, per-call ClientApp setup and state (de)serialization
  cost on top of the work. Target <= 1.15; the exit code follows this verdict.
- Total ratio = wall time of the whole `run_flower` call / plain seconds: adds the fixed
  SuperLink / SuperExec start-up and shutdown (~20 s here), which only a longer job amortizes.
  Reported against the same target for information.

Each repeat runs the two sides back to back and the verdict is the median of the per-pair
ratios: this 2-core VM's speed drifts by up to 20 % over minutes, so one plain run against a
Flower run made minutes later can be off by more than the overhead being measured. A phase
table (first round with start-up, mean middle round, last round with evaluation, results)
shows which part of the job the extra time is in.

Both sides train the disclosure harness's reference attacker at the first evaluation, while
the clients are idle.

Threads: both sides use `--threads` torch threads per process (the Flower side through the
app's `torch-threads` key, in the ServerApp and in the ClientApp worker), and the engine runs one
client at a time (2 CPUs per ClientApp), as the plain loop does. The default, 1, leaves this
2-core machine's second core to what Flower runs beside the training (SuperLink, dispatcher,
Ray's daemons), as any machine with a core to spare would: the ratio then measures the
framework's own cost. With `--threads 2` every core trains, the engine's ~6 extra processes
take their wake-ups from the training threads, and the ratio adds that contention (1.24 here
against 1.04 with 1 thread; benchmarks/README.md). The same seed now gives the same images on
both sides, so the two FIDs are printed side by side as a check that the work is the same.

Writes benchmarks/results/overhead.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collafuse_flwr import diffusion as D
from collafuse_flwr.client_data import all_splits, client_data, dataset_for
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import to_uint8
from collafuse_flwr.client_app import init_private_denoiser, node_generator, node_settings
from collafuse_flwr.launch import run_flower
from collafuse_flwr.metrics.disclosure import psnr_ssim, reconstruct, reidentification_rate, upload_fid
from collafuse_flwr.metrics.features import resolve_backbone
from collafuse_flwr.metrics.fid import compute_fid_kid
from collafuse_flwr.metrics.privacy import gaussian_upload_epsilon
from collafuse_flwr.models import default_device, shared_denoiser
from collafuse_flwr.outputs import save_samples, write_json
from collafuse_flwr.training import client_share_loss, make_optimizer, server_share_loss, train_steps

from .common import (
    OLD_MAIN_JOB,
    RESULTS_DIR,
    BenchmarkError,
    app_keys,
    command_line,
    fmt_seconds,
    machine_info,
    parse_overrides,
    validate_overrides,
    verdict,
    write_result,
)

TARGET = 1.15
QUICK = {"model-size": "tiny", "image-size": 8, "diffusion-steps": 20, "local-steps": 2, "server-steps": 2,
         "uploads-per-round": 8, "num-eval-samples": 6, "batch-size": 16, "attack-reference-steps": 5}


#: the setting results/overhead.json was measured on (the ratio is about the engine, not the data)
MEASURED_ON: dict[str, Any] = OLD_MAIN_JOB


def _client_generator(cfg: RunConfig, pid: int, server_round: int, salt: int) -> torch.Generator:
    """The ClientApp's per-(client, round, phase) generator, keyed by this machine's node secret
    (client_app.node_generator), so both sides draw minibatches, timesteps and noise the same way."""
    return node_generator(cfg, node_settings(cfg, {}).state_dir, pid, server_round, salt)


@dataclass
class PlainResult:
    seconds: float
    fid: float
    fid_pooled: float
    train_seconds: float
    eval_seconds: float
    round_ends: list[float]  # seconds from the start to the end of each round (evaluation included)
    client_seconds: list[float]  # per round: client training + upload, summed over clients
    server_seconds: list[float]  # per round: server training


def plain_collafuse(cfg: RunConfig, num_clients: int, out_dir: Path) -> PlainResult:
    """CollaFuse end to end in this process: what the ServerApp + ClientApps do, minus Flower.

    Mirrors strategies/collafuse.py (server side, with the disclosure harness's reference
    attacker of collafuse_flwr/attack.py), client_app.py (client side), evaluation.py (client
    metrics) and report_run.py (pooled FID, samples, results.json). Keep it in step with them:
    work the plain loop skips would count as Flower overhead.
    """
    if cfg.method != "collafuse":
        raise BenchmarkError(f"the plain loop implements collafuse only, got method={cfg.method!r}")
    t0 = time.perf_counter()
    device = default_device()
    torch.manual_seed(cfg.seed)
    datas = [client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    shape = datas[0].image_shape
    sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    t_c = D.cut_step(cfg.cut_ratio, cfg.diffusion_steps)
    t_start = D.client_start_step(cfg.cut_ratio, cfg.diffusion_steps, cfg.server_target)
    server = shared_denoiser(cfg.image_size, shape[0], cfg.model_size, cfg.conditioning, num_clients).to(device)
    server_opt = make_optimizer(server, cfg.learning_rate)
    server_gen = torch.Generator().manual_seed(cfg.seed + 7919)
    clients = [init_private_denoiser(cfg, pid, shape[0], device) for pid in range(num_clients)]
    client_opts = [make_optimizer(m, cfg.learning_rate) for m in clients]
    counts = [np.zeros(d.train.shape[0], dtype=np.int64) for d in datas]
    last_idx: list[np.ndarray | None] = [None] * num_clients
    last_upload: list[np.ndarray | None] = [None] * num_clients
    buffer: dict[int, list[torch.Tensor]] = {}  # client -> its uploads, oldest first (CollaFuse.buffer)
    server_share = t_c < sched.T
    backbone = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
    eval_s = 0.0
    reference = None  # the disclosure harness's reference attacker, trained once at first evaluation
    images: dict[int, np.ndarray] = {}
    per_client_fid: list[float] = []
    round_ends: list[float] = []
    client_s: list[float] = []
    server_s: list[float] = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        # -- clients train their share and upload x_tc (client_app.train) --------------------------
        n_up = cfg.uploads_per_round if server_share else 0
        tc = time.perf_counter()
        for pid, data in enumerate(datas):
            gen = _client_generator(cfg, pid, rnd, 0)
            model, opt = clients[pid], client_opts[pid]
            if t_start > 0:
                train_steps(model, opt, client_share_loss(model, sched, t_start, gen), data.train,
                            cfg.local_steps, cfg.batch_size, gen, device)
            if n_up > 0:
                idx = torch.randperm(data.train.shape[0], generator=gen)[:n_up]
                x_tc = D.upload(sched, data.train[idx], t_c, torch.randn(data.train[idx].shape, generator=gen))
                x = x_tc.float().numpy()
                buffer.setdefault(pid, []).append(torch.from_numpy(x))
                np.add.at(counts[pid], idx.numpy(), 1)
                last_idx[pid], last_upload[pid] = idx.numpy(), x
        client_s.append(time.perf_counter() - tc)
        # -- server trains on all uploads so far (CollaFuse.aggregate_train) -------------------------
        ts = time.perf_counter()
        steps = cfg.server_steps if isinstance(cfg.server_steps, int) else cfg.local_steps * len(buffer)
        if server_share and buffer and steps > 0:  # the Flower run is told server-overlap=false
            parts = [(c, t) for c in sorted(buffer) for t in buffer[c]]  # client-major, as CollaFuse.buffer_tensors
            train_steps(server, server_opt, server_share_loss(server, sched, t_c, cfg.server_target, server_gen),
                        torch.cat([t for _, t in parts]), steps, cfg.batch_size, server_gen, device,
                        labels=torch.cat([torch.full((t.shape[0],), c, dtype=torch.long) for c, t in parts]))
        server_s.append(time.perf_counter() - ts)
        if not cfg.is_eval_round(rnd):
            round_ends.append(time.perf_counter() - t0)
            continue
        # -- evaluation: server half, client half, the same metrics ----------------------------------
        te = time.perf_counter()
        n = cfg.num_eval_samples
        s_srv, s_cli = D.split_step_budget(cfg.sampling_steps, sched.T, t_c)
        images, per_client_fid = {}, []
        for pid, data in enumerate(datas):
            x_srv = None
            if server_share:
                server.eval()
                server.condition(pid)
                with torch.no_grad():
                    x_srv = D.server_sample(server, sched, (n, *shape), t_c, cfg.server_target, s_srv,
                                            server_gen, device).cpu().float()
            recon: list[torch.Tensor] = []
            if last_upload[pid] is not None:
                if reference is None and getattr(cfg, "attack_reference_steps", 0) > 0 and t_c > 0:
                    from collafuse_flwr.attack import train_reference_denoiser

                    reference = train_reference_denoiser(cfg, num_clients, device)
                up = torch.from_numpy(last_upload[pid])
                server.eval()
                with torch.no_grad():
                    server.condition(pid)
                    recon = [reconstruct(up, sched, t_c, server if t_c > 0 else None),
                             reconstruct(up, sched, t_c, None)]
                    if reference is not None:
                        recon.append(reconstruct(up, sched, t_c, reference))
                    elif t_c == 0 and hasattr(cfg, "attack_reference_steps"):
                        recon.append(recon[0])
            gen = _client_generator(cfg, pid, rnd, 1)
            model = clients[pid]
            model.eval()
            x = x_srv.to(device) if x_srv is not None else torch.randn((n, *shape), generator=gen).to(device)
            gen_uint8 = to_uint8(D.client_finish(model, sched, x, t_start, s_cli or None, gen).cpu())
            images[pid] = gen_uint8.numpy().astype(np.uint8)
            if backbone != "none":
                per_client_fid.append(compute_fid_kid(data.test_uint8, gen_uint8, backbone, cfg.fid_weights or None)["fid"])
            if last_idx[pid] is not None and recon:
                gaussian_upload_epsilon(float(sched.alpha_bars[t_c]), int(counts[pid].max()), int(np.prod(shape)))
                x0 = data.train[last_idx[pid]]
                for x_hat in recon:
                    psnr_ssim(x_hat, x0)
                    reidentification_rate(x_hat, torch.from_numpy(last_idx[pid]), data.train)
                if backbone != "none":
                    upload_fid(torch.from_numpy(last_upload[pid]), data.train_uint8, backbone, cfg.fid_weights or None)
                    if x_srv is not None:
                        upload_fid(x_srv, data.train_uint8, backbone, cfg.fid_weights or None)
        eval_s += time.perf_counter() - te
        round_ends.append(time.perf_counter() - t0)
    # -- pooled FID, samples, results (report_run.finalize) ---------------------------------------------
    te = time.perf_counter()
    fid_pooled = float("nan")
    if backbone != "none" and images:
        test_idx = np.concatenate([s.test_idx for s in all_splits(cfg, num_clients)])
        fake = torch.from_numpy(np.concatenate([images[k] for k in sorted(images)]))
        fid_pooled = compute_fid_kid(dataset_for(cfg).images[test_idx], fake, backbone, cfg.fid_weights or None)["fid"]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_samples(out_dir, images)
    fid = float(np.mean(per_client_fid)) if per_client_fid else float("nan")
    write_json(out_dir / "results.json", {"status": "ok", "fid": fid, "fid_pooled": fid_pooled})
    eval_s += time.perf_counter() - te
    total = time.perf_counter() - t0
    return PlainResult(total, fid, fid_pooled, total - eval_s, eval_s, round_ends, client_s, server_s)


def flower_collafuse(overrides: dict[str, Any], num_clients: int, out_dir: Path, timeout: float) -> dict[str, Any]:
    """The same job through `run_flower`; wall time of the call and the ServerApp's own."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="overhead-flwr-home-") as home:
        res = run_flower({**overrides, "output-dir": str(out_dir)}, num_clients=num_clients,
                         flwr_home=Path(home), timeout=timeout, stream=False)
    call_s = time.perf_counter() - t0
    if not res.ok or res.output_dir is None:
        tail = "\n".join(res.log.splitlines()[-30:])
        raise BenchmarkError(f"the Flower run failed (status {res.status}, rc {res.returncode}):\n{tail}")
    r = json.loads((res.output_dir / "results.json").read_text())
    f = r["final"]
    with open(res.output_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    num = lambda row, k: float(row[k]) if row.get(k) not in (None, "") else float("nan")  # noqa: E731
    return {"call_seconds": call_s, "wall_seconds": float(r["wall_seconds"]), "fid": f.get("fid"),
            "fid_pooled": f.get("fid_pooled"), "run_id": res.run_id,
            "round_ends": [num(row, "elapsed-s") for row in rows],
            # the ClientApps' and the strategy's own clocks, as the plain loop measures its own
            "client_seconds": [num(row, "train-seconds-total") for row in rows],
            "server_seconds": [num(row, "server-train-seconds") for row in rows]}


def phases(round_ends: list[float], total: float, client_seconds: list[float],
           server_seconds: list[float]) -> dict[str, float]:
    """Where the time went: start-up + round 1, the mean middle round, the last round, the tail.

    Comparing these between the two sides separates Flower's fixed start-up cost from its
    per-round cost; a middle round is split further into client training (summed over clients,
    by the clients' own clocks), server training and the rest (messaging, dispatch, waiting).
    """
    nan = float("nan")
    if not round_ends:
        return {"first round (with start-up)": nan, "middle round (mean)": nan, "  client training": nan,
                "  server training": nan, "  the rest": nan, "last round (with evaluation)": nan,
                "results": total}
    mids = np.diff(round_ends[:-1]) if len(round_ends) > 2 else np.array([])
    mid_round = float(mids.mean()) if mids.size else nan
    inner = slice(1, len(round_ends) - 1)  # the middle rounds
    mean = lambda xs: float(np.mean(xs)) if len(xs) else nan  # noqa: E731
    client, server = mean(client_seconds[inner]), mean(server_seconds[inner])
    return {
        "first round (with start-up)": round_ends[0],
        "middle round (mean)": mid_round,
        "  client training": client,
        "  server training": server,
        "  the rest": mid_round - client - server,
        "last round (with evaluation)": round_ends[-1] - round_ends[-2] if len(round_ends) > 1 else round_ends[0],
        "results": total - round_ends[-1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--rounds", type=int, default=None, help="R (default 8: the measured setting)")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--cut-ratio", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=1, help="plain/Flower pairs, run back to back; the verdict is the median pair ratio")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process on both sides (Flower: run-config torch-threads)")
    p.add_argument("--extra", default="", help="run-config overrides for both sides")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: checks the code, not the ratio")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "overhead.json", help="where to write the result")
    a = p.parse_args(argv)
    try:
        overrides: dict[str, Any] = app_keys({**MEASURED_ON, **(QUICK if a.quick else {}), **parse_overrides(a.extra),
                                              "method": "collafuse", "cut-ratio": a.cut_ratio,
                                              "count-flops": False, "torch-threads": a.threads,
                                              "server-overlap": False})  # the plain loop is serial
        if a.rounds is not None or a.quick:
            overrides["num-server-rounds"] = a.rounds if a.rounds is not None else 2
        cfg = validate_overrides(overrides)
        if a.repeats < 1 or a.clients < 1 or a.threads < 1:
            raise BenchmarkError("--repeats, --clients and --threads must be >= 1")
        torch.set_num_threads(a.threads)
        print(f"overhead: collafuse c={cfg.cut_ratio}, {a.clients} clients, {cfg.num_server_rounds} rounds, "
              f"model {cfg.model_size}, T={cfg.diffusion_steps}, count-flops false, {a.threads} torch thread(s) "
              f"per process, {a.repeats} repeat(s)", flush=True)
        plain, flower = [], []
        with tempfile.TemporaryDirectory(prefix="overhead-out-") as tmp:
            for i in range(a.repeats):
                print(f"[{i + 1}/{a.repeats}] plain in-process loop ...", flush=True)
                pr = plain_collafuse(cfg, a.clients, Path(tmp) / f"plain-{i}")
                plain.append(pr)
                print(f"    {pr.seconds:.1f}s (train {pr.train_seconds:.1f}s, eval {pr.eval_seconds:.1f}s), "
                      f"FID {pr.fid:.3g}", flush=True)
                print(f"[{i + 1}/{a.repeats}] Flower simulation engine (flwr run) ...", flush=True)
                fr = flower_collafuse(overrides, a.clients, Path(tmp) / f"flower-{i}", a.timeout)
                flower.append(fr)
                print(f"    ServerApp {fr['wall_seconds']:.1f}s, whole call {fr['call_seconds']:.1f}s, "
                      f"FID {fr['fid'] if fr['fid'] is None else round(fr['fid'], 3)}", flush=True)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Each repeat is a back-to-back pair, so its ratio sees one machine speed; this 2-core VM's
    # speed drifts by 20 % over minutes, which a ratio of medians across pairs would not cancel.
    app_ratios = [f["wall_seconds"] / pr.seconds for pr, f in zip(plain, flower)]
    call_ratios = [f["call_seconds"] / pr.seconds for pr, f in zip(plain, flower)]
    plain_s = statistics.median(r.seconds for r in plain)
    wall_s = statistics.median(r["wall_seconds"] for r in flower)
    call_s = statistics.median(r["call_seconds"] for r in flower)
    r_app, r_total = statistics.median(app_ratios), statistics.median(call_ratios)
    ok_app, ok_total = r_app <= TARGET, r_total <= TARGET
    spread = (lambda xs: f"  (pairs: {', '.join(f'{x:.3f}' for x in xs)})" if len(xs) > 1 else "")
    print()
    print(f"plain loop            {fmt_seconds(plain_s):>8}")
    print(f"Flower, ServerApp     {fmt_seconds(wall_s):>8}   ratio {r_app:.3f}  (target <= {TARGET})  "
          f"{verdict(ok_app)}{spread(app_ratios)}")
    print(f"Flower, whole call    {fmt_seconds(call_s):>8}   ratio {r_total:.3f}  (target <= {TARGET})  "
          f"{verdict(ok_total)}{spread(call_ratios)}  [includes ~{call_s - wall_s:.0f}s SuperLink/Ray start-up "
          f"and shutdown]")
    plain_ph = [phases(r.round_ends, r.seconds, r.client_seconds, r.server_seconds) for r in plain]
    flower_ph = [phases(f["round_ends"], f["wall_seconds"], f["client_seconds"], f["server_seconds"])
                 for f in flower]
    print("\nwhere the time goes (seconds, median over repeats; Flower counted inside the ServerApp)")
    print(f"{'phase':<30}{'plain':>9}{'Flower':>9}{'extra':>9}")
    phase_table = {}
    for k in plain_ph[0]:
        a_s = statistics.median(p_[k] for p_ in plain_ph)
        b_s = statistics.median(f_[k] for f_ in flower_ph)
        phase_table[k] = {"plain": a_s, "flower": b_s}
        print(f"{k:<30}{a_s:>9.1f}{b_s:>9.1f}{b_s - a_s:>+9.1f}")
    same = all(f["fid"] is not None and abs(f["fid"] - pr.fid) <= 1e-6 * max(1.0, abs(pr.fid))
               for pr, f in zip(plain, flower))
    fids = lambda xs: ", ".join("n/a" if x is None else f"{x:.4f}" for x in xs)  # noqa: E731
    print(f"\nsame work? per-client FID plain {fids(r.fid for r in plain)} / Flower {fids(f['fid'] for f in flower)}: "
          f"{'identical' if same else 'DIFFERENT - the plain loop no longer mirrors the app'}")
    if a.quick:
        print("note: --quick is a code check; the fixed costs dominate such a short job")
    result = {
        "benchmark": "overhead", "command": command_line(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {**cfg.to_flwr(), "output-dir": None}, "num_clients": a.clients, "repeats": a.repeats,
        "threads": a.threads, "quick": a.quick, "same_fid": same,
        "plain_seconds": [r.seconds for r in plain], "plain_train_seconds": [r.train_seconds for r in plain],
        "plain_eval_seconds": [r.eval_seconds for r in plain], "plain_fid": [r.fid for r in plain],
        "plain_round_ends": [r.round_ends for r in plain],
        "plain_client_seconds": [r.client_seconds for r in plain],
        "plain_server_seconds": [r.server_seconds for r in plain],
        "flower_wall_seconds": [r["wall_seconds"] for r in flower],
        "flower_call_seconds": [r["call_seconds"] for r in flower], "flower_fid": [r["fid"] for r in flower],
        "flower_round_ends": [r["round_ends"] for r in flower],
        "flower_client_seconds": [r["client_seconds"] for r in flower],
        "flower_server_seconds": [r["server_seconds"] for r in flower],
        "ratios_serverapp": app_ratios, "ratios_total": call_ratios, "phases": phase_table,
        "ratio_serverapp": r_app, "ratio_total": r_total, "target": TARGET,
        "pass_serverapp": ok_app, "pass_total": ok_total, "machine": machine_info(),
    }
    write_result(a.json, result)
    return 0 if ok_app else 1


if __name__ == "__main__":
    raise SystemExit(main())
