"""uint8 images <-> the model's range: the one conversion every side of a run shares."""

from __future__ import annotations

import torch
from torch import Tensor


def to_model_range(images_uint8: Tensor) -> Tensor:
    """uint8 0..255 to float32 in [-1, 1], the range DDPM noise schedules assume."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] back to uint8; clamps because sampled images overshoot the range."""
    return ((images.to(torch.float32) + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
