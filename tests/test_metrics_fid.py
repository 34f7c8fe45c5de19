"""FID/KID/precision/recall: the digits-cnn backbone ranks real, noisy and blurred digits
sensibly; Inception is used from weights on disk, fetched by torch-fidelity only with
fid-download, and a missing file (or a failed fetch) is a clear error."""

import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from collafuse_flwr.metrics import features as feat
from collafuse_flwr.metrics.digits_cnn import digits_training_images
from collafuse_flwr.metrics.features import feature_extractor, find_inception_weights, resolve_backbone
from collafuse_flwr.metrics.fid import compute_fid_kid, fid_kid_from_features

WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def digits16():
    """The 1,797 digits at 16x16 (the project's default image-size), split 1400 / 397."""
    imgs, _ = digits_training_images()
    imgs = F.interpolate(imgs.float(), size=(16, 16), mode="bilinear", antialias=True)
    imgs = imgs.round().clamp(0, 255).to(torch.uint8)
    perm = torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(0))
    return imgs[perm[:1400]], imgs[perm[1400:]]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args!r}")

    try:  # imported first: it binds torch.hub's function at import, which must be the real one
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inc
        monkeypatch.setattr(tf_inc, "load_state_dict_from_url", refuse)
    except ImportError:
        pass
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_digits_cnn_fd_ranks_real_noise_blur(digits16):
    train, test = digits16
    g = torch.Generator().manual_seed(1)
    noise = ((torch.randn(train.shape, generator=g) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    blur = gaussian_blur(train.float(), kernel_size=9, sigma=3.0).round().clamp(0, 255).to(torch.uint8)
    fd_real = compute_fid_kid(test, train, "digits-cnn")
    fd_noise = compute_fid_kid(test, noise, "digits-cnn")
    fd_blur = compute_fid_kid(test, blur, "digits-cnn")
    fd_same = compute_fid_kid(test, test.clone(), "digits-cnn")
    # Measured: real 0.23, noise 22.2, blur 19.9, identical 0 (format 2 digits-cnn, trained on 8s and 9s:
    # 0.020, 22.3, 6.96; format 1: 0.26, 23.0, 19.3).
    assert fd_noise["fid"] > 20 * fd_real["fid"]
    assert fd_blur["fid"] > 20 * fd_real["fid"]
    assert fd_same["fid"] < 1e-3 * fd_real["fid"]
    assert fd_noise["kid"] > 10 * max(fd_real["kid"], fd_real["kid_std"])
    assert fd_blur["kid"] > 10 * max(fd_real["kid"], fd_real["kid_std"])


def test_digits_cnn_works_for_other_sizes_and_rgb(digits16):
    train, test = digits16
    net = feature_extractor("digits-cnn")
    small = train[:8]
    big = F.interpolate(small.float(), size=(28, 28), mode="bilinear").round().to(torch.uint8)
    rgb = small.expand(-1, 3, -1, -1)
    f16, f28, frgb = net(small), net(big), net(rgb)
    assert f16.shape == f28.shape == (8, 64)
    torch.testing.assert_close(f16, frgb)  # grey RGB = the grey channel
    assert torch.nn.functional.cosine_similarity(f16, f28).min() > 0.8  # same digits, other size


def test_small_sets_and_kid_subset(digits16):
    train, test = digits16
    out = compute_fid_kid(test[:5], train[:3], "digits-cnn")
    assert set(out) == {"fid", "kid", "kid_std"} and all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid_kid(test[:5], train[:1], "digits-cnn")
    with pytest.raises(ValueError, match="at least 2"):  # said before any backbone loads (these weights are absent)
        compute_fid_kid(test[:5], train[:1], "inception", weights_path="/nonexistent/weights.pth")
    with pytest.raises(ValueError, match="kid_subset_size"):
        compute_fid_kid(test[:5], train[:3], "digits-cnn", kid_subset_size=4)


def test_kid_is_deterministic_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g) + 0.5
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = fid_kid_from_features(real, fake)
    after = torch.rand(1)
    b = fid_kid_from_features(real, fake)
    assert a == b
    assert torch.equal(before, after)
    assert a["fid"] > 0.1 and a["kid"] > 0


def test_frechet_distance_is_fids_number():
    """The cheap FD the feature-net checks use is exactly torchmetrics' FID on the same features."""
    from collafuse_flwr.metrics.fid import frechet_distance

    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(80, 16, generator=g), torch.randn(50, 16, generator=g) * 1.3 + 0.2
    assert frechet_distance(real, fake) == pytest.approx(fid_kid_from_features(real, fake)["fid"], rel=1e-9)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(real[:1], fake)


def test_bad_inputs_are_named(digits16):
    train, _ = digits16
    with pytest.raises(TypeError, match="uint8"):
        compute_fid_kid(train.float(), train, "digits-cnn")
    with pytest.raises(ValueError, match="N x C x H x W"):
        compute_fid_kid(train[:, 0], train, "digits-cnn")
    with pytest.raises(ValueError, match="resolve_backbone"):
        compute_fid_kid(train[:4], train[:4], "auto")


@pytest.fixture
def fresh_fallback_memo(monkeypatch):
    """resolve_backbone warns about a fallback once per process: start each test unwarned."""
    monkeypatch.setattr(feat, "_FALLBACK_WARNED", set())


def test_resolve_backbone_without_inception_weights(empty_hub, no_network, fresh_fallback_memo):
    assert resolve_backbone("auto", "digits", None) == "digits-cnn"
    assert resolve_backbone("auto", "mnist", "") == "digits-cnn"
    assert resolve_backbone("digits-cnn", "digits", None) == "digits-cnn"
    assert resolve_backbone("none", "cifar10", None) == "none"
    with pytest.warns(UserWarning, match="fid-weights=/abs/path") as rec:
        assert resolve_backbone("auto", "cifar10", None) == "none"
    assert str(empty_hub / "checkpoints") in str(rec[0].message)
    with pytest.raises(FileNotFoundError, match="fid-download=true"):
        resolve_backbone("inception", "digits", None)
    with pytest.raises(ValueError, match="digit images"):
        resolve_backbone("digits-cnn", "cifar10", None)
    with pytest.raises(ValueError, match="fid-backbone must be one of"):
        resolve_backbone("inceptionv3", "digits", None)


def test_missing_inception_weights_is_a_clear_error_not_a_download(empty_hub, no_network, tmp_path):
    imgs = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        compute_fid_kid(imgs, imgs, "inception")
    assert str(empty_hub / "checkpoints") in str(err.value)
    missing = tmp_path / "nowhere" / WEIGHTS
    with pytest.raises(FileNotFoundError, match=str(missing)):
        compute_fid_kid(imgs, imgs, "inception", weights_path=str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_backbone("auto", "digits", str(missing))  # a typo never falls back silently


def test_auto_falls_back_to_none_for_any_other_dataset_with_one_warning(monkeypatch, fresh_fallback_memo):
    """A user's own hf: dataset, offline, no Inception weights: auto must skip FID (no offline net
    has seen faces) with one line saying so and naming the fix, not stop the run with a traceback.
    Whether this machine has real weights does not matter: the lookup is replaced."""
    monkeypatch.setattr(feat, "find_inception_weights", lambda weights_path=None: None)
    with pytest.warns(UserWarning) as rec:
        for _ in range(3):  # every client's every evaluation resolves the backbone
            assert resolve_backbone("auto", "hf:someone/faces", None) == "none"
            assert resolve_backbone("auto", "hf:someone/faces", "") == "none"
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "\n" not in msg and "hf:someone/faces" in msg and "FID is skipped" in msg
    assert "fid-weights=/abs/path" in msg and "fid-download=true" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # digit datasets fall back to their nets, as documented, silently
        assert resolve_backbone("auto", "mnist5k", None) == "mnist-cnn"
        assert resolve_backbone("auto", "digits", None) == "digits-cnn"
        assert resolve_backbone("none", "hf:someone/faces", None) == "none"
    with pytest.raises(ValueError, match="digit images"):  # only auto falls back
        resolve_backbone("digits-cnn", "hf:someone/faces", None)


class _RecordingInception(torch.nn.Module):
    """Stands in for torchmetrics' NoTrainInceptionV3 and records how it was built."""

    calls: list = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None, antialias=True):
        super().__init__()
        _RecordingInception.calls.append(dict(name=name, features_list=features_list,
                                              feature_extractor_weights_path=feature_extractor_weights_path))
        self.seen_channels = None

    def forward(self, x):
        self.seen_channels = x.shape[1]
        return x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


def test_weights_path_is_passed_through(monkeypatch, tmp_path, empty_hub, no_network):
    import torchmetrics.image.fid as tm_fid

    weights = tmp_path / WEIGHTS
    weights.write_bytes(b"not really weights")
    _RecordingInception.calls = []
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", _RecordingInception)
    monkeypatch.setattr(feat, "torch_fidelity_available", lambda: True)
    assert resolve_backbone("auto", "cifar10", str(weights)) == "inception"
    net = feature_extractor("inception", str(weights))
    assert _RecordingInception.calls == [dict(name="inception-v3-compat", features_list=["2048"],
                                              feature_extractor_weights_path=str(weights.resolve()))]
    out = net(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    assert net.net.seen_channels == 3 and out.shape == (2, 2048)


def test_weights_found_in_torch_hub_cache(monkeypatch, empty_hub, no_network):
    cached = empty_hub / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights(None) == cached
    monkeypatch.setattr(feat, "torch_fidelity_available", lambda: True)
    assert resolve_backbone("auto", "cifar10", None) == "inception"
    monkeypatch.setattr(feat, "torch_fidelity_available", lambda: False)
    assert resolve_backbone("auto", "digits", None) == "digits-cnn"
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        resolve_backbone("auto", "cifar10", None)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        resolve_backbone("inception", "cifar10", None)


@pytest.mark.skipif(not feat.torch_fidelity_available(), reason="torch-fidelity not installed")
def test_real_inception_loader_reads_the_given_file(tmp_path, empty_hub, no_network):
    bogus = tmp_path / WEIGHTS
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=f"could not load Inception FID weights from {bogus}"):
        feature_extractor("inception", str(bogus))


def test_to_uint8_maps_model_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert feat.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
    u = torch.arange(5, dtype=torch.uint8)
    assert feat.to_uint8(u) is u


def test_assets_path_is_inside_package():
    from collafuse_flwr.metrics.digits_cnn import ASSET_PATH

    assert ASSET_PATH.parent == Path(feat.__file__).resolve().parent.parent / "assets"
    # Flower's FAB only packs *.py/*.toml/*.md/*.json/*.yaml, so the shipped weights are JSON.
    assert ASSET_PATH.suffix == ".json" and ASSET_PATH.is_file()


def test_precision_recall_beside_fid(digits16):
    train, test = digits16
    g = torch.Generator().manual_seed(1)
    noise = ((torch.randn(train.shape, generator=g) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    real = compute_fid_kid(test, train, "digits-cnn")
    fake = compute_fid_kid(test, noise, "digits-cnn")
    assert 0.0 <= real["precision"] <= 1.0 and 0.0 <= real["recall"] <= 1.0
    # Real digits lie on the real manifold and cover it; noise does neither.
    assert real["precision"] > 0.5 and real["recall"] > 0.5
    assert fake["precision"] < 0.1 * real["precision"] and fake["recall"] < 0.1 * real["recall"]


class _Offline:
    """torch hub's downloader with no network: records where it was asked to write."""

    def __init__(self):
        self.calls = []

    def __call__(self, url, dst, *args, **kwargs):
        import urllib.error

        self.calls.append((url, Path(dst)))
        raise urllib.error.URLError("offline (test)")


@pytest.mark.skipif(not feat.torch_fidelity_available(), reason="torch-fidelity not installed")
def test_fid_download_goes_through_torch_fidelity_and_fails_clearly_offline(monkeypatch, empty_hub):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    offline = _Offline()
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="fid-download=true"):  # not asked: nothing fetched
        feat.prepare_backbone("inception", "cifar10", None, download=False)
    assert offline.calls == []
    with pytest.raises(ConnectionError, match="fid-download=true could not fetch.*go online"):
        feat.prepare_backbone("inception", "cifar10", None, download=True)
    # torch-fidelity's own URL, into torch hub's checkpoint cache, where find_inception_weights looks
    assert offline.calls[0][0] == URL_INCEPTION_V3
    assert offline.calls[0][1].parent == empty_hub / "checkpoints"
    assert offline.calls[0][1].name.startswith("weights-inception-2015-12-05-6726825d")
    # only auto falls back: to the digit nets where they mean something, else to no FID;
    # one warning line each, carrying the fetch error; later resolves of the run stay quiet
    with pytest.warns(UserWarning, match="falling back to mnist-cnn") as rec:
        assert feat.prepare_backbone("auto", "mnist5k", None, download=True) == "mnist-cnn"
    assert len(rec) == 1
    monkeypatch.setattr(feat, "_FALLBACK_WARNED", set())
    with pytest.warns(UserWarning, match="could not fetch.*falling back to none") as rec:
        assert feat.prepare_backbone("auto", "cifar10", None, download=True) == "none"
        assert resolve_backbone("auto", "cifar10", None) == "none"
    assert len(rec) == 1


def test_prepare_backbone_uses_weights_on_disk_without_fetching(monkeypatch, empty_hub, no_network):
    cached = empty_hub / "checkpoints" / WEIGHTS
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    monkeypatch.setattr(feat, "torch_fidelity_available", lambda: True)
    assert feat.prepare_backbone("inception", "cifar10", None, download=True) == "inception"
    assert feat.prepare_backbone("none", "cifar10", None, download=True) == "none"
