"""The shipped feature nets: small, accurate, reproducible, never trained on a client's image,
sane as FID features, and rebuilt offline when missing."""

import json

import pytest
import torch

from collafuse_flwr.metrics import digits_cnn as dc
from scripts.train_digits_features import (
    CHECK_SETS,
    NETS,
    class_separation,
    fid_sanity,
    linear_probe,
    net_features,
    real_images,
    scored_images,
    with_pixel_noise,
)


@pytest.mark.parametrize("name,max_kib", [("digits-cnn", 200), ("mnist-cnn", 400)])
def test_shipped_asset_is_small_and_accurate(name, max_kib):
    size, asset = NETS[name]
    assert asset.is_file(), "run `python scripts/train_digits_features.py`"
    assert asset.stat().st_size < max_kib * 1024
    # JSON, not torch.save: Flower's FAB only packs *.py/*.toml/*.md/*.json/*.yaml files.
    assert asset.suffix == ".json"
    blob = json.loads(asset.read_text(encoding="utf-8"))
    assert blob["format_version"] == blob["info"]["format_version"] == dc.FORMAT_VERSION
    assert blob["info"]["trained_on"] == dc.TRAINED_ON
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
    """No image a digits or mnist5k client can hold (FID references included) is a training image,
    and the training rows hold every digit (format 2's held only 8s and 9s)."""
    def keys(images):
        return {bytes(im.numpy().tobytes()) for im in images}

    digits_train, labels = dc.feature_training_images("digits-cnn")
    assert digits_train.shape == (1000, 1, 8, 8) and torch.bincount(labels).tolist() == [100] * 10
    raw, raw_labels = dc.mnist_reserved_images()
    warped = dc.digits_style_variants(raw, dc.RECIPES["digits-cnn"]["style_copies"])
    sklearn = keys(dc.sklearn_digits()[0])
    assert not keys(digits_train) & sklearn and not keys(warped) & sklearn
    mnist_train, mnist_labels = dc.feature_training_images("mnist-cnn")
    assert mnist_train.shape == (1000, 1, 28, 28) and torch.bincount(mnist_labels).tolist() == [100] * 10
    assert torch.equal(mnist_train, raw) and torch.equal(mnist_labels, raw_labels)
    clients, _ = scored_images("mnist-cnn")
    assert clients.shape[0] == 4000 and not keys(mnist_train) & keys(clients)


def test_digits_style_variants_are_reproducible_and_vary():
    raw, _ = dc.mnist_reserved_images()
    a, b = dc.digits_style_variants(raw[:20], 2, seed=3), dc.digits_style_variants(raw[:20], 2, seed=3)
    assert a.shape == (40, 1, 8, 8) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a[:20], a[20:])  # each copy is its own warp
    assert not torch.equal(a[:20], dc.to_digits_style(raw[:20]))


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
    digits-cnn on scikit-learn digits: real 0.34, noise 19.0, blur 14.6, digits 0..3 only 7.3;
    mnist-cnn on mnist5k (28 px): real 0.15, noise 40.5, blur 22.5, digits 0..3 only 6.9.
    (Format 2 had real 0.023 / 0.0071: its near-2-D features made the real-vs-real floor tiny, so
    ratios to it are not comparable across formats; the absolute noise and blur FDs did not drop.)"""
    fd = fid_sanity(dc.load_feature_net(name), *scored_images(name))
    assert fd["noise"] > 30 * fd["real"]
    assert fd["blur"] > 20 * fd["real"]
    assert fd["digits_0_3_only"] > 10 * fd["real"]


#: Margins for the class-separation tests below: format 2's nets (trained on 8s and 9s only) fail
#: each, format 3's pass by a wide margin (numbers in each test's docstring).
FD_3_5_OVER_FLOOR = 85
WORST_PAIR_OVER_FLOOR = 15
COLLAPSE_OVER_REAL = 5
COLLAPSE_OVER_NOISY = 1.5
#: (net, dataset, image size) as the project runs them: digits-cnn on the 8x8 digits, mnist-cnn on
#: the clients' MNIST-5k rows at 8, 16 and 28 px (data.load_dataset downsamples by image-size).
CASES = [(name, dataset, size) for name, sets in CHECK_SETS.items() for dataset, size in sets]
_CACHE: dict = {}


def _separation(name, dataset, size):
    """Features of the real images, of the same images with pixel noise, and class_separation on them
    (cached: the tests below share them)."""
    key = (name, dataset, size)
    if key not in _CACHE:
        net = dc.load_feature_net(name)
        images, labels = real_images(dataset, size)
        feats = net_features(net, images)
        sep = class_separation(feats, labels, net_features(net, with_pixel_noise(images)), draws=3)
        _CACHE[key] = images, labels, feats, sep
    return _CACHE[key]


@pytest.mark.parametrize("name,dataset,size", CASES)
def test_fd_tells_one_digit_from_another(name, dataset, size):
    """FD(all 3s, all 5s) far above the real-vs-real floor (FD of two disjoint random halves of the
    mixed set), and for mnist-cnn every pair of digits far above the floor at class-sized sets.

    Measured (here, 3 draws of the floor), FD(3s, 5s) / floor (halves):
    format 2 (trained on 8s and 9s only): digits-cnn 8 px 63x; mnist-cnn 8 / 16 / 28 px 38x / 20x / 18x.
    format 3: digits-cnn 111x; mnist-cnn 166x / 265x / 308x (digits-cnn's margin is the narrow one,
    1.3x either side of 85; its wide ones are the two tests below). Closest pair of digits / floor at
    class-sized sets, mnist-cnn: format 2 3.1x / 9.5x / 8.7x, format 3 27x / 31x / 42x (4 vs 9).
    digits-cnn's closest pair stays ~7x-13x in both formats (scikit-learn's digits are not MNIST's
    writers; its accuracy on them is 0.83), so only mnist-cnn is held to every pair."""
    _, _, _, sep = _separation(name, dataset, size)
    assert sep["fd_3_5"] > FD_3_5_OVER_FLOOR * sep["floor"]
    if name == "mnist-cnn":
        assert sep["worst_pair"] > WORST_PAIR_OVER_FLOOR * sep["floor_class"], sep["worst_pair_classes"]


@pytest.mark.parametrize("name,dataset,size", CASES)
def test_dropping_a_class_scores_worse_than_real_or_slightly_noisy_images(name, dataset, size):
    """Mode collapse: for a {2, 3} client's reference, a set of only 3s scores far worse than a
    held-out real {2, 3} set; and for every {2k, 2k+1} client (the default split) a set of one class
    scores worse than the same held-out real set with 10 % pixel noise: a generator that drops a
    class must not outscore one that covers the classes with slightly noisy images.

    Measured (here, 3 draws), worst one-class FD / noisy-real FD: format 2 digits-cnn 0.60,
    mnist-cnn 8 / 16 / 28 px 0.18 / 0.41 / 0.51 (a collapsed generator won); format 3 7.7,
    3.8 / 7.4 / 7.8. Only 3s vs real {2, 3}: format 3 12x, 16x / 20x / 21x; format 2 passed this
    part too (--check: 7.7x, 14x / 39x / 57x; its near-2-D features make every real-vs-real floor
    tiny), hence the noisy comparison."""
    _, _, _, sep = _separation(name, dataset, size)
    assert sep["collapse_only_3s"] > COLLAPSE_OVER_REAL * sep["collapse_real"]
    assert sep["worst_collapse_vs_noisy"] > COLLAPSE_OVER_NOISY


@pytest.mark.parametrize("name,dataset,size", CASES)
def test_features_separate_all_ten_digits_at_least_as_well_as_pixels(name, dataset, size):
    """Linear probe (logistic regression, stratified half/half) on the 64 features vs on the raw
    pixels. Measured: format 2 digits-cnn 0.931 vs pixels 0.964, mnist-cnn 8 / 16 / 28 px
    0.831 / 0.865 / 0.860 vs 0.888 / 0.880 / 0.877; format 3 0.983, 0.919 / 0.960 / 0.963."""
    images, labels, feats, _ = _separation(name, dataset, size)
    assert linear_probe(feats, labels) >= linear_probe(images.float(), labels)


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
