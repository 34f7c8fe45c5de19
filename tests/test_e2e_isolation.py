"""A ClientApp that ends its process on Flower's simulation engine kills the Ray actor it ran on;
the other nodes' messages must not die with it (strategies/isolation.py).

Naively (Flower 1.42) the dead actor goes back into the pool, every message it is handed next
fails with ActorDiedError - honest nodes' included - and the run fails blaming them.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from collafuse_flwr.tools.launch import run_flower
from flwr_runs import tiny_run_config
from test_e2e_dropout import PYPROJECT, _config_table

pytestmark = pytest.mark.e2e

DYING_APP = '''
"""collafuse-flwr's ClientApp, except that partition 1 ends its process at its round-2 training."""
import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from collafuse_flwr.client_app import app as real

app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return real(msg, context)


@app.train("collafuse")
def train(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) == 2:
        os._exit(1)
    return real(msg, context)


@app.evaluate("collafuse")
def evaluate(msg: Message, context: Context) -> Message:
    return real(msg, context)
'''


def test_a_client_that_kills_its_worker_takes_no_other_client_down(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "dying_app.py").write_text(textwrap.dedent(DYING_APP))
    (app_dir / "pyproject.toml").write_text(
        textwrap.dedent(PYPROJECT).replace("faulty_app:app", "dying_app:app").replace("faulty-collafuse", "dying")
        + _config_table())
    rc = tiny_run_config(f"attack-reference-steps=0 cut-ratio=0.3 min-available-fraction=0.5 "
                         f"output-dir='{tmp_path / 'out'}'")
    out = run_flower(rc, num_clients=4, app_dir=app_dir, flwr_home=tmp_path / "home", timeout=600, stream=False,
                     client_cpus=1)
    assert out.ok, f"status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    (run,) = (tmp_path / "out").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "degraded", res.get("error")
    f = res["final"]
    assert list(f["failed_replies_by_client"]) == ["1"]  # only the client that died
    assert "ActorDiedError" in next(iter(f["failed_replies_by_client"]["1"]))
    assert {"0", "2", "3"} <= set(f["fid_per_client"])  # every other client trained and evaluated
    assert "replaced it with a fresh one" in out.log
