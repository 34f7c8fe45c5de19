"""Rebuild the shipped digits-cnn feature network (collafuse_flwr/assets/digits_cnn.json).

Why a script: the weights are a committed artefact, and anyone must be able to regenerate
them bit for bit from scikit-learn's bundled digits, offline, in seconds:

    python scripts/train_digits_features.py            # writes the shipped asset
    python scripts/train_digits_features.py --check    # also reports held-out accuracy

``--check`` first trains a second network on 80% of the digits and reports its accuracy on
the other 20%, evidence that the features generalise rather than memorise; the shipped network
is then trained on all 1,797 images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collafuse_flwr.metrics.digits_cnn import (  # noqa: E402
    ASSET_PATH,
    DEFAULT_EPOCHS,
    DEFAULT_SEED,
    digits_training_images,
    prepare,
    save_digits_cnn,
    train_digits_cnn,
)


def _held_out_accuracy(seed: int, epochs: int) -> float:
    images, labels = digits_training_images()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    cut = int(0.8 * images.shape[0])
    tr, te = perm[:cut], perm[cut:]
    net, _ = train_digits_cnn(seed=seed, epochs=epochs, images=images[tr], labels=labels[tr])
    with torch.no_grad():
        return (net(prepare(images[te])).argmax(1) == labels[te]).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET_PATH, help=f"where to write (default {ASSET_PATH})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--check", action="store_true", help="also train on 80%% and report held-out accuracy")
    args = parser.parse_args(argv)

    if args.check:
        t0 = time.perf_counter()
        acc = _held_out_accuracy(args.seed, args.epochs)
        print(f"held-out accuracy (train 80%, test 20%): {acc:.4f} [{time.perf_counter() - t0:.1f} s]")
    t0 = time.perf_counter()
    net, info = train_digits_cnn(seed=args.seed, epochs=args.epochs)
    path = save_digits_cnn(net, info, args.out)
    print(f"trained in {time.perf_counter() - t0:.1f} s, train accuracy {info['train_accuracy']:.4f}; "
          f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
