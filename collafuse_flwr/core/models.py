"""Denoiser factory: a small diffusers `UNet2DModel` sized by image size, channels and a preset
(`presets.py`). Client and server share the architecture by default: the split is by timestep."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from collafuse_flwr.core.presets import PRESETS, client_preset  # noqa: F401 - client_preset re-exported


class Denoiser(nn.Module):
    """eps_theta(x_t, t[, class]) around a `UNet2DModel`, callable as diffusion.EpsModel; class
    labels are bound with `condition`, so the sampling code (which knows only (x, t)) needn't know."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet
        self._labels: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds or 0)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None and self.num_classes:
            if self._labels is None:
                raise ValueError("this denoiser is class-conditional: call condition(labels) first")
            class_labels = self._labels.to(x.device)
            if class_labels.dim() == 0:
                class_labels = class_labels.expand(x.shape[0])
        return self.unet(x, t, class_labels=class_labels).sample

    def condition(self, labels: Tensor | int | None) -> Denoiser:
        """Bind class labels (one per batch row, or one int for all) for the following calls."""
        if labels is not None and self.num_classes:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"class label out of range 0..{self.num_classes - 1}: {labels.tolist()}")
        self._labels = labels if self.num_classes else None
        return self


def build_denoiser(image_size: int, channels: int, size: str = "small", num_classes: int = 0) -> Denoiser:
    """A UNet2DModel for square images; num_classes > 0 adds a class embedding."""
    if size not in PRESETS:
        raise ValueError(f"model-size must be one of {sorted(PRESETS)}, got {size!r}")
    p = PRESETS[size]
    levels = len(p.block_out_channels)
    if image_size < 2 ** (levels - 1) or image_size % (2 ** (levels - 1)):
        raise ValueError(f"image-size {image_size} must be a multiple of {2 ** (levels - 1)} for model-size "
                         f"{size!r}; resize the data (image-size=16) or pick another preset")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in p.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p.attention))
    return Denoiser(UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=p.block_out_channels, layers_per_block=p.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=p.norm_num_groups,
        attention_head_dim=8, num_class_embeds=num_classes or None))


def shared_denoiser(image_size: int, channels: int, size: str, conditioning: str, num_clients: int) -> Denoiser:
    """A model several clients' data shape (CollaFuse's server, FedAvg's global, centralized): "client"
    embeds the client index (the server knows who sent what: nothing new disclosed), "none" pools."""
    if conditioning not in ("client", "none"):
        raise ValueError(f"conditioning must be 'client' or 'none', got {conditioning!r}")
    return build_denoiser(image_size, channels, size, num_clients if conditioning == "client" else 0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def use_torch_threads(n: int) -> None:
    """Pin torch's CPU thread count (0 = torch's default): apps and daemons share a small machine's
    cores, and a matched count makes a Flower run comparable with a plain loop."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def default_device() -> torch.device:
    """CUDA when present (the apps must use a GPU where there is one), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
