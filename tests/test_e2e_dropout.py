"""A ClientApp that dies for one partition, on Flower's simulation engine: the run goes on
without it, reports it by client, and says "degraded" instead of "ok"."""

from __future__ import annotations

import json
import textwrap

import pytest

from flwr_runs import tiny_run_config

from collafuse_flwr.tools.launch import run_flower

pytestmark = pytest.mark.e2e

FAULTY_APP = '''
"""collafuse-flwr's ClientApp, except that partition 1 crashes in its train and evaluate handlers
from round 2 on (a wrapper of the whole app, whatever its handlers are named)."""
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from collafuse_flwr import client_app as real


class Faulty(ClientApp):
    def __call__(self, message: Message, context: Context) -> Message:
        if (message.metadata.message_type.split(".")[0] in ("train", "evaluate")
                and int(context.node_config["partition-id"]) == 1
                and int(message.content["config"]["server-round"]) >= 2):
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


def test_a_node_that_dies_in_the_simulation_does_not_stop_the_run(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "faulty_app.py").write_text(textwrap.dedent(FAULTY_APP))
    (app_dir / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT) + _config_table())
    rc = tiny_run_config(f"attack-reference-steps=0 cut-ratio=0.3 min-available-fraction=0.5 "
                         f"output-dir='{tmp_path / 'out'}'")
    out = run_flower(rc, num_clients=3, app_dir=app_dir, flwr_home=tmp_path / "home", timeout=600, stream=False,
                     client_cpus=1)
    assert out.ok, f"status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    (run,) = (tmp_path / "out").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "degraded" and res["final"]["failed_replies"] == 2  # its round-2 train and evaluate
    assert sorted(res["final"]["fid_per_client"]) == ["0", "2"]
    assert any("1 failed or missing" in r or "2 failed or missing" in r for r in res["status_reasons"])
    assert "client 1" in out.log and "this node died" in out.log
