"""The UNet factory: presets, sizes, conditioning and clear errors."""

import pytest
import torch

from collafuse_flwr.core.models import PRESETS, build_denoiser, count_parameters, shared_denoiser


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_presets_predict_noise_of_the_input_shape(size):
    img = 16 if size == "base" else 8
    m = build_denoiser(img, 3, size)
    x = torch.randn(2, 3, img, img)
    assert m(x, torch.tensor([1, 5])).shape == x.shape
    assert count_parameters(m) == sum(p.numel() for p in m.parameters()) > 0


def test_presets_grow():
    sizes = [count_parameters(build_denoiser(16, 1, s)) for s in ("tiny", "small", "base")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 10


def test_client_conditioning_changes_the_output_and_checks_labels():
    m = shared_denoiser(8, 1, "tiny", "client", num_clients=3)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 7)
    with pytest.raises(ValueError, match="condition"):
        m(x, t)
    a = m.condition(0)(x, t)
    b = m.condition(2)(x, t)
    assert not torch.allclose(a, b)
    assert torch.allclose(m.condition(torch.tensor([0, 0, 0, 0]))(x, t), a)
    with pytest.raises(ValueError, match="out of range"):
        m.condition(3)
    assert shared_denoiser(8, 1, "tiny", "none", 3).num_classes == 0


def test_bad_sizes_name_the_fix():
    with pytest.raises(ValueError, match="image-size 10 must be a multiple of 4"):
        build_denoiser(10, 1, "base")
    with pytest.raises(ValueError, match="model-size"):
        build_denoiser(8, 1, "giant")
