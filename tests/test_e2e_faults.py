"""Faulty ClientApps on Flower's simulation engine, in one run of 4 nodes from round 2 on:
partition 1 ends its process in training (os._exit), partition 2 raises in training and
evaluation. The run goes on without them, reports each by client, and says "degraded".

Naively (Flower 1.42) the actor that partition 1 killed goes back into the pool, every message
it is handed next fails with ActorDiedError - honest nodes' included - and the run fails blaming
them (strategies/isolation.py)."""

from __future__ import annotations

import json
import textwrap

import pytest

from flwr_runs import tiny_run_config

from collafuse_flwr.tools.launch import run_flower

pytestmark = pytest.mark.e2e

FAULTY_APP = '''
"""collafuse-flwr's ClientApp, except that from round 2 on partition 1 ends its process in
training and partition 2 crashes in training and evaluation (a wrapper of the whole app,
whatever its handlers are named)."""
import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from collafuse_flwr import client_app as real


class Faulty(ClientApp):
    def __call__(self, message: Message, context: Context) -> Message:
        action = message.metadata.message_type.split(".")[0]
        if action in ("train", "evaluate") and int(message.content["config"]["server-round"]) >= 2:
            partition = int(context.node_config["partition-id"])
            if partition == 1 and action == "train" and int(message.content["config"]["server-round"]) == 2:
                os._exit(1)
            if partition == 2:
                raise RuntimeError("this node died")
        return real.app(message, context)


app = Faulty()
'''

PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "faulty-collafuse"
version = "0.1.0"
dependencies = ["collafuse-flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "collafuse_flwr.server_app:app"
clientapp = "faulty_app:app"

[tool.flwr.app.config]
'''


def _config_table() -> str:
    """collafuse-flwr's own run-config keys: Flower accepts overrides only of keys the app declares."""
    from collafuse_flwr.config import load_defaults

    def toml(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else str(v)

    return "\n".join(f"{k} = {toml(v)}" for k, v in load_defaults().items()) + "\n"


def test_nodes_that_die_or_kill_their_worker_take_no_other_client_down(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "faulty_app.py").write_text(textwrap.dedent(FAULTY_APP))
    (app_dir / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT) + _config_table())
    rc = tiny_run_config(f"attack-reference-steps=0 cut-ratio=0.3 min-available-fraction=0.5 "
                         f"output-dir='{tmp_path / 'out'}'")
    out = run_flower(rc, num_clients=4, app_dir=app_dir, flwr_home=tmp_path / "home", timeout=600, stream=False,
                     client_cpus=1)
    assert out.ok, f"status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    (run,) = (tmp_path / "out").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "degraded", res.get("error")
    f = res["final"]
    # only the two faulty clients are blamed: partition 1's round-2 train (its worker died, once);
    # partition 2's round-2 train and evaluate
    assert sorted(f["failed_replies_by_client"]) == ["1", "2"] and f["failed_replies"] == 3
    assert "ActorDiedError" in next(iter(f["failed_replies_by_client"]["1"]))
    assert "this node died" in next(iter(f["failed_replies_by_client"]["2"]))
    assert {"0", "1", "3"} <= set(f["fid_per_client"]) and "2" not in f["fid_per_client"]
    assert any("failed or missing" in r for r in res["status_reasons"])
    assert "client 2" in out.log and "replaced it with a fresh one" in out.log
