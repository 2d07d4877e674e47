"""The real images an evaluation compares against, and the Fréchet distance to them with its floor.

Every real set is drawn at random (seeded) from the test images, never a block of them: the MNIST
test set is ordered (its first 5,000 digits come from cleaner writers than its last 5,000, says the
MNIST page), and blocks from its start made a floor (7.3) far below the FD of random training
digits (25-30), an unreachable target for any model of the training data.

Which real data: the run's own (`--data` overrides). A source with a test split (mnist,
fashion-mnist, an .npz with x_test) is used as it is. The built-in set is the first 10,000 MNIST
training digits, so when full MNIST is on disk its test set is the reference and the classifier is
the full-MNIST one (the same feature space as for `--data mnist` runs); otherwise, and for any
source without a test split, a random fifth of the training images (at most 10,000, seed 0) is held
out as the reference, and the classifier trains on the rest with their labels (subfolder names for a
folder). The denoiser saw those images, which the report says.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from .data import ImageData, load_data
from .download import data_folder
from .errors import DataError, UserError
from .features import ClassifierConfig, cached_classifier, class_entropy, classify, frechet_distance

MAX_HELD_OUT = 10_000          # at most this many training images are held out when there is no test split
HELD_OUT_SEED = 0              # which ones: a random fifth drawn with this seed, the same in every evaluation
MAX_REFERENCES = 4             # FD and floor are means over this many disjoint reference sets of N, where they fit


@dataclass
class EvalData:
    train: ImageData          # the denoiser's training images (nearest-neighbour search)
    test: ImageData           # the reference: NLL images, FD reference, memorisation calibration
    labelled: ImageData       # the classifier's training split (may be unlabelled: then no classifier)
    reference: str            # what `test` is, in words


def eval_data(source: str, train_config: dict, progress: bool = False) -> EvalData:
    """The real images an evaluation compares against (see the module docstring for the policy)."""
    options = {"image_size": train_config.get("image_size"), "channels": train_config.get("channels"),
               "alpha_background": train_config.get("alpha_background", 0), "progress": progress}
    train = load_data(source, **options)
    if source == "builtin" and (data_folder() / "mnist.npz").is_file():
        return EvalData(train, load_data("mnist", split="test", **options), load_data("mnist", **options),
                        "MNIST test set (the built-in data are MNIST training digits)")
    if source != "builtin":
        try:
            test = load_data(source, split="test", **options)
            return EvalData(train, test, train, f"{train.name} test split")
        except DataError:
            pass
    held = min(len(train.images) // 5, MAX_HELD_OUT)
    if held < 2:
        raise UserError(f"{source} has {len(train.images)} images and no test split; give --data with a test split")
    # A seeded random draw, not the last images: folders are read class by class, so their tail is one class.
    order = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    cut = lambda data, part: replace(data, images=data.images[part],
                                     labels=data.labels[part] if data.labels is not None else None)
    kept = cut(train, order[:-held].sort().values)
    return EvalData(kept, cut(train, order[-held:].sort().values), kept,
                    f"{held} training images held out at random (seed {HELD_OUT_SEED}; no test split, "
                    f"and the denoiser trained on them)")


def check_reference(test: ImageData, source: str, image_shape: tuple[int, ...], num: int) -> None:
    """A UserError unless the reference images have the run's [C, H, W] and at least `num` >= 2 of them."""
    if tuple(test.images.shape[1:]) != image_shape:
        raise UserError(f"data (--data) {source} has images of shape {tuple(test.images.shape[1:])} but the model "
                        f"makes {image_shape}; evaluate against the run's data")
    if not 2 <= num <= len(test.images):
        raise UserError(f"num (--num) must be in 2..{len(test.images)} (the reference has "
                        f"{len(test.images)} images); got {num}")


def split_real(order: torch.Tensor, num: int) -> list[torch.Tensor]:
    """A random order of the test images cut into disjoint index sets of `num`: at most MAX_REFERENCES + 1."""
    return [order[start:start + num] for start in range(0, (len(order) // num) * num, num)][:MAX_REFERENCES + 1]


def feature_statistics(samples: torch.Tensor, labels: torch.Tensor | None, real: EvalData, order: torch.Tensor,
                        config: ClassifierConfig, device: torch.device, progress: bool,
                        strict: ClassifierConfig | None = None, stand_in_is: str = "other random test images") -> dict:
    """The "classifier", "fd" and "entropy" sections, and with a `strict` classifier config "classifier_strict"
    and "fd_strict", the same FD in that second feature space (features.STRICT_CLASSIFIER). The test
    images, in the random `order`, are cut into sets of N: the first is the real stand-in for the
    samples (`stand_in_is` says what it is: for a task run, the outputs' own truths), the next (up to
    MAX_REFERENCES) are references. FD is the mean distance from the samples to each reference, the floor
    the same mean from the stand-in. With room for one set only, the stand-in is the last N training images."""
    started, num = time.perf_counter(), len(samples)
    sets = split_real(order, num)
    if len(sets) >= 2:
        stand_in, references = real.test.images[sets[0]], sets[1:]
        stand_in_name = f"{num} {stand_in_is}"
    else:
        stand_in, references = real.train.images[-num:], sets
        stand_in_name = f"the last {num} training images"
    labelled, report = real.labelled, {}
    for suffix, classifier_config in (("", config), ("_strict", strict)):
        if classifier_config is None:
            continue
        net, path, trained = cached_classifier(labelled.images, labelled.labels, labelled.num_classes, labelled.name,
                                               classifier_config, device=device, progress=progress)
        sample_features, sample_classes = classify(net, samples, device=device)
        stand_in_features, _ = classify(net, stand_in, device=device)
        reference = [classify(net, real.test.images[index], device=device)              # (features, classes)
                     for index in references]
        values = [frechet_distance(sample_features, features) for features, _ in reference]
        floors = [frechet_distance(stand_in_features, features) for features, _ in reference]
        fd, floor = sum(values) / len(values), sum(floors) / len(floors)
        real_classes = reference[0][1]
        accuracy = (real_classes == real.test.labels[references[0]]).double().mean().item() \
            if real.test.labels is not None else None
        report["classifier" + suffix] = {"path": str(path), "trained_now": trained, **asdict(classifier_config),
                                         "reference_accuracy": accuracy, "seconds": time.perf_counter() - started}
        report["fd" + suffix] = {
            "value": fd, "floor": floor, "ratio": fd / floor if floor > 0 else None, "num": num,
            "values": values, "floors": floors,
            "floor_sets": f"{stand_in_name} vs {len(references)} reference set(s) of {num} random test images"}
        if not suffix:  # the class histogram and label agreement: in the first feature space only
            agreement = (sample_classes == labels).double().mean().item() if labels is not None else None
            report["entropy"] = {"samples_bits": class_entropy(sample_classes, labelled.num_classes),
                                 "real_bits": class_entropy(real_classes, labelled.num_classes),
                                 "max_bits": math.log2(labelled.num_classes), "label_agreement": agreement}
        started = time.perf_counter()
    return report
