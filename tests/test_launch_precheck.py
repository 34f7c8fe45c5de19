"""collafuse-run checks the run-config before any engine starts, and finds the app folder the
user named: a bad key or value costs one line and exit 2, not a minute of start-up and a
traceback; `--app examples/custom_serverapp` works from the checkout's root."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from collafuse_flwr.tools import launch
from collafuse_flwr.tools.launch import APP_DIR, main
from collafuse_flwr.tools.precheck import RunConfigError, check_run_config, parse_overrides

EXAMPLE = APP_DIR / "examples" / "custom_serverapp"


def _cli(tmp_path: Path, run_config: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "collafuse_flwr.tools.launch", "--num-clients", "2",
                          "--flwr-home", str(tmp_path / "flwr-home"), "--run-config", run_config],
                         capture_output=True, text=True, cwd=APP_DIR, timeout=120)
    return res, time.time() - t0


def test_key_typo_is_refused_at_once_naming_the_key_and_the_fix(tmp_path):
    res, took = _cli(tmp_path, "cut-rato=0.4")
    print(f"typo refused in {took:.2f} s")  # measured, not asserted (speed targets live in benchmarks/)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "'cut-rato'" in lines[0] and "0.4" in lines[0] and "did you mean 'cut-ratio'?" in lines[0]
    assert not (tmp_path / "flwr-home").exists()  # no SuperLink was started: it would live there
    assert "flwr run" not in res.stdout


def test_bad_value_is_refused_naming_key_and_range(tmp_path):
    res, took = _cli(tmp_path, "cut-ratio=2")
    print(f"bad value refused in {took:.2f} s")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cut-ratio" in lines[0] and "[0, 1]" in lines[0] and "2.0" in lines[0]
    assert not (tmp_path / "flwr-home").exists()


def test_no_superlink_is_started_for_a_bad_config(monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("run_flower was called for a run-config that cannot work")

    monkeypatch.setattr(launch, "run_flower", must_not_run)
    assert main(["--run-config", "method='fedavgg'"]) == 2
    assert "method='fedavgg' is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("text, match", [
    ("method=fedavg", r"method=fedavg: not a TOML value; quote strings \(method='fedavg'\)"),
    ("cut-ratio 0.4", r"cannot read 'cut-ratio 0.4' as key=value"),
    ("cut-ratio=0.2 cut-ratio=0.4", r"\['cut-ratio'\] more than once"),
    ("/no/such/overrides.toml", "no such file"),
])
def test_overrides_flower_would_misread_are_named(text, match):
    with pytest.raises(RunConfigError, match=match):
        parse_overrides(text)


def test_overrides_are_read_as_flower_reads_them(tmp_path):
    assert parse_overrides("cut-ratio=0.4 method='fedavg' server-overlap=false client-groups='0,1;2,3'") == {
        "cut-ratio": 0.4, "method": "fedavg", "server-overlap": False, "client-groups": "0,1;2,3"}
    toml = tmp_path / "over.toml"
    toml.write_text('cut-ratio = 0.6\nmethod = "local"\n')
    assert parse_overrides(str(toml)) == {"cut-ratio": 0.6, "method": "local"}


def test_valid_config_passes_and_is_validated_with_the_apps_defaults():
    cfg = check_run_config(APP_DIR, "cut-ratio=0.4 method='fedavg'", num_clients=3)
    assert cfg is not None and cfg.cut_ratio == 0.4 and cfg.method == "fedavg"


def test_one_cut_ratio_per_client():
    with pytest.raises(RunConfigError, match="2 entries for --num-clients 3"):
        check_run_config(APP_DIR, "client-cut-ratios='0.2,0.4'", num_clients=3)
    check_run_config(APP_DIR, "client-cut-ratios='0.2,0.4,0.6'", num_clients=3)


def test_another_app_using_this_projects_config_is_checked_against_its_own_table():
    cfg = check_run_config(EXAMPLE, "cut-ratio=0.5", num_clients=3)
    assert cfg is not None and cfg.cut_ratio == 0.5 and cfg.diffusion_steps == 20  # the example's own default
    with pytest.raises(RunConfigError, match=r"did you mean 'cut-ratio'\?"):
        check_run_config(EXAMPLE, "cut-rato=0.5", num_clients=3)
    with pytest.raises(RunConfigError, match=r"cut-ratio must be in \[0, 1\]"):
        check_run_config(EXAMPLE, "cut-ratio=1.5", num_clients=3)
    # a key of this project that the example does not list: Flower would refuse the override
    with pytest.raises(RunConfigError, match=r"'dataset' is a key of collafuse-flwr.*add dataset = \"digits\" to"):
        check_run_config(EXAMPLE, "dataset='digits'", num_clients=3)


def test_an_app_with_its_own_schema_is_held_only_to_flowers_rule(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.flwr.app]\npublisher = "x"\n[tool.flwr.app.components]\nserverapp = "mine:app"\n'
        'clientapp = "mine:client"\n[tool.flwr.app.config]\nlr = 0.1\nrounds = 3\n')
    assert check_run_config(tmp_path, "lr=5.0 rounds=-1", num_clients=2) is None  # its values are its business
    with pytest.raises(RunConfigError, match=r"'lrr' \(= 0.2\): did you mean 'lr'\?"):
        check_run_config(tmp_path, "lrr=0.2", num_clients=2)


@pytest.fixture
def captured_run(monkeypatch):
    seen = {}

    def fake_run_flower(run_config, num_clients, app_dir, *args, **kwargs):
        seen.update(run_config=run_config, num_clients=num_clients, app_dir=app_dir)
        return launch.RunOutcome(1, "finished:completed", 0, None, "", 0, 0)

    monkeypatch.setattr(launch, "run_flower", fake_run_flower)
    return seen


@pytest.mark.parametrize("cwd, arg", [(".", "examples/custom_serverapp"), ("examples", "custom_serverapp"),
                                      ("examples/custom_serverapp", ".")])
def test_app_is_resolved_once_against_the_current_folder(monkeypatch, captured_run, cwd, arg):
    monkeypatch.chdir(APP_DIR / cwd)
    assert main(["--app", arg, "--num-clients", "3"]) == 0
    assert captured_run["app_dir"] == EXAMPLE and captured_run["app_dir"].is_absolute()


def test_a_relative_overrides_file_is_made_absolute(monkeypatch, captured_run, tmp_path):
    (tmp_path / "over.toml").write_text("cut-ratio = 0.5\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--run-config", "over.toml"]) == 0
    assert captured_run["run_config"] == str(tmp_path / "over.toml")  # flwr reads it from the app folder


def test_run_flower_runs_flwr_on_the_resolved_folder(monkeypatch, tmp_path):
    """flwr runs in the app folder; a relative folder passed to it as well would be resolved twice."""
    seen = {}

    class Started(Exception):
        pass

    def fake_popen(cmd, cwd=None, **kwargs):
        seen.update(cmd=cmd, cwd=cwd)
        raise Started

    monkeypatch.setattr(launch.subprocess, "Popen", fake_popen)
    monkeypatch.chdir(APP_DIR)
    with pytest.raises(Started):
        launch.run_flower("", 3, Path("examples/custom_serverapp"), flwr_home=tmp_path / "home", stream=False)
    assert seen["cmd"][1:3] == ["run", str(EXAMPLE)] and seen["cwd"] == str(EXAMPLE)


def test_a_preset_is_the_base_and_the_command_line_wins(captured_run):
    from flwr.common.config import parse_config_args

    from collafuse_flwr.config import preset

    assert main(["--preset", "quick", "--run-config", "num-server-rounds=3 cut-ratio=0.4"]) == 0
    sent = parse_config_args([captured_run["run_config"]])  # what flwr will read
    assert sent == {**preset("quick"), "num-server-rounds": 3, "cut-ratio": 0.4}
    assert preset("quick")["num-server-rounds"] == 2  # the file's own value was overridden, not edited
    assert main(["--preset", "tiny", "--run-config", "cut-rato=0.4"]) == 2  # still checked before a run


def test_the_launcher_reads_only_the_lines_it_means_from_the_log():
    """The run id, the announced run folder and the results folder come from flwr's and the
    ServerApp's own lines; a user's line that merely contains the same words does not count."""
    from collafuse_flwr.tools.launch import _output_dir, announced_dir, started_run_id

    log = ("my note; outputs go to /elsewhere (on the machine x)\n"
           "INFO :      collafuse-flwr: method=collafuse; outputs go to /runs/a b (on the machine that runs it)\n"
           "Successfully started run 4711\n"
           "collafuse-flwr: results in /runs/old\ncollafuse-flwr: results in /runs/a b\n")
    assert announced_dir(log) == Path("/runs/a b") and started_run_id(log) == 4711
    assert _output_dir(log) == Path("/runs/a b")
    assert started_run_id("Successfully started run ²") is None and started_run_id("nothing") is None


def test_a_failed_run_says_why_on_its_last_line_also_when_quiet(monkeypatch, tmp_path, capsys):
    """Under --quiet a failed run printed only 'finished:failed; outputs: ...': the reason was in
    results.json alone. It is now the last line."""
    (tmp_path / "results.json").write_text('{"status": "failed", "error": "FileNotFoundError: data_dir\\n'
                                           '/data/mnist does not exist; or set download=true"}')
    monkeypatch.setattr(launch, "run_flower", lambda *a, **k: launch.RunOutcome(
        1, "finished:failed", 1, tmp_path, "", 0, 0))
    assert main(["--quiet"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "why: FileNotFoundError: data_dir /data/mnist does not exist; or set download=true"


def test_client_gpus_without_a_gpu_is_refused_before_anything_starts(monkeypatch, captured_run, capsys):
    """Naively Flower's engine starts, finds no GPU for its actors and fails after ~30 s ('ActorPool
    is empty'), and the run was recorded as stopped."""
    monkeypatch.setattr(launch, "_cuda_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["--client-gpus", "0.2"])
    assert exc.value.code == 2 and "torch sees no CUDA GPU" in capsys.readouterr().err and not captured_run


def test_a_missing_data_dir_or_fid_weights_file_is_one_line_before_flower_starts(tmp_path):
    """Naively these passed the check and the simulation failed ~1 minute later, inside the nodes."""
    with pytest.raises(RunConfigError, match=r"data-dir='.*nothing' is not a folder .* or set download=true"):
        check_run_config(APP_DIR, f"dataset='mnist' data-dir='{tmp_path}/nothing'", num_clients=2)
    assert check_run_config(APP_DIR, f"dataset='mnist' data-dir='{tmp_path}/new' download=true", num_clients=2)
    assert check_run_config(APP_DIR, f"dataset='digits' data-dir='{tmp_path}/nothing'", num_clients=2)  # unread
    with pytest.raises(RunConfigError, match=r"fid-weights='.*none.pth' is not a file"):
        check_run_config(APP_DIR, f"fid-weights='{tmp_path}/none.pth'", num_clients=2)
