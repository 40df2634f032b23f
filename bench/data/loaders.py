"""Raw datasets as numpy arrays, read from their standard on-disk formats.

Files are looked up in a fixed order of directories (see `search_dirs`), never fetched
implicitly: `download` runs only when the user asks (`bench data --download NAME`).
Everything here is numpy and the standard library; scikit-learn is imported only to
load `digits`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "digits", "synthetic")
DATA_DIR_ENV = "BENCH_DATA_DIR"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
DIGITS_TEST_SIZE = 297


def _mirror(base: str, files: dict[str, str]) -> list[tuple[str, str, str]]:
    return [(base + name, name, checksum) for name, checksum in files.items()]


# (url, file name, "md5:<hex>" or "sha256:<hex>") of the official files.
DOWNLOADS: dict[str, list[tuple[str, str, str]]] = {
    "mnist": _mirror(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "cifar10": _mirror(
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "md5:c58f30108f718f92721af3b95e74349a"},
    ),
    # The default source is Debian's dataset-fashion-mnist; this mirror is torchvision's.
    "fashion-mnist": _mirror(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}

HOW_TO_GET: dict[str, str] = {
    "fashion-mnist": (
        "as root: apt-get install dataset-fashion-mnist (installs /usr/share/datasets/fashion-mnist); "
        "or run `bench data --download fashion-mnist`; "
        "or put the four IDX files in $BENCH_DATA_DIR/fashion-mnist"
    ),
    "mnist": (
        "run `bench data --download mnist`, or put the four IDX files "
        "(train-images-idx3-ubyte.gz, ...) in $BENCH_DATA_DIR/mnist"
    ),
    "cifar10": (
        "run `bench data --download cifar10`, or put cifar-10-batches-py/ "
        "(from cifar-10-python.tar.gz) in $BENCH_DATA_DIR/cifar10"
    ),
    "digits": "bundled with scikit-learn: pip install scikit-learn",
    "synthetic": "always available: generated from a seed",
}

Progress = Callable[[int, "int | None"], None]


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched directories."""

    def __init__(self, name: str, searched: list[Path], how: str, details: list[str] | None = None):
        self.name = name
        self.searched = [str(p) for p in searched]
        self.how = how
        lines = [f"dataset {name!r} not found."]
        if searched:
            lines.append("Searched:")
            notes = details or [""] * len(searched)
            lines += [f"  {p}{note}" for p, note in zip(self.searched, notes)]
        lines.append(f"To get it: {how}.")
        super().__init__("\n".join(lines))


class DataFormatError(ValueError):
    """A dataset file exists but is not what its format says it should be."""


@dataclass(frozen=True, eq=False)
class RawDataset:
    """One dataset as loaded from disk: NHWC images (uint8, or float32 for digits/synthetic)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{self.name}: x_{split} {x.shape} and y_{split} {y.shape} do not match")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one example."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"RawDataset(name={self.name!r}, train={self.x_train.shape} {self.x_train.dtype}, "
            f"test={self.x_test.shape} {self.x_test.dtype}, num_classes={self.num_classes}, "
            f"source={self.source!r})"
        )


# ---------------------------------------------------------------------------- locations


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"not a dataset name: {name!r}")


def cache_dir(name: str) -> Path:
    """The per-user data directory for `name`: $XDG_CACHE_HOME/dpbench/data/<name>."""
    _check_name(name)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dpbench" / "data" / name


def search_dirs(name: str) -> list[Path]:
    """Where `name`'s files are looked for, first match wins: $BENCH_DATA_DIR, user cache, Debian."""
    _check_name(name)
    dirs = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        dirs.append(Path(env).expanduser() / name)
    dirs.append(cache_dir(name))
    dirs.append(SYSTEM_DATA_DIR / name)
    return dirs


def _idx_files_in(directory: Path) -> tuple[dict[str, Path] | None, list[str]]:
    found, missing = {}, []
    for key, base in IDX_FILES.items():
        for candidate in (directory / (base + ".gz"), directory / base):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(base + "[.gz]")
    return (found if not missing else None), missing


def _cifar_files_in(directory: Path) -> tuple[dict[str, Path] | None, list[str]]:
    names = (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)
    for root in (directory / CIFAR_DIRNAME, directory):
        if all((root / n).is_file() for n in names):
            return {n: root / n for n in names}, []
    return None, [f"{CIFAR_DIRNAME}/data_batch_1..5 and test_batch"]


def _locate(name: str, dirs: list[Path]) -> tuple[dict[str, Path] | None, list[str]]:
    """The first directory's complete set of files, or None and a note per directory."""
    finder = _cifar_files_in if name == "cifar10" else _idx_files_in
    notes = []
    for directory in dirs:
        if not directory.is_dir():
            notes.append(" (no such directory)")
            continue
        files, missing = finder(directory)
        if files is not None:
            return files, notes
        notes.append(f" (missing {', '.join(missing)})")
    return None, notes


# ---------------------------------------------------------------------------- readers


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as g:
                return g.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataFormatError(f"{path}: cannot read ({exc}); expected an IDX file, plain or gzipped") from exc


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes, checking its magic number (2051 images, 2049 labels) and size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataFormatError(f"{path}: file too short for an IDX header (expected magic number {magic})")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise DataFormatError(f"{path}: bad IDX magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated IDX header, expected {ndim} dimension sizes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DataFormatError(
            f"{path}: IDX header says shape {dims} ({expected} bytes in all) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_idx_split(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, IDX_IMAGES_MAGIC)
    y = read_idx(labels, IDX_LABELS_MAGIC).astype(np.int64)
    if x.shape[1:] != (28, 28):
        raise DataFormatError(f"{images}: images are {x.shape[1:]}, expected 28x28")
    if len(x) != len(y):
        raise DataFormatError(f"{labels}: {len(y)} labels but {images} has {len(x)} images; expected equal counts")
    if len(y) and (y.max() >= num_classes):
        raise DataFormatError(f"{labels}: label {y.max()} out of range, expected 0..{num_classes - 1}")
    return x[..., None], y


_PICKLE_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file has no business running code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot unpickle ({exc}); expected a CIFAR-10 python batch") from exc
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: holds a {type(batch).__name__}, expected a dict with data and labels")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataFormatError(f"{path}: expected keys b'data' and b'labels', found {sorted(map(str, batch))}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise DataFormatError(f"{path}: {labels.size} labels for {len(data)} images, expected equal counts")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(files[n]) for n in CIFAR_TRAIN_FILES]
    x_test, y_test = _read_cifar_batch(files[CIFAR_TEST_FILE])
    x_train = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, np.ascontiguousarray(x_test), y_test


def _load_digits() -> RawDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataNotFoundError("digits", [], HOW_TO_GET["digits"]) from exc
    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)[..., None]
    y = np.asarray(bunch.target, dtype=np.int64)
    cut = len(y) - DIGITS_TEST_SIZE
    return RawDataset("digits", x[:cut], y[:cut], x[cut:], y[cut:], 10, "scikit-learn")


def load_raw(name: str) -> RawDataset:
    """Load a real dataset from the first search directory that has all its files."""
    if name == "digits":
        return _load_digits()
    if name == "synthetic":
        raise ValueError("the synthetic dataset is generated, not loaded: call make_synthetic(...)")
    if name not in ("fashion-mnist", "mnist", "cifar10"):
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    dirs = search_dirs(name)
    files, notes = _locate(name, dirs)
    if files is None:
        raise DataNotFoundError(name, dirs, HOW_TO_GET[name], notes)
    if name == "cifar10":
        x_train, y_train, x_test, y_test = _load_cifar(files)
        source = files[CIFAR_TEST_FILE].parent
    else:
        x_train, y_train = _load_idx_split(files["train_images"], files["train_labels"], 10)
        x_test, y_test = _load_idx_split(files["test_images"], files["test_labels"], 10)
        source = files["train_images"].parent
    return RawDataset(name, x_train, y_train, x_test, y_test, 10, str(source))


# ---------------------------------------------------------------------------- synthetic


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights: upsamples a coarse axis smoothly."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def make_synthetic(
    *, n_train: int, n_test: int, shape: tuple[int, int, int], num_classes: int, seed: int
) -> RawDataset:
    """Learnable generated data: one smooth random prototype per class plus gaussian noise.

    Values are roughly zero-mean with unit variance, so no further normalisation is needed.
    The test set does not depend on `n_train` (separate seeded streams).
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be (height, width, channels) of positive integers, got {shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    h, w, c = (int(s) for s in shape)
    gh, gw = max(2, round(h / 4)), max(2, round(w / 4))
    rng = np.random.default_rng([seed, 0])
    coarse = rng.standard_normal((num_classes, gh, gw, c))
    protos = np.einsum("hi,kijc,wj->khwc", _interp_matrix(h, gh), coarse, _interp_matrix(w, gw))
    protos -= protos.mean(axis=(1, 2, 3), keepdims=True)
    protos /= protos.std(axis=(1, 2, 3), keepdims=True) + 1e-12

    def split(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng([seed, stream])
        y = r.permutation(np.arange(n) % num_classes).astype(np.int64)
        x = (protos[y] + r.standard_normal((n, h, w, c))) / np.sqrt(2.0)
        return x.astype(np.float32), y

    x_train, y_train = split(n_train, 1)
    x_test, y_test = split(n_test, 2)
    return RawDataset("synthetic", x_train, y_train, x_test, y_test, num_classes, "generated")


# ---------------------------------------------------------------------------- downloads


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algo, _, digest = checksum.partition(":")
    if not digest:
        algo, digest = {32: "md5", 64: "sha256"}.get(len(checksum), ""), checksum
    if algo not in ("md5", "sha256"):
        raise ValueError(f"checksum {checksum!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    return algo, digest.lower()


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, target: Path, checksum: str, progress: Progress | None) -> None:
    """Stream `url` into a temp file beside `target`, verify, then rename into place."""
    algo, expected = _parse_checksum(checksum)
    h = hashlib.new(algo)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except (urllib.error.URLError, OSError) as exc:
                raise ConnectionError(f"cannot download {url}: {exc}") from exc
            with response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                done = 0
                if progress:
                    progress(0, total)
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        actual = h.hexdigest()
        if actual != expected:
            raise DataFormatError(f"{url}: {algo} checksum mismatch, expected {expected}, got {actual}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _extract_tar(archive: Path, dest: Path) -> None:
    """Extract regular files and directories only, rejecting absolute or '..' paths and links."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise DataFormatError(f"{archive}: unsafe member path {m.name!r}, expected a relative path")
                if not (m.isfile() or m.isdir()):
                    raise DataFormatError(f"{archive}: member {m.name!r} is not a regular file or directory")
            root = dest.resolve()
            for m in members:
                target = (root / m.name).resolve()
                if root != target and root not in target.parents:
                    raise DataFormatError(f"{archive}: member {m.name!r} escapes {dest}")
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{archive}: cannot extract ({exc}); expected a tar.gz archive") from exc


def download(name: str, dest: Path | None = None, *, progress: Progress | None = None) -> Path:
    """Fetch `name`'s official files into `dest` (default: the user cache), verify and unpack them.

    Files already present with the right checksum are kept; archives are removed once extracted.
    `progress(bytes_done, bytes_total_or_None)` is called as each file arrives.
    """
    if name not in DOWNLOADS:
        raise ValueError(f"no download for {name!r}; downloadable: {', '.join(sorted(DOWNLOADS))}")
    dest = Path(dest) if dest is not None else cache_dir(name)
    dest.mkdir(parents=True, exist_ok=True)
    for url, filename, checksum in DOWNLOADS[name]:
        target = dest / filename
        is_archive = filename.endswith((".tar.gz", ".tgz", ".tar"))
        if is_archive and _locate(name, [dest])[0] is not None:
            continue
        algo, expected = _parse_checksum(checksum)
        if not (target.is_file() and _file_digest(target, algo) == expected):
            _fetch(url, target, checksum, progress)
        if is_archive:
            _extract_tar(target, dest)
            target.unlink()
            if _locate(name, [dest])[0] is None:
                raise DataFormatError(f"{url}: the archive did not contain the expected {name} files")
    return dest


# ---------------------------------------------------------------------------- listing


def describe() -> list[dict]:
    """Availability of every known dataset, checking only that files exist (for `bench data`)."""
    rows = []
    for name in DATASETS:
        row: dict = {
            "name": name,
            "available": False,
            "location": None,
            "searched": [],
            "how": HOW_TO_GET[name],
        }
        if name == "synthetic":
            row.update(available=True, location="generated")
        elif name == "digits":
            if importlib.util.find_spec("sklearn") is not None:
                row.update(available=True, location="scikit-learn")
        else:
            dirs = search_dirs(name)
            files, _ = _locate(name, dirs)
            row["searched"] = [str(d) for d in dirs]
            if files is not None:
                first = next(iter(files.values()))
                row.update(available=True, location=str(first.parent))
        rows.append(row)
    return rows
