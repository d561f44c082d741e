"""The feature protocol (``rayssl.eval.protocol``) pinned to its equations, and the online k-NN's
centring (``rayssl.eval.online.knn_eval``); the multi-rank averages are in
``test_objective_distributed.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rayssl.eval.online import first_images, knn_eval
from rayssl.eval.protocol import bank_mean, precise_bn


def test_precise_bn_is_the_equal_weight_average_of_batch_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_mean.fill_(5.0)  # the "training" statistics, to be replaced
    batches = [torch.randn(n, 3, generator=g) * (1 + i) + i for i, n in enumerate((4, 9, 2))]
    out = precise_bn(model, batches, lambda m, x: m(x))
    bn = out[0]
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert not out.training and int(bn.num_batches_tracked) == 3
    assert float(model[0].running_mean[0]) == 5.0 and model[0].momentum == 0.1  # the original is untouched


def test_precise_bn_leaves_a_network_without_batchnorm_alone() -> None:
    model = nn.Linear(3, 2)
    assert precise_bn(model, [torch.randn(4, 3)], lambda m, x: m(x)) is model


def test_precise_bn_without_images_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="eval.precise_bn_images"):
        precise_bn(nn.BatchNorm1d(3), [], lambda m, x: m(x))


def test_bank_mean() -> None:
    x = torch.randn(10, 4, dtype=torch.float64)
    torch.testing.assert_close(bank_mean(x), x.mean(0, keepdim=True))


def _labelled(x: np.ndarray, y: np.ndarray, rows: int = 8) -> list[dict]:
    return [{"image": x[i:i + rows], "label": y[i:i + rows], "ok": np.ones(len(x[i:i + rows]), bool)}
            for i in range(0, len(x), rows)]


def test_first_images_serves_statistics_and_features_from_one_pass() -> None:
    x, y = np.zeros((40, 2, 2, 1), np.uint8), np.zeros(40, np.int64)
    batches = _labelled(x, y)
    batches[0]["ok"][:5] = False  # 3 decodable rows in the first batch
    head, every = first_images(iter(batches), 12)
    assert len(head) == 3  # 3 + 8 < 12 <= 3 + 8 + 8
    assert [b["label"] is c["label"] for b, c in zip(every, batches)] == [True] * 5


def test_knn_eval_centers_by_the_bank_mean() -> None:
    """Two classes that differ only in the length of a large common offset: uncentred, the cosine
    cannot see it and the vote is near chance; centred, it equals the k-NN of the centred features."""
    g = np.random.default_rng(0)
    y = g.integers(0, 2, 200)
    f = 50.0 + 2.0 * y[:, None] + g.normal(0, 0.5, (200, 4))
    images = f.reshape(200, 2, 2, 1)

    def run(feats: np.ndarray, center: bool) -> float:
        fn = lambda x: [x.flatten(1).double()]  # noqa: E731 - the "image" is the feature itself
        data = feats.reshape(200, 2, 2, 1)
        return knn_eval(_labelled(data[:150], y[:150]), _labelled(data[150:], y[150:]), fn, ["f"], k=5,
                        temperature=0.07, num_classes=2, device=torch.device("cpu"), center=center)["f"]

    centred = f - f[:150].mean(0)
    assert run(images, center=True) == pytest.approx(run(centred, center=False))
    assert run(images, center=True) > run(images, center=False) + 0.2
