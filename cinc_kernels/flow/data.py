"""Image data for the flow: discrete pixel levels in, dequantised ``[0, 1)`` tensors out.

Every data set yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``(C, H, W)`` of levels
``0 … num_levels-1``. :func:`dequantize` turns a batch into the model's continuous input ``(k + u) / num_levels``.

- ``digits``: scikit-learn's bundled handwritten digits (1797 images, 1×8×8, 17 grey levels, no download), split
  once and for all into 1500 training and 297 test images by a fixed permutation.
- ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision's readers with ``download=False`` on a local folder;
  MNIST-like images are zero-padded from 28×28 to 32×32 so that up to 5 levels of squeezing fit.
- ``photos``: ``image_size``×``image_size`` RGB patches (32 by default) cut from the colour photographs that
  installed packages carry (scikit-learn's two sample images; scikit-image's bundled ones when it is installed),
  no download. Each photo's right-hand quarter is the test region, the rest the training region, so no training patch
  overlaps a test patch; training patches are taken at half-patch stride and flipped left-right at random.
- ``imagefolder``: any folder of ``<class>/<image>`` files (``<root>/train`` and ``<root>/test`` if both exist,
  otherwise a fixed 90/10 split), centre-cropped and resized to ``image_size``. Every file is decoded once at
  start-up; unreadable ones (a broken compressed stream included) are skipped with a warning that names them.
  16-bit pixels keep their top 8 bits.
- ``imagenet32``, ``imagenet64``: the downsampled ImageNet of Chrabaszcz, Loshchilov and Hutter (2017) as it is
  distributed, ``.npz`` batches ``train_data_batch_<n>.npz`` and ``val_data.npz`` anywhere under the root, each
  with ``data`` ``(N, 3·S·S)`` uint8 (channel-planar: all red, then green, then blue, rows of ``S``) and
  ``labels`` ``(N,)`` in ``1 … 1000``; the validation batch is the test split.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import glob
import math
import os
import re
import warnings
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from .._optional import optional_import

__all__ = ["DATASETS", "FlippedDataset", "ImageData", "LevelDataset", "dequantize", "describe", "load_data",
           "random_horizontal_flip"]

DATASETS = ("digits", "photos", "mnist", "fashion-mnist", "cifar10", "imagefolder", "imagenet32", "imagenet64")


Item = tuple[torch.Tensor, Any]  # (uint8 image levels, label)


class LevelDataset(Dataset[Item]):
    """Images held in memory: ``images`` ``(N, C, H, W)`` uint8 levels, ``labels`` ``(N,)`` int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Item:
        return self.images[i], self.labels[i]


@dataclasses.dataclass
class ImageData:
    """A data set's two splits and what the model needs to know about them."""

    name: str
    train: Any  # a Dataset with a length, yielding Item
    test: Any
    num_levels: int
    shape: tuple[int, int, int]  # (C, H, W)
    classes: Optional[list[str]] = None
    info: Optional[dict[str, Any]] = None  # how the data were made (sources, split), stored with a run's configuration

    @property
    def n_bits(self) -> float:
        """``log2(num_levels)``: fractional for the digits' 17 levels."""
        return math.log2(self.num_levels)


def dequantize(levels: torch.Tensor, num_levels: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform dequantisation: uint8 levels ``k`` ``(B, C, H, W)`` → float32 ``(k + u) / num_levels`` in
    ``[0, 1)``, ``u ~ U[0, 1)`` drawn from ``generator`` (on the tensor's device)."""
    x = levels.float()
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + u) / num_levels


def random_horizontal_flip(images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image of ``(B, C, H, W)`` mirrored left-right with probability ½, drawn from ``generator`` (on the
    tensor's device; the trainer passes its saved noise generator, so a resumed run flips the same images)."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _reduce_bits(images: torch.Tensor, n_bits: Optional[int]) -> tuple[torch.Tensor, int]:
    """8-bit images reduced to ``n_bits`` (Glow's trick for faces) and their number of levels."""
    if n_bits is None or n_bits == 8:
        return images, 256
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in 1…8 for 8-bit data, got {n_bits}")
    return images >> (8 - n_bits), 2 ** n_bits


def _missing(root: str, files: list[str], what: str, hint: str) -> None:
    absent = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if absent:
        listed = "\n  ".join(os.path.join(root, f) for f in files)
        raise FileNotFoundError(
            f"{what} not found under data root {root!r}: missing {len(absent)} of the expected files\n  {listed}\n"
            f"{hint}"
        )


def _digits() -> ImageData:
    load_digits = optional_import("sklearn.datasets", "flow", "the digits data set").load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), 0…16
    labels = torch.from_numpy(bunch.target).long()
    # A fixed permutation (its own generator, so it never depends on the run's seed): the split is part of the
    # data set's definition and must be the same for every run and every number of processes.
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(20210727))
    train, test = perm[:1500], perm[1500:]
    return ImageData("digits", LevelDataset(images[train], labels[train]), LevelDataset(images[test], labels[test]),
                     17, (1, 8, 8), [str(i) for i in range(10)])


class FlippedDataset(Dataset[Item]):
    """A data set whose images are mirrored left-right with probability 1/2 each time they are read (the draw uses
    the global torch generator, which a checkpoint saves, so a resumed run replays it)."""

    def __init__(self, base: Any):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Item:
        image, label = self.base[i]
        if bool(torch.randint(2, ())):
            image = image.flip(-1)
        return image, label


# scikit-image's colour photographs that its wheel carries (the others need pooch and a network); natural scenes
# only, no synthetic images (colorwheel, logo) and no mostly-black ones (hubble_deep_field, retina).
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
PHOTOS_TEST_FRACTION = 0.25


def _photo_sources() -> list[tuple[str, Any]]:
    """``[(name, uint8 array (H, W, 3))]`` of every bundled colour photograph that loads without a network."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    photos = [(f"sklearn:{os.path.basename(path)}", image) for path, image in zip(bunch.filenames, bunch.images)]
    try:
        import skimage.data
    except ImportError:
        return photos
    for name in _SKIMAGE_PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # absent in this version, or it would need pooch and a download
            continue
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
            image = image[0]
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            photos.append((f"skimage:{name}", image))
    return photos


def _patches(image: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Every ``size``×``size`` window of ``(C, H, W)`` at ``stride``: ``(N, C, size, size)``."""
    windows = image.unfold(1, size, stride).unfold(2, size, stride)  # (C, nh, nw, size, size)
    return windows.permute(1, 2, 0, 3, 4).reshape(-1, image.shape[0], size, size)


def _photos(image_size: Optional[int], n_bits: Optional[int]) -> ImageData:
    size = 32 if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"image_size must be an int >= 2 for photos, got {image_size!r}")
    train: list[torch.Tensor] = []
    test: list[torch.Tensor] = []
    sources: list[dict[str, Any]] = []
    for name, array in _photo_sources():
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
        width = image.shape[2]
        # The test strip holds whole patches only; the training region ends where it begins.
        cut = width - max(size, int(round(width * PHOTOS_TEST_FRACTION)) // size * size)
        if cut < size or image.shape[1] < size:
            continue
        train.append(_patches(image[:, :, :cut], size, max(1, size // 2)))
        test.append(_patches(image[:, :, cut:], size, size))
        sources.append({"name": name, "height": image.shape[1], "width": width, "train_columns": [0, cut],
                        "test_columns": [cut, width], "train_patches": train[-1].shape[0],
                        "test_patches": test[-1].shape[0]})
    if not sources:
        raise ValueError(f"photos: no bundled photograph is at least {size} pixels high and wide enough for a "
                         f"{size}-pixel patch in each region")
    train_images, _ = _reduce_bits(torch.cat(train), n_bits)
    test_images, levels = _reduce_bits(torch.cat(test), n_bits)
    info = {"sources": sources, "patch_size": size, "train_stride": max(1, size // 2), "test_stride": size,
            "test_fraction": PHOTOS_TEST_FRACTION, "train_patches": train_images.shape[0],
            "test_patches": test_images.shape[0], "train_flip": "left-right, p = 1/2"}
    labels = [torch.full((p.shape[0],), i, dtype=torch.long) for i, p in enumerate(train)]
    test_labels = [torch.full((p.shape[0],), i, dtype=torch.long) for i, p in enumerate(test)]
    return ImageData("photos", FlippedDataset(LevelDataset(train_images, torch.cat(labels))),
                     LevelDataset(test_images, torch.cat(test_labels)), levels, (3, size, size),
                     [s["name"] for s in sources], info)


def describe(data: ImageData) -> str:
    """One line: the data set, its split and, when known, its sources."""
    line = f"data {data.name}: {len(data.train)} training / {len(data.test)} test images of {tuple(data.shape)}"
    if data.info and "sources" in data.info:
        line += " from " + ", ".join(f"{s['name']} ({s['train_patches']}/{s['test_patches']})"
                                     for s in data.info["sources"])
        line += (f"; test = the right {data.info['test_fraction']:.0%} of each photo, no patch crosses the split")
    return line


def _open(cls: Any, root: str, train: bool, name: str) -> Any:
    """A torchvision data set with ``download=False``; its refusal (e.g. a checksum mismatch) explained."""
    try:
        return cls(root, train=train, download=False)
    except RuntimeError as exc:
        raise RuntimeError(f"{name}: the expected files are under {root!r} but torchvision refused them ({exc}); "
                           f"they may be truncated or another version: unpack them again") from None


def _mnist_like(name: str, root: str, n_bits: Optional[int]) -> ImageData:
    datasets = optional_import("torchvision", "flow", f"the {name} data set").datasets

    cls, folder = (datasets.MNIST, "MNIST") if name == "mnist" else (datasets.FashionMNIST, "FashionMNIST")
    files = [f"{folder}/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    _missing(root, files, name, f"Put torchvision's {folder} raw files there (unzipped), e.g. with "
             f"torchvision.datasets.{cls.__name__}(root, download=True) on a machine with a network.")
    splits = []
    for train in (True, False):
        ds = _open(cls, root, train, name)
        images = torch.nn.functional.pad(ds.data, (2, 2, 2, 2)).unsqueeze(1)  # 28×28 → 32×32
        images, levels = _reduce_bits(images, n_bits)
        splits.append(LevelDataset(images.contiguous(), ds.targets.clone()))
    return ImageData(name, splits[0], splits[1], levels, (1, 32, 32), list(ds.classes))


def _cifar10(root: str, n_bits: Optional[int]) -> ImageData:
    datasets = optional_import("torchvision", "flow", "the cifar10 data set").datasets

    files = [f"cifar-10-batches-py/{f}" for f in
             ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
              "batches.meta")]
    _missing(root, files, "cifar10", "Unpack the CIFAR-10 python version (cifar-10-python.tar.gz) there.")
    splits = []
    for train in (True, False):
        ds = _open(datasets.CIFAR10, root, train, "cifar10")
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        images, levels = _reduce_bits(images, n_bits)
        splits.append(LevelDataset(images, torch.tensor(ds.targets)))
    return ImageData("cifar10", splits[0], splits[1], levels, (3, 32, 32), list(ds.classes))


class _FolderImages(Dataset[Item]):
    """An ImageFolder (or a subset of it) yielding uint8 ``(3, S, S)`` tensors, reduced to ``n_bits``."""

    def __init__(self, folder: Any, indices: list[int], n_bits: Optional[int]):
        self.folder, self.indices, self.n_bits = folder, indices, n_bits

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        image, label = self.folder[self.indices[i]]
        return _reduce_bits(image, self.n_bits)[0], label

    def path(self, i: int) -> str:
        """The file behind item ``i`` (to match per-image attributes by name)."""
        path: str = self.folder.samples[self.indices[i]][0]
        return path


def _load_rgb(path: str) -> Any:
    """The image file ``path`` as an 8-bit RGB PIL image, decoded in full. 16-bit grey pixels keep their top 8 bits
    (PIL's own conversion would saturate everything above 255 to white; PIL reduces 16-bit colour itself); integer or
    float pixels of no fixed range are refused (``ValueError``) rather than guessed at."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N") or (mode == "I" and image.format == "PNG"):
            # (older Pillows read a 16-bit grey PNG as I)
            pixels = np.asarray(image).astype(np.uint32) >> 8
            return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
        if mode in ("I", "F") or mode.startswith(("I;", "F;")):
            raise ValueError(f"{'float' if mode.startswith('F') else 'integer'} pixels of mode {mode} have no fixed "
                             f"range to scale to 8 bits; convert the file to 8 or 16 bits per channel")
        return image.convert("RGB")


def _unreadable(path: str) -> Optional[str]:
    """Why the image file ``path`` cannot be used (``None`` when it can): PIL checks its structure and chunk
    checksums, then every pixel is decoded, since a broken compressed stream passes the check and shows only when
    decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        _load_rgb(path)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, … for damaged files
        return f"{type(exc).__name__}: {exc}"
    return None


def _drop_unreadable(folder: Any, path: str) -> None:
    """Remove the files PIL cannot read from an ImageFolder, warning once with their names and number, so that a
    damaged file fails nobody mid-run (and always the same files are skipped on resume)."""
    # PIL decodes without holding the GIL, so threads decode files side by side.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(_unreadable, [p for p, _ in folder.samples]))
    bad = [(p, why) for (p, _), why in zip(folder.samples, reasons) if why is not None]
    if not bad:
        return
    bad_paths = {p for p, _ in bad}
    folder.samples = [s for s in folder.samples if s[0] not in bad_paths]
    folder.imgs = folder.samples
    folder.targets = [t for _, t in folder.samples]
    listed = "; ".join(f"{p} ({why})" for p, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    warnings.warn(f"imagefolder: skipping {len(bad)} unreadable image file(s) under {path!r}: {listed}",
                  stacklevel=3)
    if not folder.samples:
        raise FileNotFoundError(f"imagefolder: none of the image files under {path!r} can be read")


def _image_folder(root: str, image_size: Optional[int], n_bits: Optional[int]) -> ImageData:
    torchvision = optional_import("torchvision", "flow", "imagefolder data")
    datasets, transforms = torchvision.datasets, torchvision.transforms

    if image_size is None:
        raise ValueError("imagefolder data needs image_size (e.g. --image-size 32), a multiple of 2**levels")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"imagefolder: data root {root!r} is not a directory; expected {root}/<class>/<image> "
                                f"files, or {root}/train/<class>/<image> and {root}/test/<class>/<image>")
    transform = transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])

    def folder(path: str) -> Any:
        try:
            found = datasets.ImageFolder(path, transform=transform, loader=_load_rgb)
        except (FileNotFoundError, RuntimeError) as exc:
            raise FileNotFoundError(f"imagefolder: no images under {path!r} (expected {path}/<class>/<image> with "
                                    f"a known image extension): {exc}") from None
        _drop_unreadable(found, path)
        return found

    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        train, test = folder(train_dir), folder(test_dir)
        train_set = _FolderImages(train, list(range(len(train))), n_bits)
        test_set = _FolderImages(test, list(range(len(test))), n_bits)
        classes = train.classes
    else:
        full = folder(root)
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(20210727)).tolist()
        n_test = max(1, len(full) // 10)
        train_set = _FolderImages(full, perm[n_test:], n_bits)
        test_set = _FolderImages(full, perm[:n_test], n_bits)
        classes = full.classes
    levels = 256 if n_bits is None else 2 ** n_bits
    return ImageData("imagefolder", train_set, test_set, levels, (3, image_size, image_size), classes)


class _NpzImages(Dataset[Item]):
    """Images held as the distributed ``.npz`` arrays, one per file, never concatenated (ImageNet 64×64 is 15 GB
    of uint8: a copy would double the peak memory): item ``i`` is a ``(3, S, S)`` view into its file's array."""

    def __init__(self, arrays: list[Any], labels: list[Any], side: int, n_bits: Optional[int]):
        self.arrays, self.labels, self.side, self.n_bits = arrays, labels, side, n_bits
        self.starts = [0]
        for a in arrays:
            self.starts.append(self.starts[-1] + a.shape[0])

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> Item:
        if not 0 <= i < len(self):
            raise IndexError(i)
        f = bisect.bisect_right(self.starts, i) - 1
        row = self.arrays[f][i - self.starts[f]]
        image = torch.from_numpy(row.reshape(3, self.side, self.side).copy())
        return _reduce_bits(image, self.n_bits)[0], int(self.labels[f][i - self.starts[f]])


def _npz_batches(paths: list[str], side: int, name: str) -> tuple[list[Any], list[Any]]:
    import numpy as np

    arrays, labels = [], []
    for path in paths:
        try:
            with np.load(path) as archive:
                data, label = archive["data"], archive["labels"]
        except KeyError as exc:
            raise ValueError(f"{name}: {path} lacks the array {exc} (expected 'data' and 'labels')") from None
        except Exception as exc:  # zip and pickle errors of a damaged file
            raise RuntimeError(f"{name}: {path} cannot be read ({type(exc).__name__}: {exc}); unpack it "
                               f"again") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side * side:
            raise ValueError(f"{name}: {path} holds data {data.dtype} {data.shape}; expected uint8 "
                             f"(N, {3 * side * side}) for {side}×{side} RGB images (is it the other resolution?)")
        label = np.asarray(label).reshape(-1)
        if label.shape[0] != data.shape[0]:
            raise ValueError(f"{name}: {path} has {data.shape[0]} images but {label.shape[0]} labels")
        arrays.append(data)
        labels.append(label.astype(np.int64) - 1)  # the archives count classes from 1
    return arrays, labels


def _imagenet(name: str, root: str, n_bits: Optional[int]) -> ImageData:
    side = 32 if name == "imagenet32" else 64
    _reduce_bits(torch.zeros(1, dtype=torch.uint8), n_bits)  # n_bits in range, before reading gigabytes

    def number(path: str) -> int:
        match = re.search(r"(\d+)\.npz$", path)
        if match is None:
            raise ValueError(f"{name}: {path} is not numbered like train_data_batch_<n>.npz")
        return int(match.group(1))

    train = sorted(glob.glob(os.path.join(root, "**", "train_data_batch_*.npz"), recursive=True), key=number)
    test = sorted(glob.glob(os.path.join(root, "**", "val_data.npz"), recursive=True))
    if not train or len(test) != 1:
        raise FileNotFoundError(
            f"{name} not found under data root {root!r}: expected train_data_batch_<n>.npz files and one "
            f"val_data.npz (found {len(train)} and {len(test)})\nUnpack the downsampled ImageNet archives "
            f"(Imagenet{side}_train_npz and Imagenet{side}_val_npz) there.")
    train_set = _NpzImages(*_npz_batches(train, side, name), side, n_bits)
    test_set = _NpzImages(*_npz_batches(test, side, name), side, n_bits)
    levels = 256 if n_bits is None else 2 ** n_bits
    return ImageData(name, train_set, test_set, levels, (3, side, side))


def load_data(name: str = "digits", root: Optional[str] = None, *, n_bits: Optional[int] = None,
              image_size: Optional[int] = None) -> ImageData:
    """Load a data set by name (:data:`DATASETS`).

    Args:
        name: ``"digits"`` (bundled, the default), ``"photos"`` (bundled), ``"mnist"``, ``"fashion-mnist"``,
            ``"cifar10"``, ``"imagefolder"``, ``"imagenet32"``, ``"imagenet64"``.
        root: the local folder holding the files (ignored for ``digits`` and ``photos``); nothing is ever
            downloaded.
        n_bits: reduce 8-bit data to this many bits (e.g. 5 for faces); not for ``digits`` (17 levels).
        image_size: the side length for ``imagefolder`` and ``photos`` (default 32).

    Raises:
        FileNotFoundError: naming every expected file when the folder lacks them.
    """
    if name not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {name!r}")
    if name == "digits":
        if n_bits is not None:
            raise ValueError("n_bits does not apply to the digits (they have 17 levels)")
        return _digits()
    if name == "photos":
        return _photos(image_size, n_bits)
    if root is None:
        raise ValueError(f"data {name!r} needs a data root folder (--data-root)")
    root = os.path.expanduser(root)
    if name in ("mnist", "fashion-mnist"):
        return _mnist_like(name, root, n_bits)
    if name == "cifar10":
        return _cifar10(root, n_bits)
    if name in ("imagenet32", "imagenet64"):
        return _imagenet(name, root, n_bits)
    return _image_folder(root, image_size, n_bits)
