"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CHUNK = 2**20  # bytes per read: memory follows what a file holds, never what its header claims


def _read_at_most(f, n: int) -> bytearray:
    """Up to ``n`` bytes of the stream ``f``, fewer at its end."""
    out = bytearray()
    while len(out) < n and (chunk := f.read(min(_CHUNK, n - len(out)))):
        out += chunk
    return out


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic (0, 0, dtype, ndim), big-endian dims, data.

    The file is untrusted: the header's dims give the data's size, and no more than that (plus
    one byte, to tell) is read or decompressed; a file holding more or less is refused (``ValueError``,
    one line naming it)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES:
            raise ValueError(f"{path}: not an IDX file (bad magic)")
        header = f.read(4 * magic[3])
        if len(header) < 4 * magic[3]:
            raise ValueError(f"{path}: truncated IDX header")
        dims = struct.unpack(f">{magic[3]}I", header)
        dtype = np.dtype(_DTYPES[magic[2]])
        expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
        body = _read_at_most(f, expected + 1)
    if len(body) > expected:
        raise ValueError(f"{path}: holds more than the {expected} data bytes its IDX header gives")
    if len(body) < expected:
        raise ValueError(f"{path}: truncated IDX file ({len(body)} of {expected} data bytes)")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"data.fashion_mnist_dir: {root / stem}[.gz] not found; install it with "
        "'apt-get install dataset-fashion-mnist' or set data.fashion_mnist_dir")


def load_fashion_mnist(root: str | Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of the ``train`` or ``test`` split."""
    images_file, labels_file = (_find(Path(root), s) for s in _FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{images_file}: {len(images)} images but {len(labels)} labels")
    return images[:limit], labels[:limit]
