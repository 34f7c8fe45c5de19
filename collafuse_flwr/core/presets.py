"""UNet presets (sizes only, no torch): `tiny` for tests, `small` for 8 px CPU runs, `base` for 28-64 px
on a GPU, and `-half` twins (every width halved, ~1/4 the FLOPs) for `client-model-size = "half"`: a
private model only learns the short, low-noise end t <= t_c (benchmarks/client_compute.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetPreset:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention: tuple[bool, ...]  # per resolution level, from the top
    norm_num_groups: int


BASE_PRESETS: dict[str, UNetPreset] = {
    "tiny": UNetPreset((16, 32), 1, (False, False), 8),
    "small": UNetPreset((32, 64), 1, (False, True), 8),
    "base": UNetPreset((64, 128, 128), 2, (False, True, True), 32),
}


def half_width(p: UNetPreset) -> UNetPreset:
    """The same UNet with every channel width halved (GroupNorm groups kept where they divide)."""
    widths = tuple(max(1, w // 2) for w in p.block_out_channels)
    groups = p.norm_num_groups
    while groups > 1 and any(w % groups for w in widths):
        groups //= 2
    return UNetPreset(widths, p.layers_per_block, p.attention, groups)


PRESETS: dict[str, UNetPreset] = {**BASE_PRESETS, **{f"{k}-half": half_width(v) for k, v in BASE_PRESETS.items()}}


def client_preset(model_size: str, client_model_size: str = "") -> str:
    """A client's private denoiser preset: "" = `model_size`, "half" = `<model_size>-half`, else as named."""
    if client_model_size == "half":
        return f"{model_size}-half"
    return client_model_size or model_size
