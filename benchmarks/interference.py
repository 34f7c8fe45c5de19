"""How much light background CPU load slows the 2-thread training the engine runs.

    python -m benchmarks.interference              # 3 alternations, ~9 min on 2 cores
    python -m benchmarks.interference --load 0.05  # 5 % of one core per poller

Why it exists: a hypothesis about benchmarks/overhead.py. During a Flower simulation the
SuperLink, SuperExec, the simulation's dispatcher threads, Ray's raylet/GCS/agents and
`flwr run --stream` together use a few percent of the CPU (they poll and heartbeat several
times a second; /proc sampling put it at ~3-5 % of this 2-core machine), and the Ray worker
that trains runs at nice 15. torch trains with 2 OpenMP threads that meet at a barrier after
every operation, so a core taken for a moment stalls both threads, and a small background load
could cost the training much more than its own share. This measures that amplification on its
own, without Flower: the same client training block (the app's default model and client steps)
alone and next to `--pollers` processes that each wake every `--period` seconds and burn
`--load` of a core, alternating so the machine's drift hits all settings alike; once more at
nice 15 with the load, as the Ray worker runs; and next to an idle Ray cluster (its daemons and
one idle actor, started as Flower's Ray backend starts it), the engine's own background.

The last setting tests the hypothesis most directly: the same block in its own process while a
whole Flower simulation is up (SuperLink, SuperExec, the simulation process with its dispatcher and
ServerApp, Ray's daemons and the ClientApp worker), with the worker paused (SIGSTOP) so that
everything the engine runs in the background keeps running but its compute does not. If the
engine's background slows training, this setting shows it, as far as this VM's drift allows.
`--no-engine` skips it (each alternation starts one Flower run, ~40 s).

Writes benchmarks/results/interference.json (or --json PATH). No target: a diagnostic for
what benchmarks/overhead.py measures.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import RESULTS_DIR, command_line, machine_info, write_result

TRAIN = r"""
import os, sys, time, torch
torch.set_num_threads(2)
if int(sys.argv[1]):
    os.nice(int(sys.argv[1]))
from collafuse_flwr import diffusion as D
from collafuse_flwr.client_data import client_data
from collafuse_flwr.config import load_defaults, parse_config
from collafuse_flwr.models import build_denoiser
from collafuse_flwr.training import client_share_loss, make_optimizer, train_steps
cfg = parse_config(load_defaults())
data = client_data(cfg, 0, 5)
sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
t_c = D.cut_step(cfg.cut_ratio, cfg.diffusion_steps)
model = build_denoiser(cfg.image_size, data.image_shape[0], cfg.model_size)
opt = make_optimizer(model, cfg.learning_rate)
for _ in range(int(sys.argv[2])):
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    train_steps(model, opt, client_share_loss(model, sched, t_c, gen), data.train, cfg.local_steps,
                cfg.batch_size, gen, torch.device("cpu"))
    print(time.perf_counter() - t, flush=True)
"""

IDLE_RAY = r"""
import sys, ray
ray.init(num_cpus=2, include_dashboard=False)  # as Flower's Ray backend starts it


@ray.remote(num_cpus=2)
class Idle:
    def ping(self):
        return 1


actor = Idle.remote()
ray.get(actor.ping.remote())
print("ready", flush=True)
sys.stdin.readline()  # until the parent closes our stdin; then ray shuts down cleanly at exit
"""

POLLER = r"""
import sys, time
period, load = float(sys.argv[1]), float(sys.argv[2])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < load * period:
        pass
    time.sleep(period)
"""


def _train(nice: int, blocks: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", TRAIN, str(nice), str(blocks)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [float(x) for x in out.split()][1:]  # the first block warms up


def _with_load(pollers: int, period: float, load: float, nice: int, blocks: int) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", POLLER, str(period), str(load)]) for _ in range(pollers)]
    try:
        return _train(nice, blocks)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _next_to_idle_ray(blocks: int) -> list[float]:
    """The training block while an idle Ray cluster (daemons plus one idle actor) is up."""
    proc = subprocess.Popen([sys.executable, "-c", IDLE_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the idle Ray cluster did not start")
        return _train(0, blocks)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _worker_pids() -> list[int]:
    """Flower's Ray workers (their process title is `ray::ClientAppActor...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"ClientAppActor" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _inside_paused_engine(blocks: int, start_timeout: float = 180.0) -> list[float]:
    """The training block while a Flower simulation is up and its ClientApp worker is paused."""
    from collafuse_flwr.launch import run_flower

    # A short job: the ServerApp waits for the paused worker's reply, then finishes quickly.
    job = {"num-server-rounds": 1, "model-size": "tiny", "local-steps": 2, "server-steps": 2,
           "num-eval-samples": 4, "uploads-per-round": 4, "attack-reference-steps": 0, "count-flops": False}
    outcome: list = []
    run = threading.Thread(target=lambda: outcome.append(run_flower(job, num_clients=2, stream=False)))
    run.start()
    deadline = time.time() + start_timeout
    while not (pids := _worker_pids()) and run.is_alive() and time.time() < deadline:
        time.sleep(0.5)
    if not pids:
        run.join()
        raise RuntimeError("the Flower run never started a ClientApp worker; run `python -m "
                           "collafuse_flwr.launch` to see why, or pass --no-engine")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.0)  # let the ServerApp settle into waiting
        return _train(0, blocks)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        run.join()
        if outcome and not outcome[0].ok:
            print(f"  (the paused engine's own run ended {outcome[0].status})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interference", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--pollers", type=int, default=2)
    p.add_argument("--period", type=float, default=0.03, help="seconds between a poller's wake-ups")
    p.add_argument("--load", type=float, default=0.05, help="share of one core each poller burns")
    p.add_argument("--rounds", type=int, default=3, help="alternations of all the settings")
    p.add_argument("--blocks", type=int, default=3, help="timed training blocks per setting and round")
    p.add_argument("--no-engine", action="store_true", help="skip the 'inside a paused Flower engine' setting")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "interference.json")
    a = p.parse_args(argv)
    if a.pollers < 1 or a.rounds < 1 or a.blocks < 1 or not 0 < a.load < 1 or a.period <= 0:
        p.error("need --pollers/--rounds/--blocks >= 1, 0 < --load < 1 and --period > 0")
    settings = {"alone": lambda: _train(0, a.blocks + 1),
                "with load": lambda: _with_load(a.pollers, a.period, a.load, 0, a.blocks + 1),
                "with load, nice 15": lambda: _with_load(a.pollers, a.period, a.load, 15, a.blocks + 1),
                "next to idle Ray": lambda: _next_to_idle_ray(a.blocks + 1)}
    if not a.no_engine:
        settings["inside paused Flower"] = lambda: _inside_paused_engine(a.blocks + 1)
    times: dict[str, list[float]] = {k: [] for k in settings}
    per_alt: dict[str, list[float]] = {k: [] for k in settings}  # each alternation's median block
    background = a.pollers * a.load / (os.cpu_count() or 1)
    print(f"client training block ({'/'.join(settings)}), {a.pollers} pollers x {a.load:.0%} of a core "
          f"= {background:.1%} of the machine, {a.rounds} alternations", flush=True)
    for r in range(a.rounds):
        for name, run in settings.items():
            blocks = run()
            times[name] += blocks
            per_alt[name].append(statistics.median(blocks))
            print(f"  [{r + 1}/{a.rounds}] {name:<20} median so far {statistics.median(times[name]):.2f} s", flush=True)
    # The verdict compares each setting with 'alone' inside the same alternation (a minute apart),
    # then takes the median over alternations: this VM's speed drifts by ~2x over minutes, which a
    # ratio of overall medians would mix into the result.
    print(f"\n{'setting':<22}{'median s':>10}{'slowdown':>10}   per alternation")
    rows = {}
    for name, ts in times.items():
        ratios = [x / b for x, b in zip(per_alt[name], per_alt["alone"])]
        slow = statistics.median(ratios)
        rows[name] = {"seconds": ts, "median": statistics.median(ts), "per_alternation_median": per_alt[name],
                      "per_alternation_ratio": ratios, "slowdown": slow}
        print(f"{name:<22}{statistics.median(ts):>10.2f}{slow:>9.2f}x   {', '.join(f'{r:.2f}' for r in ratios)}")
    result = {"benchmark": "interference", "command": command_line(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "pollers": a.pollers, "period": a.period, "load": a.load, "background_share": background,
              "settings": rows, "machine": machine_info()}
    write_result(a.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
