"""Data: every source, every bad input, the upstream download over 127.0.0.1, grids and PNG writing."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import shutil
import socket
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet import download
from diffunet.data import BUILTIN_FILE, ImageData, build_builtin_subset, load_data
from diffunet.images import make_grid, save_image, to_model_range, to_uint8
from diffunet.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist.npz").exists(), reason="needs ../shared/data/mnist.npz")
needs_fashion = pytest.mark.skipif(not (SHARED_DATA / "fashion_mnist.npz").exists(),
                                   reason="needs ../shared/data/fashion_mnist.npz")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def no_user_data_folder(monkeypatch, tmp_path):
    """Never read or write the real ~/.cache/diffunet, never reach a real mirror."""
    monkeypatch.setenv("DIFFUNET_DATA", str(tmp_path / "no-data-here"))
    monkeypatch.setenv("DIFFUNET_MNIST_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("DIFFUNET_FASHION_MNIST_URL", "http://127.0.0.1:9/")


def load(source, **options) -> ImageData:
    return load_data(source, progress=False, **options)


# --- built-in and full sets -----------------------------------------------------------------------

def test_builtin_is_small_shipped_and_licensed():
    data = load("builtin")
    assert data.images.shape == (10_000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.long and data.labels.shape == (10_000,)
    assert data.num_classes == 10 and data.name == "builtin" and data.class_names[3] == "3"
    assert torch.bincount(data.labels).min() > 800
    assert BUILTIN_FILE.stat().st_size < 3_000_000
    licence = (BUILTIN_FILE.parent / "MNIST_LICENSE.txt").read_text()
    assert "LeCun" in licence and "Cortes" in licence and "Burges" in licence and "CC BY-SA 3.0" in licence
    with pytest.raises(DataError, match="mnist"):
        load("builtin", split="test")


@needs_mnist
def test_builtin_is_the_first_10k_mnist_digits(tmp_path):
    with np.load(SHARED_DATA / "mnist.npz") as full:
        images, labels = full["x_train"][:10_000], full["y_train"][:10_000]
    data = load("builtin")
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(data.labels.numpy(), labels)
    build_builtin_subset(SHARED_DATA / "mnist.npz", tmp_path / "subset.npz", count=50)
    with np.load(tmp_path / "subset.npz") as subset:
        np.testing.assert_array_equal(subset["images"], images[:50])


def test_builtin_resized_to_rgb():
    data = load("builtin", image_size=16, channels=3)
    assert data.images.shape == (10_000, 3, 16, 16)
    assert torch.equal(data.images[:, 0], data.images[:, 2])


@needs_mnist
@needs_fashion
@pytest.mark.parametrize("name, counts", [("mnist", MNIST_TEST_COUNTS), ("fashion-mnist", [1000] * 10)])
def test_full_sets_from_the_data_folder(monkeypatch, name, counts):
    monkeypatch.setenv("DIFFUNET_DATA", str(SHARED_DATA))
    test = load(name, split="test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.num_classes == 10 and test.name == name
    assert torch.bincount(test.labels).tolist() == counts
    if name == "mnist":
        train = load(name)
        assert train.images.shape == (60_000, 1, 28, 28)
        assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
    else:
        assert test.class_names[9] == "Ankle boot"


@needs_mnist
def test_cache_dir_argument_wins_over_the_environment():
    data = load("mnist", split="test", cache_dir=SHARED_DATA)  # $DIFFUNET_DATA points at an empty folder
    assert len(data.images) == 10_000


# --- the upstream download, served from 127.0.0.1 -------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: 0, 0, 0x08, ndim, big-endian sizes, data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_files(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in download.REMOTE_DATASETS["mnist"].files:
        (folder / file.name).write_bytes(gzip.compress(idx_bytes(arrays[file.key]), compresslevel=1))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a threaded HTTP server on 127.0.0.1 for that folder."""
    servers = []

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/files"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def upstream_mnist(tmp_path_factory):
    """The four classic MNIST .gz idx files, rebuilt byte for byte (before gzip) from mnist.npz."""
    if not (SHARED_DATA / "mnist.npz").exists():
        pytest.skip("needs ../shared/data/mnist.npz")
    with np.load(SHARED_DATA / "mnist.npz") as full:
        arrays = {key: full[key] for key in full.files}
    root = tmp_path_factory.mktemp("upstream")
    write_idx_files(root / "files", arrays)
    return root, arrays


def test_mnist_download_is_verified_and_cached(upstream_mnist, serve, monkeypatch, tmp_path):
    root, arrays = upstream_mnist
    monkeypatch.setenv("DIFFUNET_MNIST_URL", serve(root))
    cache = tmp_path / "cache"
    data = load_data("mnist", cache_dir=cache, progress=True)  # the sha256 of DATA.md must match
    np.testing.assert_array_equal(data.images[:, 0].numpy(), arrays["x_train"])
    np.testing.assert_array_equal(data.labels.numpy(), arrays["y_train"])
    assert [path.name for path in cache.iterdir()] == ["mnist.npz"]
    with np.load(cache / "mnist.npz") as cached:
        assert sorted(cached.files) == ["x_test", "x_train", "y_test", "y_train"]
        np.testing.assert_array_equal(cached["y_test"], arrays["y_test"])
    monkeypatch.setenv("DIFFUNET_MNIST_URL", "http://127.0.0.1:9/")  # from now on the cache alone
    assert torch.equal(load("mnist", split="test", cache_dir=cache).labels, torch.from_numpy(arrays["y_test"]).long())


def test_corrupted_download_is_rejected_and_not_cached(upstream_mnist, serve, monkeypatch, tmp_path):
    root, arrays = upstream_mnist
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "files", corrupt / "files")
    labels = arrays["y_test"].copy()
    labels[123] = (labels[123] + 1) % 10  # a valid gzip of the wrong bytes
    (corrupt / "files" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    monkeypatch.setenv("DIFFUNET_MNIST_URL", serve(corrupt))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"sha256.*place mnist\.npz .*DIFFUNET_DATA") as error:
        load("mnist", cache_dir=cache)
    assert "\n" not in str(error.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_download_errors_name_the_fix(monkeypatch, serve, tmp_path):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("DIFFUNET_MNIST_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(DataError, match=r"could not download .*place mnist\.npz"):
        load("mnist", cache_dir=tmp_path / "cache")
    (tmp_path / "files").mkdir()  # a server that has no such files: HTTP 404
    monkeypatch.setenv("DIFFUNET_MNIST_URL", serve(tmp_path))
    with pytest.raises(DataError, match="404"):
        load("mnist", cache_dir=tmp_path / "cache")
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="delete it"):
        load("mnist", cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "cache" / "mnist.npz", x_train=np.zeros((2, 28, 28)), y_train=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="expected uint8"):
        load("mnist", cache_dir=tmp_path / "cache")


def test_fashion_download_checks_the_md5_of_the_gz_files(monkeypatch, serve, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), "y_train": np.arange(6, dtype=np.uint8),
              "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), "y_test": np.arange(4, dtype=np.uint8)}
    write_idx_files(tmp_path / "files", arrays)
    dataset = download.REMOTE_DATASETS["fashion-mnist"]
    files = tuple(dataclasses.replace(file, digest=hashlib.md5((tmp_path / "files" / file.name).read_bytes()).hexdigest())
                  for file in dataset.files)
    monkeypatch.setitem(download.REMOTE_DATASETS, "fashion-mnist", dataclasses.replace(dataset, files=files))
    monkeypatch.setenv("DIFFUNET_FASHION_MNIST_URL", serve(tmp_path))
    data = load("fashion-mnist", split="test", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.images[:, 0].numpy(), arrays["x_test"])
    assert data.class_names[0] == "T-shirt/top" and (tmp_path / "cache" / "fashion_mnist.npz").exists()
    (tmp_path / "cache" / "fashion_mnist.npz").unlink()
    monkeypatch.setitem(download.REMOTE_DATASETS, "fashion-mnist", dataset)  # the real md5s do not match
    with pytest.raises(DataError, match=r"md5.*fashion_mnist\.npz"):
        load("fashion-mnist", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_read_idx_rejects_malformed_files():
    image = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(download.read_idx(idx_bytes(image)), image)
    with pytest.raises(ValueError):
        download.read_idx(idx_bytes(image)[:-1])
    with pytest.raises(ValueError):
        download.read_idx(b"\x00\x00\x0d\x01" + idx_bytes(image)[4:])  # float idx


# --- image folders --------------------------------------------------------------------------------

def gray(value: int, size=(12, 20)) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


def test_folder_labels_come_from_sorted_subfolders(tmp_path):
    for label, value in (("dog", 20), ("cat", 10)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(gray(value + i)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(b"ignored")
    data = load(tmp_path)
    assert data.images.shape == (6, 1, 12, 20)  # native, non-square size kept; gray stays one channel
    assert data.class_names == ("cat", "dog") and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[:, 0, 0, 0].tolist() == [10, 11, 12, 20, 21, 22]


@pytest.mark.parametrize("layout", ["flat", "one_subfolder"])
def test_folder_without_classes_is_unlabelled(tmp_path, layout):
    folder = tmp_path / "faces"
    (folder / "all" if layout == "one_subfolder" else folder).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(gray(i)).save(folder / ("all" if layout == "one_subfolder" else "") / f"{i}.bmp")
    data = load(folder)
    assert data.labels is None and data.num_classes is None and data.name == "faces"


def write_mixed_modes(folder: Path) -> None:
    """One file per Pillow mode and format; pixel (0, 0) of each decodes to the gray value of its name."""
    folder.mkdir()
    Image.fromarray(gray(100)).save(folder / "a_l.png")
    Image.fromarray(np.stack([gray(100), gray(255)], -1), "LA").save(folder / "b_la.png")
    Image.fromarray(np.full((12, 20), 65535, np.uint16)).save(folder / "c_i16.png")  # 16-bit -> 255
    Image.fromarray(np.full((12, 20), 257 * 100, np.int32)).save(folder / "d_i32.tif")  # mode I
    Image.fromarray(gray(255)).convert("1").save(folder / "e_1.png")
    Image.fromarray(gray(100)).convert("P").save(folder / "f_p.gif")
    Image.fromarray(gray(100)).save(folder / "g_l.webp", lossless=True)
    Image.fromarray(gray(100)).save(folder / "h_l.jpg", quality=100)


def test_mixed_gray_modes_stay_one_channel(tmp_path):
    write_mixed_modes(tmp_path / "gray")
    data = load(tmp_path / "gray")
    assert data.images.shape == (8, 1, 12, 20)
    assert data.images[:, 0, 0, 0].tolist() == [100, 100, 255, 100, 255, 100, 100, 100]


def test_mixed_colour_modes_become_rgb(tmp_path):
    folder = tmp_path / "colour"
    write_mixed_modes(folder)
    red = np.zeros((12, 20, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(folder / "i_rgb.png")
    Image.fromarray(np.concatenate([red, gray(128)[..., None]], -1), "RGBA").save(folder / "j_rgba.png")
    palette = Image.new("P", (20, 12), 0)  # index 0 = red, index 1 (unused) transparent
    palette.putpalette([200, 0, 0, 0, 0, 0])
    palette.save(folder / "k_p.png", transparency=1)
    data = load(folder)
    assert data.images.shape == (11, 3, 12, 20)
    assert data.images[:8, :, 0, 0].tolist() == [[v] * 3 for v in [100, 100, 255, 100, 255, 100, 100, 100]]
    assert data.images[8:, :, 0, 0].tolist() == [[200, 0, 0], [100, 0, 0], [200, 0, 0]]  # alpha over black
    assert load(folder, channels=1).images.shape == (11, 1, 12, 20)
    assert load(folder, image_size=8).images.shape == (11, 3, 8, 8)  # resizes L, LA, RGB and RGBA alike
    rgba = load(folder, channels=4).images
    assert rgba[:, 3, 0, 0].tolist() == [255, 255, 255, 255, 255, 255, 255, 255, 255, 128, 255]


def test_folder_resize_shorter_side_and_centre_crop(tmp_path):
    wide = np.zeros((20, 60), np.uint8)
    wide[:, 12:48], wide[:, 48:] = 200, 50
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.ascontiguousarray(wide.T)).save(tmp_path / "tall.png")
    Image.fromarray(gray(200, (10, 10))).save(tmp_path / "small.png")
    data = load(tmp_path, image_size=10)
    assert data.images.shape == (3, 1, 10, 10)
    assert (data.images.int() - 200).abs().max() <= 1  # only the middle band of each survives the crop
    assert load(tmp_path, image_size=24).images.shape == (3, 1, 24, 24)  # upscaling works too


# --- npz arrays -----------------------------------------------------------------------------------

def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 12, 20), dtype=np.uint8)
    np.savez(tmp_path / "split.npz", x_train=x, y_train=np.array([0, 1, 2, 1, 0]), x_test=x[:2], y_test=np.array([3, 3]))
    data = load(tmp_path / "split.npz")
    assert data.images.shape == (5, 1, 12, 20) and data.num_classes == 3 and data.name == "split"
    np.testing.assert_array_equal(data.images[:, 0].numpy(), x)
    assert load(tmp_path / "split.npz", split="test").labels.tolist() == [3, 3]
    np.savez(tmp_path / "named.npz", images=x, labels=np.arange(5, dtype=np.uint8))
    assert load(tmp_path / "named.npz").labels.dtype == torch.long
    colour = rng.integers(0, 256, (5, 12, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "last.npz", samples=colour)
    np.savez(tmp_path / "first.npz", colour.transpose(0, 3, 1, 2))
    np.save(tmp_path / "array.npy", colour)
    for name in ("last.npz", "first.npz", "array.npy"):
        data = load(tmp_path / name)
        assert data.labels is None and torch.equal(data.images, torch.from_numpy(colour).permute(0, 3, 1, 2))
    assert load(tmp_path / "last.npz", image_size=8, channels=1).images.shape == (5, 1, 8, 8)


# --- bad input: one line naming the fix -----------------------------------------------------------

def truncated_png(folder: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "ok.png")
    (folder / "cut.png").write_bytes((folder / "ok.png").read_bytes()[:200])
    return folder


def mixed_sizes(folder: Path) -> Path:
    Image.fromarray(gray(1, (8, 8))).save(folder / "a.png")
    Image.fromarray(gray(1, (8, 9))).save(folder / "b.png")
    return folder


def loose_and_nested(folder: Path) -> Path:
    (folder / "cat").mkdir()
    Image.fromarray(gray(1)).save(folder / "cat" / "a.png")
    Image.fromarray(gray(1)).save(folder / "loose.png")
    return folder


def npz_file(**arrays):
    def make(folder: Path) -> Path:
        np.savez(folder / "data.npz", **arrays)
        return folder / "data.npz"
    return make


def write(name: str, content: bytes, *, load_folder: bool = True):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder if load_folder else folder / name
    return make


BAD_INPUTS = {
    "missing path": (lambda folder: folder / "nope", "does not exist"),
    "empty folder": (lambda folder: folder, "is empty"),
    "no images": (write("notes.txt", b"hello"), "has no images"),
    "truncated png": (truncated_png, "cut.png"),
    "not an image": (write("fake.png", b"this is text"), "fake.png"),
    "mixed sizes": (mixed_sizes, "--image-size"),
    "loose and nested": (loose_and_nested, "loose.png"),
    "npz wrong keys": (npz_file(pixels=np.zeros((2, 4, 4), np.uint8), targets=np.zeros(2)), "rename them"),
    "npz wrong dtype": (npz_file(images=np.zeros((2, 4, 4), np.float32)), "uint8"),
    "npz wrong shape": (npz_file(images=np.zeros((2, 4), np.uint8)), "shape"),
    "npz bad labels": (npz_file(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, np.int64)), "labels"),
    "npz pickled": (npz_file(images=np.array([{"a": 1}], dtype=object)), "cannot read"),
    "npz not a zip": (write("junk.npz", b"not a zip file", load_folder=False), "cannot read"),
    "unknown file": (write("data.csv", b"1,2,3", load_folder=False), "neither a folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_data_error(tmp_path, case):
    make, fragment = BAD_INPUTS[case]
    with pytest.raises(DataError) as error:
        load(make(tmp_path))
    message = str(error.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize("options, fragment", [({"image_size": 0}, "--image-size"), ({"image_size": -3}, "--image-size"),
                                               ({"channels": 2}, "--channels"), ({"split": "val"}, "split")])
def test_bad_options(options, fragment):
    with pytest.raises(DataError, match=fragment):
        load("builtin", **options)


# --- conversions, grids, PNG ----------------------------------------------------------------------

def test_model_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(u)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u)
    assert to_uint8(torch.tensor([-5.0, 5.0, float("nan")])).tolist() == [0, 255, 128]


def test_make_grid_layout():
    images = torch.arange(1, 6, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 3)  # image i is all i+1
    grid = make_grid(images, nrow=2)
    assert grid.shape == (1, 3 * 4 + 2, 2 * 5 + 2) and grid.dtype == torch.uint8
    for i in range(5):
        top, left = 2 + (i // 2) * 4, 2 + (i % 2) * 5
        assert (grid[0, top:top + 2, left:left + 3] == i + 1).all()
    assert grid.sum() == sum(6 * (i + 1) for i in range(5))  # padding and the empty cell are 0
    assert make_grid(images).shape == (1, 2 * 4 + 2, 3 * 5 + 2)  # ceil(sqrt(5)) = 3 per row
    assert make_grid(images, nrow=10).shape == (1, 4 + 2, 5 * 5 + 2)
    assert torch.equal(make_grid(to_model_range(images), nrow=2), grid)
    with pytest.raises(ValueError):
        make_grid(torch.zeros(0, 1, 2, 2))


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_save_image_png_round_trip(tmp_path, channels, mode):
    image = torch.from_numpy(np.random.default_rng(channels).integers(0, 256, (channels, 12, 20), dtype=np.uint8))
    save_image(image, tmp_path / "out" / "image.png")
    with Image.open(tmp_path / "out" / "image.png") as picture:
        assert picture.format == "PNG" and picture.mode == mode
        array = np.array(picture).reshape(12, 20, channels)
    assert torch.equal(torch.from_numpy(array).permute(2, 0, 1), image)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["image.png"]  # no temp file left
    save_image(to_model_range(image[None].expand(3, -1, -1, -1)), tmp_path / "grid.png")  # a float batch
    assert Image.open(tmp_path / "grid.png").size == (2 * 22 + 2, 2 * 14 + 2)  # 2 per row
