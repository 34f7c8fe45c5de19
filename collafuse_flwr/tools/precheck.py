"""Check `collafuse-run`'s run-config before any engine starts.

Why: Flower checks it only after a minute of start-up, then says "Invalid run configuration" without
naming the key, or the ServerApp fails with a traceback. Here Flower's own parser and rule (an
override must name a key of `[tool.flwr.app.config]`) and, for this project's apps, `parse_config`
make a mistake cost seconds and one line naming the key, the value and the fix.
"""

from __future__ import annotations

import re
import tomllib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from collafuse_flwr.config import (ConfigError, RunConfig, load_defaults, parse_config, run_config_text,
                                   unknown_keys_message, valid_keys)
from collafuse_flwr.data.dataset import _EMBEDDED as EMBEDDED
from collafuse_flwr.data.dataset import HF_PREFIX, canonical_name

#: how `flwr run` splits --run-config into pairs (flwr.common.config.parse_config_args)
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


class RunConfigError(ValueError):
    """The --run-config cannot work; the message is one line naming the key, value and fix."""


def parse_overrides(text: str) -> dict[str, Any]:
    """The overrides as `flwr run --run-config text` reads them (Flower's parser), after catching what
    Flower lets through silently (no key=value) or reports without naming the pair (bad TOML, a key twice)."""
    from flwr.common.config import parse_config_args

    text = text.strip()
    if not text:
        return {}
    if text.endswith(".toml") and len(text.split()) == 1:
        if not Path(text).is_file():
            raise RunConfigError(f"--run-config {text}: no such file (give a TOML file of overrides, or "
                                 f"key=value pairs)")
        try:
            return parse_config_args([text])
        except Exception as exc:  # noqa: BLE001 - tomli's or Flower's; the message says which line
            raise RunConfigError(f"--run-config {text}: not a TOML table of overrides ({exc})") from None
    leftover = _PAIR.sub(" ", text).split()
    if leftover:
        raise RunConfigError(f"--run-config: cannot read {' '.join(leftover)!r} as key=value (no spaces around "
                             f"'='; quote strings; e.g. --run-config \"cut-ratio=0.4 method='fedavg'\")")
    pairs = _PAIR.findall(text)
    twice = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    if twice:
        raise RunConfigError(f"--run-config gives {twice} more than once; give each key once")
    for key, value in pairs:
        try:
            tomllib.loads(f"{key} = {value}")
        except tomllib.TOMLDecodeError:
            raise RunConfigError(f"--run-config {key}={value}: not a TOML value; quote strings "
                                 f"({key}='{value.strip(chr(39) + chr(34))}'), numbers and true/false go bare"
                                 ) from None
    try:
        return parse_config_args([text])
    except Exception as exc:  # noqa: BLE001 - Flower's ClickException carries its own explanation
        raise RunConfigError(f"--run-config {text!r}: {getattr(exc, 'message', exc)}") from None


def app_table(app_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the app's flattened [tool.flwr.app.config], its [tool.flwr.app.components])."""
    from flwr.common.config import flatten_dict

    with open(app_dir / "pyproject.toml", "rb") as f:
        app = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {})
    return flatten_dict(app.get("config", {})), dict(app.get("components", {}))


def check_run_config(app_dir: Path, text: str, num_clients: int) -> RunConfig | None:
    """Raise RunConfigError for a run-config that `flwr run` would reject or the app would fail on;
    return the validated RunConfig (None for an app with a schema of its own)."""
    overrides = parse_overrides(text)
    config, components = app_table(app_dir)
    where = f"{app_dir / 'pyproject.toml'} [tool.flwr.app.config]"
    foreign = {k: v for k, v in overrides.items() if k not in config}
    if foreign:
        ours = sorted(set(foreign) & set(valid_keys()))
        if ours and len(ours) == len(foreign):
            add = " and ".join(run_config_text({k: foreign[k]}).replace("=", " = ", 1) for k in ours)
            raise RunConfigError(f"{', '.join(map(repr, ours))} {'is a key' if len(ours) == 1 else 'are keys'} of "
                                 f"collafuse-flwr, but Flower accepts overrides only of keys the app lists: add "
                                 f"{add} to {where}")
        raise RunConfigError(unknown_keys_message(foreign, sorted(config), where=f"the keys of {where}"))
    ours_app = any(str(c).startswith("collafuse_flwr.") for c in components.values())
    if not ours_app or not set(config) <= set(valid_keys()):  # another app's schema: the launcher cannot know it
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = parse_config({**config, **overrides}, defaults=load_defaults())
        except (ConfigError, ValueError) as exc:  # diffusion's step checks raise ValueError
            raise RunConfigError(" ".join(str(exc).split())) from None
    for w in caught:
        print(f"collafuse-run: warning: {w.message}", flush=True)
    if cfg.resume_from:  # an unreadable checkpoint: one line now, not a ServerApp traceback later
        from collafuse_flwr.server.checkpoint import CheckpointError, load_checkpoint

        try:
            load_checkpoint(Path(cfg.resume_from))
        except CheckpointError as exc:
            raise RunConfigError(str(exc)) from None
    # the simulation's nodes read these on this machine: a missing one is one line now, not a failed run later
    name = canonical_name(cfg.dataset)
    reads_files = not (name.startswith(HF_PREFIX) or name in EMBEDDED)
    if reads_files and cfg.data_dir and not cfg.download and not Path(cfg.data_dir).is_dir():
        raise RunConfigError(f"data-dir={cfg.data_dir!r} is not a folder on this machine: point it at the "
                             f"{cfg.dataset} files, or set download=true where torchvision can fetch them")
    if cfg.fid_weights and not Path(cfg.fid_weights).is_file():
        raise RunConfigError(f"fid-weights={cfg.fid_weights!r} is not a file on this machine: give the path of "
                             f"the Inception weights, or leave it empty (torch hub's cache, or fid-backbone=auto)")
    if cfg.method == "collafuse" and 0 < len(cfg.cut_ratios) < num_clients:
        raise RunConfigError(f"client-cut-ratios={cfg.client_cut_ratios!r} has {len(cfg.cut_ratios)} entries for "
                             f"--num-clients {num_clients}: give one cut ratio per client")
    return cfg
