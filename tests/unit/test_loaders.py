"""Loaders read tiny files written in the real on-disk formats; downloads use file:// URLs."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench.data import loaders
from bench.data.loaders import (
    DataFormatError,
    DataNotFoundError,
    RawDataset,
    describe,
    download,
    load_raw,
    make_synthetic,
    search_dirs,
)


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees an empty cache and system dir, and no BENCH_DATA_DIR unless it sets one."""
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(loaders, "SYSTEM_DATA_DIR", tmp_path / "system")


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_set(directory: Path, seed: int, n_train: int = 5, n_test: int = 3, gz: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    batch = {b"batch_label": b"test", b"labels": labels, b"data": rows, b"filenames": [b"x.png"] * n}
    return batch, rows, labels


def write_cifar(directory: Path, n: int = 2, protocol: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch, rows, labels = cifar_batch(n, seed=i)
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (rows, labels)
    return out


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loads_shapes_dtypes_values(tmp_path, monkeypatch, name, gz):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    arrays = write_idx_set(tmp_path / "data" / name, seed=1, gz=gz)
    ds = load_raw(name)
    assert isinstance(ds, RawDataset)
    assert ds.name == name and ds.num_classes == 10
    assert ds.source == str(tmp_path / "data" / name)
    assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (3, 28, 28, 1)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_search_order_and_bench_data_dir_priority(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    assert search_dirs("mnist") == [
        tmp_path / "data" / "mnist",
        tmp_path / "cache" / "dpbench" / "data" / "mnist",
        tmp_path / "system" / "mnist",
    ]
    write_idx_set(tmp_path / "system" / "mnist", seed=3)
    cached = write_idx_set(tmp_path / "cache" / "dpbench" / "data" / "mnist", seed=2)
    assert load_raw("mnist").source.startswith(str(tmp_path / "cache"))
    np.testing.assert_array_equal(load_raw("mnist").y_train, cached["train-labels-idx1-ubyte"])
    preferred = write_idx_set(tmp_path / "data" / "mnist", seed=1)
    ds = load_raw("mnist")
    assert ds.source == str(tmp_path / "data" / "mnist")
    np.testing.assert_array_equal(ds.y_train, preferred["train-labels-idx1-ubyte"])


def test_incomplete_dir_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    write_idx_set(tmp_path / "data" / "mnist", seed=1)
    (tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx_set(tmp_path / "system" / "mnist", seed=2)
    assert load_raw("mnist").source == str(tmp_path / "system" / "mnist")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_not_found_names_every_dir_and_how(tmp_path, monkeypatch, name):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data" / name).mkdir(parents=True)
    with pytest.raises(DataNotFoundError) as info:
        load_raw(name)
    message = str(info.value)
    assert name in message
    for directory in search_dirs(name):
        assert str(directory) in message
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in message
    else:
        assert f"bench data --download {name}" in message
        assert "BENCH_DATA_DIR" in message
    assert isinstance(info.value, FileNotFoundError)


def test_bad_magic_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    write_idx_set(tmp_path / "data" / "mnist", seed=1)
    bad = tmp_path / "data" / "mnist" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(struct.pack(">II", 2051, 5) + bytes(5)))
    with pytest.raises(DataFormatError, match="train-labels-idx1-ubyte.gz") as info:
        load_raw("mnist")
    assert "2049" in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack(">IIII", 2051, 5, 28, 28) + bytes(28 * 28 * 4),
        struct.pack(">IIII", 2051, 5, 28, 28) + bytes(28 * 28 * 5 + 1),
        struct.pack(">III", 2051, 5, 28),
        b"\x1f\x8bnot really gzip",
    ],
    ids=["short", "long", "header", "gzip"],
)
def test_wrong_sizes_rejected(tmp_path, monkeypatch, payload):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    write_idx_set(tmp_path / "data" / "mnist", seed=1)
    (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(payload)
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte"):
        load_raw("mnist")


def test_image_label_count_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    write_idx_set(tmp_path / "data" / "mnist", seed=1)
    labels = tmp_path / "data" / "mnist" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DataFormatError, match="train-labels-idx1-ubyte.gz"):
        load_raw("mnist")


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_hwc_pixel_by_pixel(tmp_path, monkeypatch, nested, protocol):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    root = tmp_path / "data" / "cifar10"
    batches = write_cifar(root / "cifar-10-batches-py" if nested else root, n=2, protocol=protocol)
    ds = load_raw("cifar10")
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (2, 32, 32, 3)
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 10
    rows, labels = batches["data_batch_3"]
    # Row layout: 1024 red (row-major 32x32), then 1024 green, then 1024 blue.
    for i in range(2):
        for h, w, c in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (5, 7, 1), (31, 31, 2), (2, 30, 2)]:
            assert ds.x_train[4 + i, h, w, c] == rows[i, c * 1024 + h * 32 + w]
        assert ds.y_train[4 + i] == labels[i]
    test_rows, test_labels = batches["test_batch"]
    expected = test_rows.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ds.x_test, expected)
    np.testing.assert_array_equal(ds.y_test, test_labels)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_unpickling_problems(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    root = tmp_path / "data" / "cifar10"
    write_cifar(root)
    (root / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="test_batch"):
        load_raw("cifar10")
    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataFormatError, match="refusing"):
        load_raw("cifar10")
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataFormatError, match="3072"):
        load_raw("cifar10")


def serve(tmp_path: Path, monkeypatch, name: str, files: dict[str, bytes], checksums=None) -> None:
    """Publish files under tmp_path/remote and point DOWNLOADS[name] at their file:// URLs."""
    remote = tmp_path / "remote"
    remote.mkdir(exist_ok=True)
    entries = []
    for filename, data in files.items():
        (remote / filename).write_bytes(data)
        checksum = (checksums or {}).get(filename, "md5:" + md5(remote / filename))
        entries.append(((remote / filename).as_uri(), filename, checksum))
    monkeypatch.setitem(loaders.DOWNLOADS, name, entries)


def test_download_idx_file_url(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_idx_set(src, seed=4)
    serve(tmp_path, monkeypatch, "mnist", {p.name: p.read_bytes() for p in src.iterdir()})
    calls = []
    dest = download("mnist", progress=lambda done, total: calls.append((done, total)))
    assert dest == tmp_path / "cache" / "dpbench" / "data" / "mnist"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in src.iterdir())
    assert calls and all(total is not None and done <= total for done, total in calls)
    assert calls[-1][0] == calls[-1][1]
    assert load_raw("mnist").source == str(dest)


def test_download_sha256_accepted(tmp_path, monkeypatch):
    data = b"hello"
    serve(tmp_path, monkeypatch, "mnist", {"f.gz": data}, {"f.gz": "sha256:" + hashlib.sha256(data).hexdigest()})
    assert (download("mnist", tmp_path / "out") / "f.gz").read_bytes() == data


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    serve(
        tmp_path,
        monkeypatch,
        "mnist",
        {"train-images-idx3-ubyte.gz": b"abc"},
        {"train-images-idx3-ubyte.gz": "md5:" + "0" * 32},
    )
    dest = tmp_path / "out"
    with pytest.raises(DataFormatError) as info:
        download("mnist", dest)
    message = str(info.value)
    assert (tmp_path / "remote" / "train-images-idx3-ubyte.gz").as_uri() in message
    assert "0" * 32 in message and hashlib.md5(b"abc").hexdigest() in message
    assert list(dest.iterdir()) == []


def cifar_tarball(tmp_path: Path, extra: tuple[str, ...] = ()) -> bytes:
    batches = tmp_path / "batches"
    write_cifar(batches, n=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(batches.iterdir()):
            add_bytes(tar, f"cifar-10-batches-py/{p.name}", p.read_bytes())
        for name in extra:
            add_bytes(tar, name, b"x")
    return buf.getvalue()


def test_download_cifar_extracts(tmp_path, monkeypatch):
    serve(tmp_path, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": cifar_tarball(tmp_path)})
    dest = download("cifar10")
    assert (dest / "cifar-10-batches-py" / "test_batch").is_file()
    assert not (dest / "cifar-10-python.tar.gz").exists()
    ds = load_raw("cifar10")
    assert ds.x_train.shape == (5, 32, 32, 3)
    assert ds.source == str(dest / "cifar-10-batches-py")
    assert download("cifar10") == dest


@pytest.mark.parametrize("member", ["../evil", "cifar-10-batches-py/../../evil", "/tmp/evil"])
def test_download_rejects_unsafe_tar_member(tmp_path, monkeypatch, member):
    serve(tmp_path, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": cifar_tarball(tmp_path, (member,))})
    dest = tmp_path / "deep" / "out"
    with pytest.raises(DataFormatError, match="unsafe"):
        download("cifar10", dest)
    assert not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (dest / "cifar-10-batches-py").exists()


def test_download_unknown_name():
    with pytest.raises(ValueError, match="digits"):
        download("digits")


def test_synthetic_deterministic_and_learnable():
    kwargs = {"n_train": 600, "n_test": 300, "shape": (8, 8, 1), "num_classes": 10}
    a, b = make_synthetic(seed=7, **kwargs), make_synthetic(seed=7, **kwargs)
    c = make_synthetic(seed=8, **kwargs)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (600, 8, 8, 1) and a.x_train.dtype == np.float32
    assert a.x_test.shape == (300, 8, 8, 1) and a.y_train.dtype == np.int64
    assert a.num_classes == 10 and a.source == "generated"
    assert np.bincount(a.y_train, minlength=10).min() >= 50
    means = np.stack([a.x_train[a.y_train == k].reshape(-1, 64).mean(0) for k in range(10)])
    dist = ((a.x_test.reshape(-1, 1, 64) - means[None]) ** 2).sum(-1)
    accuracy = (dist.argmin(1) == a.y_test).mean()
    assert accuracy > 2 * (1 / 10)


def test_synthetic_rgb_and_argument_checks():
    ds = make_synthetic(n_train=20, n_test=10, shape=(32, 32, 3), num_classes=2, seed=0)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.num_classes == 2
    with pytest.raises(ValueError):
        make_synthetic(n_train=0, n_test=1, shape=(8, 8, 1), num_classes=2, seed=0)
    with pytest.raises(ValueError):
        make_synthetic(n_train=1, n_test=1, shape=(8, 8, 1), num_classes=1, seed=0)


def test_digits_loader():
    pytest.importorskip("sklearn")
    ds = load_raw("digits")
    assert ds.x_train.shape == (1500, 8, 8, 1) and ds.x_test.shape == (297, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.num_classes == 10 and ds.source == "scikit-learn"
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 16.0
    assert np.array_equal(load_raw("digits").y_test, ds.y_test)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="fashion-mnist") as info:
        load_raw("imagenet")
    assert "cifar10" in str(info.value)
    with pytest.raises(ValueError, match="make_synthetic"):
        load_raw("synthetic")


def test_describe_checks_existence_only(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    write_idx_set(tmp_path / "data" / "mnist", seed=1)
    (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"not parsed by describe")
    rows = {row["name"]: row for row in describe()}
    assert list(rows) == ["fashion-mnist", "mnist", "cifar10", "digits", "synthetic"]
    assert rows["mnist"]["available"] and rows["mnist"]["location"] == str(tmp_path / "data" / "mnist")
    assert rows["mnist"]["searched"] == [str(d) for d in search_dirs("mnist")]
    assert not rows["cifar10"]["available"] and rows["cifar10"]["location"] is None
    assert "apt-get install dataset-fashion-mnist" in rows["fashion-mnist"]["how"]
    assert rows["synthetic"]["available"]
    for row in rows.values():
        assert set(row) == {"name", "available", "location", "searched", "how"}


def test_real_fashion_mnist_when_installed(monkeypatch):
    monkeypatch.setattr(loaders, "SYSTEM_DATA_DIR", Path("/usr/share/datasets"))
    if not (Path("/usr/share/datasets/fashion-mnist") / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    ds = load_raw("fashion-mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train[:5].tolist() == [9, 0, 0, 3, 0]
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
