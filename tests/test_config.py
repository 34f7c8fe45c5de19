"""Run-config validation: one schema, clear messages naming the key, the value and the fix."""

import pytest

from collafuse_flwr.config import ConfigError, load_defaults, parse_config, run_dir


def test_pyproject_defaults_are_valid():
    cfg = parse_config({})
    assert cfg.method == "collafuse" and cfg.dataset == "mnist5k"
    assert cfg.cut_step == round(cfg.cut_ratio * cfg.diffusion_steps)
    assert set(load_defaults()) == {k for k in cfg.to_flwr()}


@pytest.mark.parametrize("override,match", [
    ({"cut-ratio": 1.5}, r"cut-ratio must be in \[0, 1\]"),
    ({"cut-ratio": -0.1}, "cut-ratio"),
    ({"method": "fedprox"}, r"method='fedprox' is not one of"),
    ({"dataset": "imagenet"}, "dataset='imagenet'"),
    ({"dataset": "mnist"}, "set data-dir"),
    ({"data-dir": "relative/path", "dataset": "mnist"}, "absolute path"),
    ({"num-server-rounds": 0}, "num-server-rounds must be >= 1"),
    ({"batch-size": 2.5}, "batch-size must be an integer"),
    ({"batch-size": float("inf")}, "batch-size must be an integer"),  # TOML allows inf; int(inf) overflows
    ({"server-steps": float("inf")}, "server-steps must be"),
    ({"learning-rate": "fast"}, "learning-rate must be a number"),
    ({"count-flops": "maybe"}, "count-flops must be true or false"),
    ({"test-fraction": 1.0}, "test-fraction"),
    ({"model-size": "huge"}, "model-size"),
    ({"torch-threads": -1}, "torch-threads must be >= 0"),
    ({"no-such-key": 1}, r"unknown run-config key 'no-such-key' \(= 1\); valid keys: \[.*'cut-ratio'"),
    ({"cut-rato": 0.4}, r"unknown run-config key 'cut-rato' \(= 0.4\): did you mean 'cut-ratio'\?$"),
])
def test_bad_values_name_key_and_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(override)


def test_collafuse_needs_client_steps_inside_the_cut():
    with pytest.raises(ConfigError, match="local-steps"):
        parse_config({"cut-ratio": 0.5, "local-steps": 0})
    parse_config({"cut-ratio": 0.0, "local-steps": 0})  # server-only needs none


def test_options_a_method_ignores_warn():
    with pytest.warns(UserWarning, match="cut-ratio=0.5 is ignored by method='fedavg'"):
        parse_config({"method": "fedavg", "cut-ratio": 0.5})


def test_run_dir_is_absolute_and_unique(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path)})
    a, b = run_dir(cfg, 1), run_dir(cfg, 2)
    assert a.is_absolute() and a.parent == tmp_path and a != b
    assert "collafuse-c0.2-mnist5k" in a.name


def test_an_installed_wheel_carries_the_run_config_defaults(tmp_path):
    """Someone else's app that uses this ClientApp from an installed wheel (no source tree, so no
    pyproject.toml beside the package) still gets every default, not 'run-config lacks [...]', and
    `collafuse-run --preset` its presets."""
    import subprocess
    import sys
    import zipfile

    from collafuse_flwr.config import PYPROJECT, load_defaults

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(PYPROJECT.parent)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import collafuse_flwr.config as c; "
            "print(c.PYPROJECT.parent.name, len(c.load_defaults()), ','.join(c.preset_names()), len(c.preset('tiny')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    from collafuse_flwr.config import preset, preset_names

    assert out == ["collafuse_flwr", str(len(load_defaults())), ",".join(preset_names()), str(len(preset("tiny")))]


def test_every_preset_is_a_valid_set_of_overrides_and_round_trips_through_flowers_parser():
    from flwr.common.config import parse_config_args

    from collafuse_flwr.config import preset, preset_names, run_config_text

    assert {"tiny", "quick", "paper", "gpu"} <= set(preset_names())
    for name in preset_names():
        overrides = preset(name)
        assert overrides and set(overrides) <= set(load_defaults())
        assert parse_config_args([run_config_text(overrides)]) == overrides
    tiny = parse_config(preset("tiny"))
    assert (tiny.model_size, tiny.image_size, tiny.diffusion_steps, tiny.dataset) == ("tiny", 8, 20, "digits")


def test_a_bad_or_unknown_preset_is_refused_naming_the_file_and_the_choices(tmp_path, monkeypatch):
    from collafuse_flwr import config

    with pytest.raises(ConfigError, match=r"unknown preset 'papr'.*'paper'"):
        config.preset("papr")
    (tmp_path / "broken.toml").write_text("cut-ratio = 1.5\n")
    monkeypatch.setattr(config, "PRESET_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"preset broken \(.*broken.toml\): cut-ratio must be in \[0, 1\]"):
        config.preset("broken")
