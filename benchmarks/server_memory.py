"""Does the server's memory stay flat as rounds grow? CollaFuse's upload buffer, 10 vs 50 rounds.

The ServerApp keeps every node's x_tc uploads to train the shared denoiser. Uncapped, the buffer
grows by nodes x uploads-per-round images each round and is re-concatenated every round; with
`server-buffer-size` it is capped (oldest rows of the largest holder go first). This benchmark
drives the real `CollaFuse` strategy (validation, buffer, server training steps) with
well-formed uploads from 5 simulated nodes and reads the process's peak RSS, each setting in a
fresh process so one does not inherit the other's peak.

    python -m benchmarks.server_memory            # 10 and 50 rounds, capped and uncapped
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from .common import RESULTS_DIR, machine_info, write_result

NODES, UPLOADS, SIZE = 5, 256, 32  # 5 nodes x 256 uploads of 3x32x32 per round: 3 MB a round


def one(rounds: int, cap: int) -> dict:
    """Run `rounds` rounds in this process; peak RSS in MB and the final buffer size."""
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from collafuse_flwr.core import diffusion as D
    from collafuse_flwr.core.models import build_denoiser
    from strategies import CollaFuse

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    torch.set_num_threads(1)

    class Grid:
        def get_node_ids(self):
            return list(range(1, NODES + 1))

        def send_and_receive(self, messages, *, timeout=None):
            return [_reply(m, RecordDict({"metrics": MetricRecord({"partition-id": m.metadata.dst_node_id - 1})}))
                    for m in messages]

    def _reply(m, content):
        m.metadata.__dict__["_message_id"] = f"m{id(m)}"
        r = Message(content=content, reply_to=m)
        r.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
        return r

    model = build_denoiser(SIZE, 3, "tiny")
    s = CollaFuse(model, (3, SIZE, SIZE), diffusion_steps=100, cut_ratio=0.2, server_steps=1, batch_size=8,
                  uploads_per_round=UPLOADS, buffer_size=cap or None, count_flops=False)
    s.num_rounds = rounds
    rng = np.random.default_rng(0)
    for rnd in range(1, rounds + 1):
        msgs = list(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), Grid()))
        def x_tc():  # what an honest node uploads: images in [-1, 1] diffused to t_c
            x0 = torch.from_numpy(rng.uniform(-1, 1, (UPLOADS, 3, SIZE, SIZE)).astype(np.float32))
            return D.upload(s.sched, x0, s.t_c).numpy().astype(np.float32)

        replies = [_reply(m, RecordDict({"upload": ArrayRecord({"x_tc": Array(x_tc())}),
                                         "metrics": MetricRecord({"num-examples": 1000})})) for m in msgs]
        s.aggregate_train(rnd, replies)
    buffered = sum(t.shape[0] for ts in s.buffer.values() for t in ts)
    return {"rounds": rounds, "cap": cap, "buffered_uploads": buffered, "rejected": dict(s.recorder.rejected),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=2, type=int, metavar=("ROUNDS", "CAP"), help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, default=2560, help="server-buffer-size for the capped runs")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return 0
    rows = []
    for cap in (args.cap, 0):
        for rounds in (10, 50):
            out = subprocess.run([sys.executable, "-m", "benchmarks.server_memory", "--one", str(rounds), str(cap)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"cap={cap or 'none':>5}  rounds={rounds:>3}  buffered={rows[-1]['buffered_uploads']:>6}  "
                  f"peak RSS={rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    capped = [r for r in rows if r["cap"]]
    growth = capped[1]["peak_rss_mb"] - capped[0]["peak_rss_mb"]
    result = {"rows": rows, "capped_growth_10_to_50_rounds_mb": growth,
              "uncapped_growth_10_to_50_rounds_mb": rows[3]["peak_rss_mb"] - rows[2]["peak_rss_mb"],
              "setting": f"{NODES} nodes x {UPLOADS} uploads of 3x{SIZE}x{SIZE} per round, tiny UNet, 1 server step",
              "machine": machine_info()}
    write_result(RESULTS_DIR / "server_memory.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
