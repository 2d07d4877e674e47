"""The full MNIST and Fashion-MNIST sets: read from a local folder, or fetched once from upstream and verified.

The folder is `cache_dir` when given, else $DIFFUNET_DATA, else ~/.cache/diffunet. It holds
`mnist.npz` / `fashion_mnist.npz` with uint8 arrays x_train [60000, 28, 28], y_train [60000],
x_test [10000, 28, 28] and y_test [10000]. When the file is missing, the four upstream gzip idx files
are downloaded (with a tqdm bar), each is checked against its known checksum, parsed, and the four
arrays are cached as one compressed .npz. The cache is written atomically and only after every
check passed, so a failed or interrupted download leaves nothing behind. $DIFFUNET_MNIST_URL and
$DIFFUNET_FASHION_MNIST_URL replace the base URL (the tests serve the files from 127.0.0.1).
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .atomic import atomic_write
from .errors import DataError

DOWNLOAD_TIMEOUT_S = 60  # seconds without a byte before a download is given up


@dataclass(frozen=True)
class UpstreamFile:
    key: str        # array name in the cached .npz: x_train, y_train, x_test or y_test
    name: str       # file name under the base URL
    algorithm: str  # hashlib name of the checksum
    digest: str     # expected hex digest
    of_gzip: bool   # True: digest of the .gz file as served; False: of the decompressed idx file


@dataclass(frozen=True)
class RemoteDataset:
    filename: str                    # cache file name in the data folder
    env_var: str                     # environment variable that replaces the base URL
    mirrors: tuple[str, ...]         # base URLs, tried in order
    files: tuple[UpstreamFile, ...]  # the four idx files
    class_names: tuple[str, ...]     # label index -> name


def _mnist_file(key: str, name: str, sha256: str) -> UpstreamFile:
    return UpstreamFile(key, name, "sha256", sha256, of_gzip=False)


def _fashion_file(key: str, name: str, md5: str) -> UpstreamFile:
    return UpstreamFile(key, name, "md5", md5, of_gzip=True)


REMOTE_DATASETS: dict[str, RemoteDataset] = {
    # LeCun, Cortes, Burges, "The MNIST database of handwritten digits" (CC BY-SA 3.0). The digests
    # are of the classic decompressed idx files, so any faithful mirror (gzipped any way) passes.
    "mnist": RemoteDataset(
        filename="mnist.npz",
        env_var="DIFFUNET_MNIST_URL",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        files=(
            _mnist_file("x_train", "train-images-idx3-ubyte.gz",
                        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            _mnist_file("y_train", "train-labels-idx1-ubyte.gz",
                        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            _mnist_file("x_test", "t10k-images-idx3-ubyte.gz",
                        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            _mnist_file("y_test", "t10k-labels-idx1-ubyte.gz",
                        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        ),
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    # Xiao, Rasul, Vollgraf 2017, "Fashion-MNIST", (c) Zalando SE, MIT. Official split and order.
    "fashion-mnist": RemoteDataset(
        filename="fashion_mnist.npz",
        env_var="DIFFUNET_FASHION_MNIST_URL",
        mirrors=("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                 "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
        files=(
            _fashion_file("x_train", "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            _fashion_file("y_train", "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            _fashion_file("x_test", "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            _fashion_file("y_test", "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}


def data_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the full sets live: `cache_dir`, else $DIFFUNET_DATA, else ~/.cache/diffunet."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("DIFFUNET_DATA"):
        return Path(os.environ["DIFFUNET_DATA"]).expanduser()
    return Path.home() / ".cache" / "diffunet"


def load_remote(name: str, split: str = "train", cache_dir: str | os.PathLike | None = None,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images uint8 [N, 28, 28], labels uint8 [N] and class names of one split of `name`.

    Reads the cached .npz, or downloads, verifies and caches it first.
    """
    dataset = REMOTE_DATASETS[name]
    path = data_folder(cache_dir) / dataset.filename
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as arrays:
                images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile) as error:
            raise DataError(f"{path} is unreadable or lacks x_{split}/y_{split} ({_one_line(error)}); "
                            f"delete it to download it again") from None
        if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DataError(f"{path} holds x_{split} {images.dtype} {images.shape} and y_{split} {labels.shape}; "
                            f"expected uint8 [N, 28, 28] and [N]; delete it to download it again")
    else:
        arrays = _download(dataset, path, progress)
        _save_cache(arrays, path)
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    return images, labels, dataset.class_names


def read_idx(data: bytes) -> np.ndarray:
    """Parse an idx file (LeCun's format): bytes 0, 0, 0x08 (uint8), ndim; ndim big-endian uint32 sizes; data."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError("not an uint8 idx file")
    header = 4 + 4 * data[3]
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(f"idx file of shape {shape} has {len(data) - header} data bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _download(dataset: RemoteDataset, path: Path, progress: bool) -> dict[str, np.ndarray]:
    """Fetch and verify the four idx files from the first base URL that serves them all intact."""
    override = os.environ.get(dataset.env_var)
    bases = (override,) if override else dataset.mirrors
    remedy = (f"place {dataset.filename} (uint8 arrays x_train, y_train, x_test, y_test) in "
              f"{path.parent}, or set $DIFFUNET_DATA to a folder that holds it")
    reason = ""
    for base in bases:
        try:
            return {file.key: _fetch_verified(base.rstrip("/") + "/" + file.name, file, progress)
                    for file in dataset.files}
        except _FetchError as error:
            reason = str(error)
    raise DataError(f"{reason}; {remedy}")


class _FetchError(Exception):
    """One upstream file could not be fetched or failed its checks."""


def _fetch_verified(url: str, file: UpstreamFile, progress: bool) -> np.ndarray:
    """Download `url`, check its digest, gunzip and parse it."""
    data = _fetch(url, progress)
    if file.of_gzip:
        _check_digest(data, file, url)
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise _FetchError(f"{url} is not a valid gzip file ({_one_line(error)})") from None
    if not file.of_gzip:
        _check_digest(raw, file, url)
    try:
        return read_idx(raw)
    except ValueError as error:
        raise _FetchError(f"{url}: {error}") from None


def _check_digest(data: bytes, file: UpstreamFile, url: str) -> None:
    digest = hashlib.new(file.algorithm, data).hexdigest()
    if digest != file.digest:
        raise _FetchError(f"{url} failed its {file.algorithm} check (got {digest[:12]}..., "
                          f"expected {file.digest[:12]}...)")


def _fetch(url: str, progress: bool) -> bytes:
    """The body of `url`, with a byte-count progress bar; _FetchError on any network failure."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks = []
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise _FetchError(f"could not download {url} ({_one_line(error)})") from None
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise _FetchError(f"download of {url} stopped after {len(data)} of {total} bytes")
    return data


def _save_cache(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write the verified arrays as one compressed .npz, atomically; warn (and go on) if impossible."""

    def write(temp: str) -> None:
        with open(temp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez_compressed(f, **arrays)

    try:
        atomic_write(path, write)
    except OSError as error:
        warnings.warn(f"could not cache {path} ({_one_line(error)}); it will be downloaded again next "
                      f"time; set DIFFUNET_DATA to a writable folder", stacklevel=3)


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(error).split()) or type(error).__name__
