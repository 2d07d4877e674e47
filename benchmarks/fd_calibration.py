"""What an FD ratio means: the Fréchet distance (over its real-vs-real floor) that `diffunet eval`
would report for real test images with one known defect each, at the same N, in both of its feature
spaces (FD and FD strict). Read a model's "FD 25.3 (floor 12.4), 2.0x" against this table: on MNIST
that is as far from real digits as the same digits dimmed by 5%, and closer than a one-pixel shift.

    python benchmarks/fd_calibration.py                      # MNIST, N = 1,000
    python benchmarks/fd_calibration.py --data fashion-mnist
    python benchmarks/fd_calibration.py --npz samples.npz    # add a row for `diffunet sample --npz` output

Each defect is applied to the floor's real stand-in set and measured against the same reference sets
as `diffunet eval --seed S` uses (N random test images each, up to 4, FD averaged over them); the
classifiers are the cached ones `diffunet eval` uses (trained on first use, a minute or two each).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from a clone without installing
SHARED_DATA = REPO.parent / "shared" / "data"
if "DIFFUNET_DATA" not in os.environ and (SHARED_DATA / "mnist.npz").is_file():
    os.environ["DIFFUNET_DATA"] = str(SHARED_DATA)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffunet.data import load_data  # noqa: E402
from diffunet.evaluate import split_real  # noqa: E402
from diffunet.features import STRICT_CLASSIFIER, ClassifierConfig, cached_classifier, classify, frechet_distance  # noqa: E402


def defects(images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Each named defect applied to uint8 images [N, C, H, W] (labels [N] for the class-dropping rows)."""
    generator = torch.Generator().manual_seed(seed)
    x = images.float() / 255
    to_uint8 = lambda value: (value.clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    thicker = F.pad(F.max_pool2d(x, 2, 1), (0, 1, 0, 1))                       # 2x2 dilation
    thinner = -F.pad(F.max_pool2d(-x, 2, 1), (0, 1, 0, 1))                     # 2x2 erosion
    hole = images.clone()
    centre = (images.shape[-2] // 2 - 3, images.shape[-1] // 2 - 3)
    hole[..., centre[0]:centre[0] + 6, centre[1]:centre[1] + 6] = 0

    def without(classes: tuple[int, ...]) -> torch.Tensor:
        kept = images[~torch.isin(labels, torch.tensor(classes))]
        return kept[torch.randint(len(kept), (len(images),), generator=generator)]

    return {
        "none (the floor)": images,
        "intensity x 0.95": to_uint8(x * 0.95),
        "intensity x 0.90": to_uint8(x * 0.90),
        "gamma 1.25 (softer edges)": to_uint8(x ** 1.25),
        "shifted 1 pixel right": torch.roll(images, 1, dims=-1),
        "Gaussian noise, std 0.05": to_uint8(x + 0.05 * torch.randn(x.shape, generator=generator)),
        "1% of pixels random": to_uint8(torch.where(torch.rand(x.shape, generator=generator) < 0.01,
                                                    torch.rand(x.shape, generator=generator), x)),
        "strokes 1 pixel thicker": to_uint8(thicker),
        "strokes 1 pixel thinner": to_uint8(thinner),
        "half-blurred (3x3 box)": to_uint8(0.5 * x + 0.5 * F.avg_pool2d(x, 3, 1, 1)),
        "6x6 hole in the centre": hole,
        "one class missing (3)": without((3,)),
        "two classes missing (3, 8)": without((3, 8)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist", help="a source with a labelled test split (default: mnist)")
    parser.add_argument("--num", type=int, default=1000, help="N, as in `diffunet eval --num` (default: 1000)")
    parser.add_argument("--npz", action="append", default=[], help="generated uint8 images to add as a row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, test = load_data(args.data), load_data(args.data, split="test")
    order = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(args.seed))
    sets = split_real(order, args.num)
    if len(sets) < 2:
        sys.exit(f"--num must be at most {len(test.images) // 2} for {args.data}'s test split; got {args.num}")
    stand_in, references = sets[0], sets[1:]
    spaces = {"FD": ClassifierConfig(), "FD strict": STRICT_CLASSIFIER}               # as `diffunet eval` has them
    nets = {name: cached_classifier(train.images, train.labels, train.num_classes, train.name, config,
                                    progress=True)[0] for name, config in spaces.items()}
    reference_features = {name: [classify(net, test.images[index])[0] for index in references]
                          for name, net in nets.items()}
    rows = defects(test.images[stand_in], test.labels[stand_in], args.seed)
    for npz in args.npz:
        with np.load(npz) as arrays:
            rows[Path(npz).name] = torch.from_numpy(arrays["samples"])[:args.num]

    print(f"{args.data}, N = {args.num}, {len(references)} reference sets, seed {args.seed}; "
          f"feature spaces: {', '.join(spaces)} (features.ClassifierConfig(), features.STRICT_CLASSIFIER)\n")
    print("defect | " + " | ".join(f"{name} | x floor" for name in spaces))
    print("---" + " | --- | ---" * len(spaces))
    floors = {}
    for row, images in rows.items():
        cells = []
        for name, net in nets.items():
            features = classify(net, images)[0]
            distance = sum(frechet_distance(features, reference) for reference in reference_features[name]) \
                / len(references)
            floors.setdefault(name, distance)
            cells.append(f"{distance:.1f} | {distance / floors[name]:.1f}")
        print(f"{row} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
