"""Ray Data datasets for training and evaluation (the edge between storage and workers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.extensions import ArrowTensorArray

from rayssl.config import ConfigError
from rayssl.data.fashion_mnist import CLASSES, load_fashion_mnist


@dataclass(frozen=True)
class DataMeta:
    """What the workers need to know about the data before the first batch."""

    num_train: int
    num_test: int
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _dataset(images: np.ndarray, labels: np.ndarray, rows_per_block: int = 1024) -> ray.data.Dataset:
    tables = [pa.table({"image": ArrowTensorArray.from_numpy(images[i:i + rows_per_block]),
                        "label": labels[i:i + rows_per_block]})
              for i in range(0, len(images), rows_per_block)]
    return ray.data.from_arrow(tables)


def build_datasets(data_cfg) -> tuple[dict[str, ray.data.Dataset], DataMeta]:
    """``{"train": ..., "test": ...}`` with columns ``image`` (uint8 H x W [x C]) and ``label``."""
    if data_cfg.source != "fashion-mnist":
        raise ConfigError(f"data.source: unsupported source {data_cfg.source!r}; use 'fashion-mnist'")
    try:
        x_train, y_train = load_fashion_mnist(data_cfg.fashion_mnist_dir, "train", data_cfg.train_limit)
        x_test, y_test = load_fashion_mnist(data_cfg.fashion_mnist_dir, "test", data_cfg.test_limit)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    scaled = x_train.astype(np.float32) / 255
    meta = DataMeta(num_train=len(x_train), num_test=len(x_test), channels=1,
                    image_size=x_train.shape[1], num_classes=len(CLASSES),
                    mean=(float(scaled.mean()),), std=(float(scaled.std()),))
    train = _dataset(x_train, y_train).randomize_block_order()  # plus a local buffer in the loop
    return {"train": train, "test": _dataset(x_test, y_test)}, meta
