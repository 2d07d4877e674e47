"""Training images in: every source as one uint8 tensor (images out, grids and PNG files: images.py).

Sources: "builtin" (10,000 MNIST training digits shipped in diffunet/assets/), "mnist" and
"fashion-mnist" (full sets, see download.py), an image folder, or an .npz / .npy of uint8 arrays.
Every source ends as `ImageData.images`, uint8 [N, C, H, W] in memory, so training slices batches
from one tensor instead of decoding files at every step. Bad input raises `DataError` whose one-line
message names the fix.

Channels: C is `channels` when given (1, 3 or 4), else 1 when every image is grayscale-like (a gray
mode, or colour channels that are equal everywhere) and 3 otherwise. Alpha is composited over black
unless C = 4. Sizes: with `image_size`, the shorter side is resized to it (bicubic) and the centre
cropped square; without it, all images must share one size, which is kept.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from .atomic import atomic_write
from .download import load_remote
from .errors import DataError

BUILTIN_FILE = Path(__file__).resolve().parent / "assets" / "mnist_10k.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_SIZE = 8192  # a side beyond this is almost certainly a typo (and would not fit in memory)
SOURCES_HINT = "give an image folder, an .npz file, or one of builtin, mnist, fashion-mnist"


@dataclass
class ImageData:
    """A whole image dataset held in memory."""
    images: torch.Tensor                        # uint8 [N, C, H, W]; C = 1 gray, 3 RGB, 4 RGBA
    labels: torch.Tensor | None                 # long [N] in 0..num_classes-1; None = unlabelled
    num_classes: int | None                     # None when unlabelled
    name: str                                   # builtin, mnist, fashion-mnist, or the file/folder name
    class_names: tuple[str, ...] | None = None  # label -> name (subfolder names for a folder)


def load_data(source: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None,
              split: str = "train", cache_dir: str | os.PathLike | None = None,
              progress: bool = True, alpha_background: int = 0) -> ImageData:
    """Load a dataset as one uint8 tensor.

    Args:
        source: "builtin", "mnist", "fashion-mnist", or a path to an image folder (labels from its
            subfolders when there are two or more) or to an .npz / .npy of uint8 arrays (keys
            x_train/y_train[/x_test/y_test], or images[/labels], or a single array).
        image_size: resize the shorter side to this and centre-crop square; None keeps the native size.
        channels: 1, 3 or 4; None = 1 for grayscale-like data, else 3.
        split: "train" or "test"; "test" needs a source that has one (mnist sets, npz with x_test).
        cache_dir: folder for the full mnist sets (default $DIFFUNET_DATA, else ~/.cache/diffunet).
        progress: show tqdm bars while downloading or decoding.
        alpha_background: gray level 0..255 that transparent pixels are composited on when the
            result has no alpha channel (0 = black, 255 = white).

    Returns:
        ImageData with images uint8 [N, C, H, W].
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 0 < image_size <= MAX_IMAGE_SIZE):
        raise DataError(f"image_size (--image-size) must be an integer in 1..{MAX_IMAGE_SIZE}; got {image_size!r}")
    if channels not in (None, 1, 3, 4):
        raise DataError(f"channels (--channels) must be 1 (gray), 3 (RGB) or 4 (RGBA); got {channels!r}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test'; got {split!r}")
    if isinstance(alpha_background, bool) or not isinstance(alpha_background, int) or not 0 <= alpha_background <= 255:
        raise DataError(f"alpha_background (--alpha-background) must be a gray level in 0..255 (0 black, 255 white); "
                        f"got {alpha_background!r}")
    name = os.fspath(source)
    if name == "builtin":
        if split != "train":
            raise DataError("the built-in set has only training digits; use --data mnist for the test split")
        images, labels = _read_arrays(BUILTIN_FILE, split)
        class_names = tuple(str(digit) for digit in range(10))
    elif name in ("mnist", "fashion-mnist"):
        images, labels, class_names = load_remote(name, split, cache_dir, progress)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"data path {path} does not exist; {SOURCES_HINT}")
        if path.is_dir():
            return _load_folder(path, image_size, channels, split, progress, alpha_background)
        if path.suffix.lower() not in (".npz", ".npy"):
            raise DataError(f"{path} is neither a folder nor an .npz/.npy file; {SOURCES_HINT}")
        images, labels = _read_arrays(path, split)
        name, class_names = path.stem, None
    images = as_nhwc(images, name)
    images = convert_channels(images, channels or (1 if is_gray(images) else 3), alpha_background)
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        images = np.stack([_resize_crop(image, image_size) for image in images])
    return _image_data(images, labels, name, class_names)


def _image_data(images: np.ndarray, labels: np.ndarray | None, name: str,
                class_names: tuple[str, ...] | None) -> ImageData:
    """Wrap uint8 [N, H, W, C] images and integer [N] labels as ImageData."""
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # [N, C, H, W]
    if labels is None:
        return ImageData(tensor, None, None, name, None)
    num_classes = len(class_names) if class_names else int(labels.max()) + 1
    return ImageData(tensor, torch.from_numpy(labels.astype(np.int64)), num_classes, name, class_names)


# --- arrays ---------------------------------------------------------------------------------------

def _read_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and labels (or None) from an .npz / .npy, checked for dtype and agreeing lengths."""
    expected = "keys x_train/y_train, images/labels, or a single array"
    try:
        loaded = np.load(path, allow_pickle=False)  # never unpickle: a file may come from anyone
        if isinstance(loaded, np.ndarray):  # an .npy file
            found = {"images": loaded}
        else:
            with loaded:
                found = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split())
        if "pickle" in reason:  # numpy's own message would suggest allow_pickle=True: never do that
            reason = "it holds pickled Python objects, which are never loaded"
        raise DataError(f"cannot read {path} ({reason}); save it with numpy.savez of uint8 arrays "
                        f"({expected})") from None
    if f"x_{split}" in found:
        images, labels = found[f"x_{split}"], found.get(f"y_{split}")
    elif "images" in found or len(found) == 1:
        if split != "train":
            raise DataError(f"{path} has no test split; add x_test/y_test arrays or use split='train'")
        images, labels = found.get("images", next(iter(found.values()))), found.get("labels")
    else:
        raise DataError(f"{path} has arrays {sorted(found)}; rename them to {expected}")
    if images.dtype != np.uint8:
        raise DataError(f"images in {path} are {images.dtype}; convert them to uint8 0..255 "
                        f"(e.g. (x * 255).round().astype(np.uint8))")
    if images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(f"images in {path} have shape {images.shape}; expected a non-empty "
                        f"[N, H, W], [N, H, W, C] or [N, C, H, W] array")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),) or labels.min() < 0:
            raise DataError(f"labels in {path} must be {len(images)} integers >= 0 (one per image); "
                            f"got {labels.dtype} {labels.shape}")
    return images, labels


def as_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    """[N, H, W], [N, H, W, C] or [N, C, H, W] -> [N, H, W, C] with C in 1..4."""
    if images.ndim == 3:
        return images[..., None]
    if images.shape[-1] in (1, 3, 4):
        return images
    if images.shape[1] in (1, 3, 4):
        return images.transpose(0, 2, 3, 1)
    raise DataError(f"images in {where} have shape {images.shape}; the channel axis (1, 3 or 4) "
                    f"must be second or last")


def is_gray(images: np.ndarray) -> bool:
    """True when [..., C] images are gray (C = 1, or gray + alpha) or their colour channels are equal."""
    if images.shape[-1] <= 2:
        return True
    return bool((images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all())


def convert_channels(images: np.ndarray, channels: int, background: int = 0) -> np.ndarray:
    """uint8 [..., C] with C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA -> [..., channels].

    Without a target alpha, alpha is composited over the gray level `background`:
    (c * alpha + background * (255 - alpha)) / 255. RGB -> gray uses the
    ITU-R 601 luma weights (0.299, 0.587, 0.114), as Pillow's convert("L") does.
    """
    has_alpha = images.shape[-1] in (2, 4)
    color = images[..., :-1] if has_alpha else images
    if channels == 4:
        rgb = np.repeat(color, 3, axis=-1) if color.shape[-1] == 1 else color
        alpha = images[..., -1:] if has_alpha else np.full_like(images[..., :1], 255)
        return np.concatenate([rgb, alpha], axis=-1)
    if has_alpha:
        alpha = images[..., -1:].astype(np.uint32)
        color = ((color.astype(np.uint32) * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)
    if channels == 1 and color.shape[-1] == 3:
        luma = color.astype(np.uint32) @ np.array([299, 587, 114], dtype=np.uint32)
        return ((luma + 500) // 1000).astype(np.uint8)[..., None]
    if channels == 3 and color.shape[-1] == 1:
        return np.repeat(color, 3, axis=-1)
    return color


def _resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: shorter side to `size` (bicubic), then the centre crop."""
    height, width, channels = image.shape
    picture = Image.fromarray(image[..., 0] if channels == 1 else image)
    scale = size / min(height, width)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    picture = picture.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    cropped = np.asarray(picture.crop((left, top, left + size, top + size)))
    return cropped.reshape(size, size, channels)


# --- image folders --------------------------------------------------------------------------------

def _load_folder(folder: Path, image_size: int | None, channels: int | None, split: str,
                 progress: bool, alpha_background: int = 0) -> ImageData:
    """All images under `folder`; labels from subfolders when there are two or more."""
    if split != "train":
        raise DataError("an image folder has no test split; point the data path at the test folder instead")
    if not any(folder.iterdir()):
        raise DataError(f"folder {folder} is empty; put images in it ({', '.join(IMAGE_SUFFIXES)}), "
                        f"optionally one subfolder per class")
    paths = image_paths(folder)
    if not paths:
        raise DataError(f"folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                        f"point the data path at the folder that holds them")
    classes = [path.relative_to(folder).parts[0] if len(path.relative_to(folder).parts) > 1 else None
               for path in paths]
    if None in classes and any(classes):
        loose = paths[classes.index(None)]
        raise DataError(f"{folder} has images both at its top level (e.g. {loose.name}) and in subfolders; "
                        f"move the top-level images into a class subfolder")
    class_names = tuple(sorted(set(classes))) if None not in classes else ()
    images = []
    # A bar only where decoding takes a while; leave=False so an error is the last line on a terminal.
    for path in tqdm(paths, desc="reading images", disable=not progress or len(paths) < 500, leave=False):
        image = read_image(path)  # resized at once, so that big photos are never all held at full size
        if image_size is not None and image.shape[:2] != (image_size, image_size):
            image = _resize_crop(image, image_size)
        if image_size is None and images and image.shape[:2] != images[0].shape[:2]:
            (first_height, first_width), (height, width) = images[0].shape[:2], image.shape[:2]
            raise DataError(f"images in {folder} differ in size ({paths[0].name} is {first_width}x{first_height}, "
                            f"{path.name} is {width}x{height}); pass --image-size N to resize and crop them")
        images.append(image)
    target = channels or (1 if all(image.shape[-1] <= 2 for image in images) else 3)
    images = [convert_channels(image, target, alpha_background) for image in images]
    labels = None
    if len(class_names) > 1:  # one subfolder is just a wrapper, not a class
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[name] for name in classes], dtype=np.int64)
    return _image_data(np.stack(images), labels, folder.resolve().name, class_names if labels is not None else None)


def image_paths(folder: Path) -> list[Path]:
    """The image files under `folder` that a folder dataset reads: no hidden ones, sorted by relative POSIX path."""
    return sorted((path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES
                   and path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)),
                  key=lambda path: path.relative_to(folder).as_posix())


def image_names(folder: Path) -> list[str]:
    """`image_paths(folder)` as relative POSIX names (how pairs and --cond folders match files up)."""
    return [path.relative_to(folder).as_posix() for path in image_paths(folder)]


def read_image(path: Path) -> np.ndarray:
    """Decode one file to uint8 [H, W, C]: C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA (gray content kept gray)."""
    try:
        with Image.open(path) as picture:
            picture.load()
            array = _mode_to_array(_upright(picture))
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image Pillow can read; delete or replace it") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"cannot read image {path} ({reason}); delete or replace it") from None
    if array.shape[-1] >= 3 and is_gray(array):
        array = array[..., [0, 3]] if array.shape[-1] == 4 else array[..., :1]
    return array


def _upright(picture: Image.Image) -> Image.Image:
    """Apply the EXIF orientation that phone photos carry; a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(picture)
    except Exception:  # noqa: BLE001 - the pixels are fine even when the metadata is not
        return picture


def _mode_to_array(picture: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 [H, W, C]; 16- and 32-bit integer gray is read as 0..65535."""
    mode = picture.mode
    if mode.startswith("I"):
        wide = np.asarray(picture).astype(np.int64).clip(0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)[..., None]
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in picture.info
        picture = picture.convert("RGBA" if has_alpha else "RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        converted = {"1": "L", "F": "L", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB"}
        picture = picture.convert(converted.get(mode, "RGB"))  # CMYK, YCbCr, LAB, HSV -> RGB
    array = np.asarray(picture)
    return array[..., None] if array.ndim == 2 else array


def build_builtin_subset(src_npz: str | os.PathLike, dst: str | os.PathLike, count: int = 10_000) -> None:
    """Write the shipped subset: the first `count` training digits of MNIST as compressed uint8.

    Regenerate diffunet/assets/mnist_10k.npz (keys images [N, 28, 28], labels [N]) with
        python -c "from diffunet.data import build_builtin_subset as b; b('mnist.npz', 'diffunet/assets/mnist_10k.npz')"
    where mnist.npz holds the official split in order (x_train, y_train), e.g. ../shared/data/mnist.npz.
    """
    with np.load(src_npz, allow_pickle=False) as arrays:
        images, labels = arrays["x_train"][:count], arrays["y_train"][:count]

    def write(temp: str) -> None:
        with open(temp, "wb") as f:
            np.savez_compressed(f, images=images.astype(np.uint8), labels=labels.astype(np.uint8))

    atomic_write(dst, write)
