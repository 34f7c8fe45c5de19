"""The run configuration: one schema, validated once at start, failing with a message that names
the key, the bad value and the fix. The defaults live in `pyproject.toml`'s `[tool.flwr.app.config]`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collafuse_flwr.core.chain import cut_step, split_step_budget
from collafuse_flwr.core.presets import PRESETS, client_preset

METHODS = ("collafuse", "fedavg", "local", "centralized")
#: the named datasets; `dataset` may also be "hf:<Hub id or local path>"
DATASETS = ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "celeba", "awa2", "imagefolder")
PARTITIONINGS = ("iid", "dirichlet", "by-class", "by-attribute")
# the source tree's pyproject.toml, or the copy a wheel carries inside the package (hatch force-include)
_HERE = Path(__file__).resolve().parent
PYPROJECT = next((p for p in (_HERE.parent / "pyproject.toml", _HERE / "pyproject.toml") if p.is_file()),
                 _HERE.parent / "pyproject.toml")
PRESET_DIR = _HERE / "presets"


@dataclass(frozen=True)
class RunConfig:
    method: str
    cut_ratio: float
    server_target: str
    num_server_rounds: int
    dataset: str
    data_dir: str
    download: bool
    image_column: str
    label_column: str
    partitioning: str
    dirichlet_alpha: float
    client_groups: str
    test_fraction: float
    max_samples: int
    image_size: int
    image_channels: int  # 0 = the data's own; 1 or 3 = convert
    diffusion_steps: int
    beta_schedule: str
    model_size: str
    client_model_size: str  # "" = model_size; "half"; or a preset (models.client_preset)
    conditioning: str
    local_steps: int
    client_cut_ratios: str  # "" or "c0,c1,...": each client's own cut ratio (collafuse)
    upload_epsilon: float  # per-image (epsilon, upload-delta)-DP of a node's uploads; 0 = off
    upload_delta: float
    max_uploads_per_image: int  # K, the node's cap; 0 = ceil(rounds x uploads-per-round / its images)
    upload_clip: float  # L2 clip of each image before upload; 0 = sqrt(d) (no distortion)
    server_steps: int | str  # "auto" or a fixed count
    server_overlap: bool
    fedavg_aggregation: str  # fedavg: mean (FedAvg) | median (FedMedian) | trimmed-mean (FedTrimmedAvg)
    batch_size: int
    learning_rate: float
    uploads_per_round: int
    eval_every: int
    num_eval_samples: int
    sampling_steps: int
    fid_backbone: str
    fid_weights: str
    fid_download: bool
    count_flops: bool
    flops_every_pass: bool
    attack_reference_steps: int
    torch_threads: int
    seed: int
    output_dir: str
    min_nodes: int
    min_available_fraction: float
    fraction_train: float
    fraction_evaluate: float
    round_timeout: float
    server_buffer_size: int
    harness: str
    resume_from: str

    @property
    def cut_step(self) -> int:
        return cut_step(self.cut_ratio, self.diffusion_steps)

    @property
    def cut_ratios(self) -> tuple[float, ...]:
        """client-cut-ratios as numbers (empty: every client runs at cut-ratio)."""
        return tuple(float(c) for c in self.client_cut_ratios.split(",")) if self.client_cut_ratios.strip() else ()

    def cut_ratio_for(self, client: int) -> float:
        ratios = self.cut_ratios
        if not ratios or client < 0:
            return self.cut_ratio
        if client >= len(ratios):
            raise ConfigError(f"client-cut-ratios has {len(ratios)} entries but client {client} needs one: give "
                              f"one cut ratio per client (as many as num-supernodes)")
        return ratios[client]

    def to_flwr(self) -> dict[str, Any]:
        """Back to Flower's flat, dash-separated form (for results.json and ConfigRecords)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


_TYPES: dict[str, type] = {f.name: f.type for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]
_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "server_target": ("exact", "renoise"), "dataset": DATASETS, "partitioning": PARTITIONINGS,
    "beta_schedule": ("linear", "cosine"), "model_size": ("tiny", "small", "base"), "conditioning": ("client", "none"),
    "fid_backbone": ("auto", "inception", "digits-cnn", "mnist-cnn", "none"), "harness": ("auto", "on", "off"),
    "fedavg_aggregation": ("mean", "median", "trimmed-mean"),
}
_MIN: dict[str, float] = {
    "num_server_rounds": 1, "diffusion_steps": 2, "image_size": 4, "local_steps": 0, "batch_size": 1, "min_nodes": 1,
    "uploads_per_round": 0, "eval_every": 0, "num_eval_samples": 2, "sampling_steps": 0, "max_samples": 0, "seed": 0,
    "attack_reference_steps": 0, "torch_threads": 0, "server_buffer_size": 0, "max_uploads_per_image": 0,
}
# keys only one method reads: set away from the default elsewhere, they warn (never a silent no-op)
_ONLY_FOR = {**dict.fromkeys(("cut_ratio", "server_target", "server_steps", "client_cut_ratios", "upload_epsilon",
                              "server_overlap", "uploads_per_round", "server_buffer_size", "client_model_size"),
                             "collafuse"), "fedavg_aggregation": "fedavg"}


#: Keys that change neither a node's data nor anything that leaves it: runs that differ only in these
#: are the same experiment, for a node's keyed draws and private state (client_app.Node.fingerprint).
BOOKKEEPING_KEYS = ("output-dir", "resume-from", "round-timeout", "min-nodes", "min-available-fraction",
                    "torch-threads", "count-flops", "flops-every-pass", "harness", "fid-backbone", "fid-weights",
                    "fid-download", "attack-reference-steps", "fraction-train", "fraction-evaluate")


class ConfigError(ValueError):
    """A run-config key has a bad value; the message names the key and the fix."""


def load_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table (empty without a pyproject)."""
    if not pyproject.is_file():
        return {}
    with open(pyproject, "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset(name: str) -> dict[str, Any]:
    """The run-config overrides of `presets/<name>.toml`, validated so a drifting preset fails where it is read."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; the presets are {preset_names()} (files in {PRESET_DIR})")
    with open(path, "rb") as f:
        overrides = tomllib.load(f)
    with warnings.catch_warnings(action="ignore"):
        try:
            parse_config(overrides)
        except ConfigError as exc:
            raise ConfigError(f"preset {name} ({path}): {exc}") from None
    return overrides


def run_config_text(overrides: dict[str, Any]) -> str:
    """`overrides` as `flwr run --run-config` text: TOML values, strings quoted."""
    def toml(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else repr(v)
    return " ".join(f"{k}={toml(v)}" for k, v in overrides.items())


def valid_keys() -> list[str]:
    """Every run-config key this project reads, dash-separated as in pyproject.toml."""
    return sorted(k.replace("_", "-") for k in _TYPES)


def unknown_keys_message(unknown: dict[str, Any], valid: list[str], where: str = "") -> str:
    """One line naming each unknown key, its value and the closest valid key (all valid keys if none is close)."""
    parts, lost = [], False
    for key, value in unknown.items():
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        lost |= not near
        parts.append(f"{key!r} (= {value!r})" + (f": did you mean {near[0]!r}?" if near else ""))
    return (f"unknown run-config key{'s' if len(parts) > 1 else ''} " + "; ".join(parts)
            + (f" ({where})" if where else "") + (f"; valid keys: {sorted(valid)}" if lost else ""))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    dash = key.replace("_", "-")
    if key == "server_steps":  # "auto" or a fixed count
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or float(value) != int(value) or value < 0):
            raise ConfigError(f"server-steps must be \"auto\" (clients x local-steps per round, the fair budget) "
                              f"or an integer >= 0 (a fixed budget, for the ablation), got {value!r}")
        return int(value)
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(typ, typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{dash} must be true or false, got {value!r}")
    if typ is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or float(value) != int(value)):
            raise ConfigError(f"{dash} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
            raise ConfigError(f"{dash} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{dash} must be a string, got {value!r} (quote it: {dash}='...')")
    return value


def parse_config(run_config: dict[str, Any], *, defaults: dict[str, Any] | None = None) -> RunConfig:
    """Validate Flower's run_config (dash-separated keys) into a RunConfig."""
    base = load_defaults() if defaults is None else dict(defaults)
    merged = {**base, **run_config}
    unknown = sorted(k for k in merged if k.replace("-", "_") not in _TYPES)
    if unknown:
        raise ConfigError(unknown_keys_message({k: merged[k] for k in unknown}, valid_keys()))
    missing = sorted(k.replace("_", "-") for k in _TYPES if k.replace("_", "-") not in merged)
    if missing:
        raise ConfigError(f"run-config lacks {missing}; they belong in [tool.flwr.app.config]")
    values = {k: _coerce(k, merged[k.replace("_", "-")], t) for k, t in _TYPES.items()}
    for k, choices in _CHOICES.items():
        if values[k] not in choices and not (k == "dataset" and values[k].startswith("hf:") and len(values[k]) > 3):
            raise ConfigError(f"{k.replace('_', '-')}={values[k]!r} is not one of {list(choices)}")
    for k, lo in _MIN.items():
        if values[k] < lo:
            raise ConfigError(f"{k.replace('_', '-')} must be >= {lo:g}, got {values[k]}")
    if values["image_channels"] not in (0, 1, 3):
        raise ConfigError(f"image-channels must be 0 (the data's own), 1 (gray) or 3 (RGB), "
                          f"got {values['image_channels']}")
    if not 0.0 <= values["cut_ratio"] <= 1.0:
        raise ConfigError(f"cut-ratio must be in [0, 1] (0 = server-only, 1 = local-only), "
                          f"got {values['cut_ratio']}")
    if values["client_cut_ratios"].strip():
        try:
            ratios = [float(c) for c in values["client_cut_ratios"].split(",")]
        except ValueError:
            raise ConfigError(f"client-cut-ratios must be comma-separated numbers in [0, 1], one per client "
                              f"(e.g. \"0.2,0.2,0.4,0.6,0.8\"), got {values['client_cut_ratios']!r}") from None
        bad = [c for c in ratios if not 0.0 <= c <= 1.0]
        if bad:
            raise ConfigError(f"client-cut-ratios entries must be in [0, 1], got {bad}")
        for c in ratios:
            cut_step(c, values["diffusion_steps"])  # a c that rounds to t_c = 0 while c > 0 fails here
    if values["upload_epsilon"] < 0 or not 0.0 < values["upload_delta"] < 1.0 or values["upload_clip"] < 0:
        raise ConfigError(f"upload-epsilon must be >= 0 (0 = off), upload-delta in (0, 1) and upload-clip >= 0 "
                          f"(0 = sqrt(pixels)), got {values['upload_epsilon']}, {values['upload_delta']}, "
                          f"{values['upload_clip']}")
    if values["upload_epsilon"] > 0 and values["server_target"] == "renoise":
        raise ConfigError("upload-epsilon needs server-target='exact': DP moves a node's upload step to t_u, "
                          "and the renoise ablation derives the client's chain from c instead")
    if not 0.0 < values["test_fraction"] < 1.0:
        raise ConfigError(f"test-fraction must be in (0, 1), got {values['test_fraction']}")
    if not 0.0 < values["min_available_fraction"] <= 1.0:
        raise ConfigError(f"min-available-fraction must be in (0, 1] (the share of nodes whose replies "
                          f"let a round go on), got {values['min_available_fraction']}")
    for key in ("fraction_train", "fraction_evaluate"):
        if not 0.0 < values[key] <= 1.0:
            raise ConfigError(f"{key.replace('_', '-')} must be in (0, 1] (the share of the admitted nodes "
                              f"sampled each round), got {values[key]}")
    for key in ("round_timeout", "learning_rate", "dirichlet_alpha"):
        if values[key] <= 0:
            raise ConfigError(f"{key.replace('_', '-')} must be > 0, got {values[key]}")
    ds = values["dataset"]
    if ds not in ("digits", "mnist5k") and not ds.startswith("hf:") and not values["data_dir"]:
        raise ConfigError(f"dataset={ds!r} reads local files: set data-dir to the absolute folder "
                          f"that holds them (or that download=true fills)")
    for key in ("data_dir", "output_dir", "fid_weights", "resume_from"):
        if values[key] and not os.path.isabs(os.path.expanduser(values[key])):
            raise ConfigError(f"{key.replace('_', '-')} must be an absolute path (Flower resolves "
                              f"relative paths against the SuperLink's start folder), got {values[key]!r}")
        values[key] = os.path.expanduser(values[key]) if values[key] else ""
    name = values["client_model_size"]  # checked here so no node fails at round 1
    if name:
        if name != "half" and name not in PRESETS:
            raise ConfigError(f"client-model-size={name!r} is not a preset: use '' (same as model-size), "
                              f"'half' (model-size's UNet at half the channel widths) or one of {list(PRESETS)}")
        unet = client_preset(values["model_size"], name)
        step = 2 ** (len(PRESETS[unet].block_out_channels) - 1)
        if values["image_size"] % step:
            raise ConfigError(f"client-model-size={name!r} ({unet}) needs image-size to be a multiple of {step}, "
                              f"got {values['image_size']}; pick a smaller preset or resize (image-size={step * 4})")
    cfg = RunConfig(**values)
    if cfg.method == "collafuse":  # cut_step and split_step_budget raise here, at start, naming the fix
        split_step_budget(cfg.sampling_steps, cfg.diffusion_steps, cfg.cut_step)
        if cfg.cut_step not in (0, cfg.diffusion_steps) and cfg.local_steps == 0:
            raise ConfigError("collafuse with 0 < cut-ratio < 1 needs local-steps >= 1 to train the client models")
    for key, method in _ONLY_FOR.items():
        dash = key.replace("_", "-")
        default = _coerce(key, base[dash], _TYPES[key]) if dash in base else None
        if cfg.method != method and dash in base and getattr(cfg, key) != default:
            warnings.warn(f"{dash}={getattr(cfg, key)} is ignored by method={cfg.method!r} "
                          f"(only {method} reads it)", stacklevel=2)
    return cfg


def run_dir(cfg: RunConfig, run_id: int | str | None = None) -> Path:
    """This run's own folder under output-dir (absolute; default ~/collafuse-runs)."""
    root = Path(cfg.output_dir) if cfg.output_dir else Path.home() / "collafuse-runs"
    tag = f"c{cfg.cut_ratio:g}-" if cfg.method == "collafuse" else ""
    data = "hf-" + Path(cfg.dataset[3:]).name if cfg.dataset.startswith("hf:") else cfg.dataset  # no '/' or ':'
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{tag}{data}-s{cfg.seed}"
    path = root / (name if run_id is None else f"{name}-{run_id}")
    path.mkdir(parents=True, exist_ok=False)
    return path
