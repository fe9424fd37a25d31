"""Offline datasets for the task families. Nothing here downloads.

Bundled or generated on the spot: scikit-learn's 8×8 ``digits`` and ``mnist1d`` (Greydanus
2020, generated with ``make_dataset``; its ``get_dataset`` would download). Read from the
standard files in a local directory, which the user fetched once by other means:

- MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747): the IDX
  files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``), directly in ``data_dir`` or in
  torchvision's layout ``data_dir/MNIST/raw`` / ``data_dir/FashionMNIST/raw``.
- CIFAR-10 (Krizhevsky 2009), the *binary* version: ``cifar-10-batches-bin/data_batch_{1..5}.bin``
  and ``test_batch.bin`` (records of 1 label byte + 3,072 pixel bytes, red, green, blue planes of
  32×32, row-major), in ``data_dir/cifar-10-batches-bin`` or ``data_dir`` itself. The python
  version is refused on purpose: it is a pickle, and unpickling runs code from the file.

The parsers are ours (a few lines each, exact, tested on files written in the standard
formats), so torchvision is not needed; its on-disk layout is accepted so an existing
``torchvision`` download directory works as ``data_dir``.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "mnist1d", "synthetic", "mnist", "fashion_mnist", "cifar10")
FILE_DATASETS = ("mnist", "fashion_mnist", "cifar10")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (the MNIST format: two zero bytes, a type code, the number of dimensions,
    the dimensions as big-endian int32, then the data), gzipped or not.

    Args:
        path: the file (``.gz``: gzipped).
    Returns:
        The array, in native byte order.
    Raises:
        ValueError: not an IDX file, or a size that does not match its header.
    """
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), the file has {len(raw)} bytes")
    return np.frombuffer(raw[header:], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(name: str, dirs: list[Path], what: str) -> Path:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    searched = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"{what}: missing {name} (or {name}.gz); searched {searched}. Nothing is downloaded: "
        f"put the standard files there yourself."
    )


def load_mnist(data_dir: str | Path, name: str = "mnist") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of MNIST or Fashion-MNIST (``name="fashion_mnist"``)
    from the IDX files in ``data_dir``: images uint8 ``[N, 28, 28]``, labels int64 ``[N]``.

    Args:
        data_dir: the directory of the IDX files.
        name: ``"mnist"`` or ``"fashion_mnist"``.
    Returns:
        ``(x_train, y_train, x_test, y_test)``.
    Raises:
        ValueError: another name, or malformed files.
        FileNotFoundError: a missing directory or file.
    """
    if name not in _TORCHVISION_DIR:
        raise ValueError(f"load_mnist: name must be 'mnist' or 'fashion_mnist', got {name!r}")
    root = _existing_dir(data_dir, name)
    dirs = [root, root / _TORCHVISION_DIR[name] / "raw"]
    out = []
    for split in ("train", "test"):
        images_file, labels_file = (_find(f, dirs, name) for f in _IDX_FILES[split])
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{name}: {images_file} holds {images.shape}, {labels_file} holds {labels.shape}; "
                             f"expected [N, rows, cols] images and N labels")
        out += [torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)


def load_cifar10(data_dir: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of CIFAR-10 from the binary batches: images uint8
    ``[N, 3, 32, 32]``, labels int64 ``[N]``.

    Args:
        data_dir: the directory of ``cifar-10-batches-bin``.
    Returns:
        ``(x_train, y_train, x_test, y_test)``.
    Raises:
        ValueError: malformed files.
        FileNotFoundError: a missing directory or file.
    """
    root = _existing_dir(data_dir, "cifar10")
    dirs = [root / "cifar-10-batches-bin", root]
    out = []
    for files in (CIFAR10_TRAIN, CIFAR10_TEST):
        images, labels = [], []
        for f in files:
            path = _find_plain(f, dirs)
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size == 0 or raw.size % _CIFAR_RECORD:
                raise ValueError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                                 f"({_CIFAR_RECORD} bytes each)")
            records = raw.reshape(-1, _CIFAR_RECORD)
            if records[:, 0].max() > 9:
                raise ValueError(f"{path}: label {records[:, 0].max()} out of range 0..9")
            labels.append(records[:, 0].astype(np.int64))
            images.append(records[:, 1:].reshape(-1, 3, 32, 32))
        out += [torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))]
    return tuple(out)


def _find_plain(name: str, dirs: list[Path]) -> Path:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    hint = ""
    if any((d / "data_batch_1").is_file() or (d.parent / "cifar-10-batches-py").is_dir() for d in dirs):
        hint = " (found the python/pickle version, which is not read: unpickling runs code from the file)"
    raise FileNotFoundError(f"cifar10: missing {name}; searched {', '.join(map(str, dirs))}{hint}. "
                            f"Nothing is downloaded: put the binary version (cifar-10-batches-bin) there.")


def _existing_dir(data_dir: str | Path | None, name: str) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from local files: pass data_dir (nothing is downloaded)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data directory {root} does not exist")
    return root


@functools.cache
def load_dataset(name: str, seed: int = 0, data_dir: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` as float32 ``[N, features]`` / int64 ``[N]``
    tensors, features scaled to about unit range.

    ``digits``: sklearn's 1,797 8×8 images (/16), shuffled with ``seed``, first 1,500 train.
    ``mnist1d``: 4,000 train / 1,000 test signals of length 40 from ``make_dataset`` (``seed``).
    ``synthetic``: scikit-learn's ``make_classification`` (``seed``): 10 classes of 2 Gaussian
    clusters each in 32 features (16 informative, 8 redundant), 5,000 train / 1,000 test.
    ``mnist``, ``fashion_mnist``: 60,000 / 10,000 images of 28×28, flattened, /255.
    ``cifar10``: 50,000 / 10,000 images of 3×32×32 (channel-major), flattened, /255.
    The file datasets keep their official split and ignore ``seed``; they need ``data_dir``.

    Args:
        name: one of ``DATASETS``.
        seed: the shuffle or generator seed.
        data_dir: the directory of the file datasets.
    Returns:
        ``(x_train, y_train, x_test, y_test)``.
    Raises:
        ValueError: an unknown name, or a file dataset without ``data_dir``.
        FileNotFoundError: missing files.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        x, y = x[perm], y[perm]
        return x[:1500], y[:1500], x[1500:], y[1500:]
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        d = make_dataset(args)  # generated locally; get_dataset would download
        return (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.int64),
                torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.int64))
    if name == "synthetic":
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=6000, n_features=32, n_informative=16, n_redundant=8, n_classes=10,
                                   n_clusters_per_class=2, class_sep=1.0, flip_y=0.01, random_state=seed)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
        return x[:5000], y[:5000], x[5000:], y[5000:]
    if name in FILE_DATASETS:
        x_tr, y_tr, x_te, y_te = load_cifar10(data_dir) if name == "cifar10" else load_mnist(data_dir, name)
        flat = lambda x: x.reshape(len(x), -1).to(torch.float32) / 255.0
        return flat(x_tr), y_tr, flat(x_te), y_te
    raise ValueError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")


def cross_entropy_per_instance(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each instance.

    Args:
        logits: ``[n, B, C]``.
        y: ``[n, B]`` or shared ``[B]`` labels.
    Returns:
        ``[n]``.
    """
    import torch.nn.functional as F

    n, B, c = logits.shape
    y = y.expand(n, B) if y.dim() == 1 else y
    return F.cross_entropy(logits.reshape(n * B, c), y.reshape(-1), reduction="none").view(n, B).mean(-1)


def sample_minibatches(x: Tensor, y: Tensor, n: int, batch_size: int,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Independent minibatches (with replacement) for ``n`` instances.

    Args:
        x: ``[N, ...]`` inputs.
        y: ``[N]`` labels.
        n: number of instances.
        batch_size: ``B``.
        generator: the source of the draw (None: the global generator); drawn on its device.
    Returns:
        ``(x [n, B, ...], y [n, B])``.
    """
    from learnopt.task import generator_device

    idx = torch.randint(len(y), (n, batch_size), generator=generator, device=generator_device(generator))
    idx = idx.to(x.device)
    return x[idx], y[idx]


def held_out_classification(logits: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                            chunk: int = 4096) -> dict[str, Tensor]:
    """Mean cross-entropy and accuracy of every instance on a held-out split, under
    ``torch.no_grad()``. The split goes through ``logits`` in chunks of ``chunk`` examples, so the
    ``[n, N, C]`` logits of a large test set never exist at once.

    Args:
        logits: ``[B, ...]`` shared inputs -> ``[n, B, C]`` logits.
        x: ``[N, ...]`` held-out inputs.
        y: ``[N]`` held-out labels.
        chunk: examples per forward pass.
    Returns:
        ``{"test_loss": [n], "test_accuracy": [n]}`` over the whole split.
    """
    loss_sum, correct = None, None
    with torch.no_grad():
        for start in range(0, len(y), chunk):
            out, labels = logits(x[start:start + chunk]), y[start:start + chunk]
            part_loss = cross_entropy_per_instance(out, labels) * len(labels)
            part_correct = (out.argmax(-1) == labels).sum(-1)
            loss_sum = part_loss if loss_sum is None else loss_sum + part_loss
            correct = part_correct if correct is None else correct + part_correct
    return {"test_loss": loss_sum / len(y), "test_accuracy": correct.to(loss_sum.dtype) / len(y)}


class HeldOutClassifier:
    """``test_metrics`` for a classifier task with ``logits(params, x)`` and an optional test split
    (``x_test``, ``y_test``; None: none)."""

    def test_metrics(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean cross-entropy and accuracy of each instance over the whole test split.

        Args:
            params: the parameters.
        Returns:
            ``{"test_loss": [n], "test_accuracy": [n]}``; empty without a test split.
        """
        if self.x_test is None:
            return {}
        return held_out_classification(lambda x: self.logits(params, x), self.x_test, self.y_test)

    def _test_to(self, x: Tensor) -> dict[str, Tensor | None]:
        """The test split on ``x``'s device and (inputs) dtype, as keyword arguments."""
        if self.x_test is None:
            return {"x_test": None, "y_test": None}
        return {"x_test": self.x_test.to(device=x.device, dtype=x.dtype), "y_test": self.y_test.to(x.device)}
