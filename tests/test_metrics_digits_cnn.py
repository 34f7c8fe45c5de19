"""The shipped digits-cnn: small, accurate, reproducible, and rebuilt offline when missing."""

import json

import torch

from collafuse_flwr.metrics import digits_cnn as dc


def test_shipped_asset_is_small_and_accurate():
    assert dc.ASSET_PATH.is_file(), "run `python scripts/train_digits_features.py`"
    assert dc.ASSET_PATH.stat().st_size < 200 * 1024
    # JSON, not torch.save: Flower's FAB only packs *.py/*.toml/*.md/*.json/*.yaml files.
    assert dc.ASSET_PATH.suffix == ".json"
    blob = json.loads(dc.ASSET_PATH.read_text(encoding="utf-8"))
    assert blob["format_version"] == blob["info"]["format_version"] == dc.FORMAT_VERSION
    net = dc.load_digits_cnn()
    images, labels = dc.digits_training_images()
    with torch.no_grad():
        acc = (net(dc.prepare(images)).argmax(1) == labels).float().mean().item()
        feats = net.features(dc.prepare(images))
    assert acc > 0.97
    assert feats.shape == (images.shape[0], dc.NUM_FEATURES)
    # Rescaled to unit RMS on the training digits, the scale KID's kernel expects.
    assert abs(feats.pow(2).mean().sqrt().item() - 1.0) < 1e-3


def test_shipped_asset_round_trips_byte_for_byte(tmp_path):
    blob = json.loads(dc.ASSET_PATH.read_text(encoding="utf-8"))
    out = dc.save_digits_cnn(dc.load_digits_cnn(dc.ASSET_PATH), blob["info"], tmp_path / "copy.json")
    assert out.read_bytes() == dc.ASSET_PATH.read_bytes()


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

    with pytest.raises(FileNotFoundError, match="train_digits_features.py"):
        dc.load_digits_cnn(tmp_path / "nope.json")
