"""Sample-quality statistics: a small classifier the package trains itself, the Fréchet distance in
its feature space, the entropy of its class histogram, and a nearest-training-image memorisation rate.

Inception weights cannot be assumed here, and for 28x28 grayscale data they are the wrong tool, so
the features come from a 2-conv network trained on the dataset's own labelled training split
(a minute or two on a CPU for MNIST, ~99% test accuracy). It is seeded, and cached by a hash of its
config and of the training data as `<data folder>/classifiers/<name>_<hash>.safetensors`, so every
evaluation of the same data uses the same feature space.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn
from tqdm import tqdm

from .atomic import atomic_write_bytes
from .download import data_folder

ARCHITECTURE_VERSION = 1   # bump when Classifier changes, so cached weights are not reused


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 1000          # Adam steps; 1000 x 128 is ~2 epochs of MNIST (~99% test accuracy)
    batch_size: int = 128      # images per step
    lr: float = 1e-3           # Adam learning rate, constant
    width: int = 32            # channels of the first conv; the second has twice as many
    feature_dim: int = 128     # width of the penultimate layer: the Fréchet-distance features
    seed: int = 0              # seeds the initial weights and the data order
    architecture: str = "small"  # small: two 3x3 convs; lenet: LeCun et al. 1998's 5x5 convs and two fc layers
    shift: int = 0             # train on images moved by up to +-shift pixels (uniform per image); 0 = unmoved

    def __post_init__(self):
        for name in ("steps", "batch_size", "width", "feature_dim"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"classifier {name} must be a positive integer; got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"classifier lr must be positive; got {self.lr}")
        if self.architecture not in ("small", "lenet"):
            raise ValueError(f"classifier architecture must be small or lenet; got {self.architecture!r}")
        if not (isinstance(self.shift, int) and self.shift >= 0):
            raise ValueError(f"classifier shift must be an integer >= 0; got {self.shift!r}")


# The second, stricter feature space `diffunet eval` reports beside the first ("FD strict"): a different
# architecture, trained twice as long on randomly shifted images, from another seed. Shift augmentation
# makes its features follow the shape of a digit rather than its exact position, and a real-vs-real floor
# measured in it is smaller relative to shape defects (benchmarks/fd_calibration.py prints both columns).
STRICT_CLASSIFIER = ClassifierConfig(steps=2000, architecture="lenet", shift=2, seed=1)


class Classifier(nn.Module):
    """small: conv3x3 -> ReLU -> maxpool -> conv3x3 -> ReLU -> maxpool -> 7x7 average pool -> fc (features).
    lenet (LeCun et al. 1998, "Gradient-based learning applied to document recognition", fig. 2, LeNet-5,
    with ReLU, max-pools and `width` channels): conv5x5 (padded) -> ReLU -> maxpool -> conv5x5 (valid) -> ReLU
    -> maxpool -> 5x5 average pool -> fc -> ReLU -> fc (features). Both end in ReLU -> fc (class logits).
    Any image size of at least 4x4 (lenet: 8x8); at 28x28 the pools give exactly 7x7 and 5x5."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128,
                 architecture: str = "small"):
        super().__init__()
        self.architecture = architecture
        if architecture == "lenet":
            self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2)
            self.conv2 = nn.Conv2d(width, 2 * width, 5)
            self.hidden = nn.Linear(2 * width * 5 * 5, 2 * feature_dim)
            self.fc = nn.Linear(2 * feature_dim, feature_dim)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
            self.fc = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x float [B, C, H, W] in [-1, 1] -> penultimate features [B, feature_dim], before the ReLU
        (after it, units that never fire would be constant 0 and carry no information)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        if self.architecture == "lenet":
            return self.fc(F.relu(self.hidden(F.adaptive_avg_pool2d(h, 5).flatten(1))))   # [B, 2 width * 25] in
        return self.fc(F.adaptive_avg_pool2d(h, 7).flatten(1))                             # [B, 2 width * 49] in

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [B, num_classes]."""
        return self.head(F.relu(self.features(x)))


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, config: ClassifierConfig = ClassifierConfig(),
                     device: str | torch.device = "cpu", progress: bool = False) -> Classifier:
    """Train the classifier on uint8 images [N, C, H, W] with long labels [N]; same seed, same weights
    (on the same device and thread count). Leaves the global RNG state untouched."""
    if images.dtype != torch.uint8 or images.dim() != 4 or min(images.shape[2:]) < 4:
        raise ValueError(f"images must be uint8 [N, C, H, W] with H, W >= 4; got {images.dtype} {tuple(images.shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Classifier(images.shape[1], num_classes, config.width, config.feature_dim,
                           config.architecture).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    permutation, position = torch.randperm(len(images), generator=order), 0
    model.train()
    for _ in tqdm(range(config.steps), disable=not progress, desc="classifier", unit="step"):
        if position + config.batch_size > len(images):                  # next epoch
            permutation, position = torch.randperm(len(images), generator=order), 0
        index = permutation[position:position + config.batch_size]
        position += config.batch_size
        x = images[index].to(device).float() / 127.5 - 1
        if config.shift:
            x = random_shifts(x, config.shift, order)
        loss = F.cross_entropy(model(x), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def random_shifts(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image of x [B, C, H, W] moved by its own (dy, dx), uniform in -shift..shift; the border pixels
    are repeated into the uncovered edge (the background of a digit or an emoji stays its background)."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")              # [B, C, H + 2s, W + 2s]
    offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, top:top + height, left:left + width] for i, (top, left) in enumerate(offsets)])


def cached_classifier(images: Tensor, labels: Tensor, num_classes: int, name: str,
                      config: ClassifierConfig = ClassifierConfig(), cache_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", progress: bool = False) -> tuple[Classifier, Path, bool]:
    """The classifier for this training data and config: loaded from the cache, or trained and cached.

    Args:
        images, labels, num_classes: the labelled training split (uint8 [N, C, H, W], long [N]).
        name: the data's name, the first part of the cache file name.
        cache_dir: the data folder (default $DIFFUNET_DATA, else ~/.cache/diffunet); files go in classifiers/.

    Returns:
        (classifier in eval mode on `device`, its cache file, True when it was trained just now).
    """
    spec = {"config": asdict(config), "architecture": ARCHITECTURE_VERSION, "in_channels": images.shape[1],
            "num_classes": num_classes}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"
    path = data_folder(cache_dir) / "classifiers" / f"{safe_name}_{digest.hexdigest()[:16]}.safetensors"
    with torch.random.fork_rng(devices=[]):                            # the default init draws numbers
        model = Classifier(images.shape[1], num_classes, config.width, config.feature_dim, config.architecture)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                model.load_state_dict({key: file.get_tensor(key) for key in file.keys()})
            return model.to(device).eval(), path, False
        except Exception:  # noqa: BLE001 - a truncated or foreign file: train again and replace it
            pass
    model = train_classifier(images, labels, num_classes, config, device, progress)
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={"diffunet_classifier": json.dumps(spec)}))
    return model, path, True


@torch.no_grad()
def classify(classifier: Classifier, images: Tensor, batch_size: int = 500,
             device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """uint8 (or float in [-1, 1]) images [N, C, H, W] -> (features float64 [N, F], predicted classes long [N])."""
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        h = classifier.features(x)
        features.append(h.double().cpu())
        predictions.append(classifier.head(F.relu(h)).argmax(1).cpu())
    return torch.cat(features), torch.cat(predictions)


# ---- the Fréchet distance --------------------------------------------------------------------------

def sqrtm_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix: V diag(sqrt(max(w, 0))) V^T."""
    matrix = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982):
        ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^1/2 cov2 cov1^1/2)^1/2).
    The cross term uses the symmetric product, whose eigenvalues are those of cov1 cov2 but come from
    eigh in float64, never from a general (non-symmetric) matrix square root."""
    mu1, cov1, mu2, cov2 = (value.double() for value in (mu1, cov1, mu2, cov2))
    root1 = sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = ((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(0.0, distance.item())


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [F] and unbiased covariance [F, F] of features [N, F], in float64."""
    features = features.double()
    if len(features) < 2:
        raise ValueError("the Fréchet distance needs at least 2 images per set; raise --num")
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def frechet_distance(features1: Tensor, features2: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N1, F] and [N2, F]."""
    return frechet_distance_from_stats(*feature_stats(features1), *feature_stats(features2))


# ---- class histogram and memorisation --------------------------------------------------------------

def class_entropy(predictions: Tensor, num_classes: int) -> float:
    """Entropy in bits of the histogram of predicted classes: log2(num_classes) when uniform, 0 for one class."""
    p = torch.bincount(predictions.long(), minlength=num_classes).double() / len(predictions)
    p = p[p > 0]
    return max(0.0, -(p * p.log2()).sum().item())


@torch.no_grad()
def nearest_distances(queries: Tensor, reference: Tensor, batch_size: int = 1024) -> Tensor:
    """L2 distance from each query image to its nearest reference image, pixels scaled to [0, 1] [N].
    Both uint8 (or float in [0, 1]) [*, C, H, W]. The nearest image is found with ||a||^2 + ||b||^2 - 2 a.b
    in float32 chunks; its distance is then recomputed directly, so an exact copy gives exactly 0."""
    as_rows = lambda x, dtype: (x.to(dtype) / 255 if x.dtype == torch.uint8 else x.to(dtype)).flatten(1)
    rows = as_rows(reference, torch.float32)
    norms = (rows ** 2).sum(1)
    nearest = []
    for start in range(0, len(queries), batch_size):
        q = queries[start:start + batch_size]
        q32 = as_rows(q, torch.float32)
        index = ((q32 ** 2).sum(1, keepdim=True) + norms - 2 * q32 @ rows.T).argmin(1)
        nearest.append((as_rows(q, torch.float64) - as_rows(reference[index], torch.float64)).norm(dim=1))
    return torch.cat(nearest)


def memorisation_rate(sample_distances: Tensor, real_distances: Tensor, quantile: float = 0.01) -> tuple[float, float]:
    """Fraction of samples closer to their nearest training image than `threshold`, the `quantile` of the
    real held-out images' nearest distances (so about `quantile` of real images fall under it).
    Returns (rate, threshold); a rate well above `quantile` means the model copies training images."""
    threshold = torch.quantile(real_distances.double(), quantile).item()
    return (sample_distances.double() < threshold).double().mean().item(), threshold

