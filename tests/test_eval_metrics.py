"""``rayssl.eval.metrics`` pinned to the definitions: hand-computed cases and independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayssl.eval.metrics import (
    DiagnosticsAccumulator,
    cluster_usage,
    clustering_metrics,
    dataset_diagnostics,
    knn_accuracies,
    linear_probe,
    usage_plot,
)
from rayssl.objective import information_diagnostics

DIAG_KEYS = ("marginal_entropy", "conditional_entropy", "mutual_information", "effective_clusters")


def _blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs with unit noise around centres of scale ``spread``, shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = torch.randn(classes, dim, generator=g)[labels] * spread + torch.randn(labels.numel(), dim, generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    return feats[perm], labels[perm]


# --------------------------------------------------------------------------- clustering
def test_perfect_and_permuted_clusterings_score_one() -> None:
    labels = np.repeat(np.arange(4), 25)
    for clusters in (labels, np.array([2, 0, 3, 1])[labels]):
        m = clustering_metrics(clusters, labels, num_clusters=4)
        for key in ("nmi", "ari", "hungarian_accuracy", "majority_accuracy"):
            assert m[f"cluster/{key}"] == pytest.approx(1.0)


def test_split_classes_majority_is_one_and_hungarian_matches_by_hand() -> None:
    # class 0 (60 samples) split 40/20 into clusters 0/1; class 1 (40) split 30/10 into 2/3.
    labels = np.array([0] * 60 + [1] * 40)
    clusters = np.array([0] * 40 + [1] * 20 + [2] * 30 + [3] * 10)
    m = clustering_metrics(clusters, labels, num_clusters=4)
    assert m["cluster/majority_accuracy"] == pytest.approx(1.0)
    assert m["cluster/hungarian_accuracy"] == pytest.approx((40 + 30) / 100)
    assert m["cluster/nmi"] < 1.0 and m["cluster/ari"] < 1.0


def test_random_assignment_scores_chance() -> None:
    rng = np.random.default_rng(0)
    classes = 10
    labels, clusters = rng.integers(0, classes, 5000), rng.integers(0, classes, 5000)
    m = clustering_metrics(clusters, labels, num_clusters=classes)
    assert abs(m["cluster/nmi"]) < 0.02 and abs(m["cluster/ari"]) < 0.02
    assert 1 / classes - 0.01 < m["cluster/hungarian_accuracy"] < 1 / classes + 0.03


def test_usage_counts_empty_and_used_clusters() -> None:
    clusters = np.array([0, 0, 0, 2, 5, 5])
    np.testing.assert_array_equal(cluster_usage(clusters, 7), [3, 0, 1, 0, 0, 2, 0])
    m = clustering_metrics(clusters, np.zeros(6, dtype=int), num_clusters=7)
    assert (m["cluster/empty_clusters"], m["cluster/used_clusters"]) == (4, 3)
    with pytest.raises(ValueError, match="num_clusters"):
        cluster_usage(clusters, 5)


# --------------------------------------------------------------------------- k-NN
def test_knn_separable_blobs_are_perfect_for_every_k() -> None:
    feats, labels = _blobs(100, 5, 16, spread=10.0, seed=0)
    acc = knn_accuracies(feats[:300], labels[:300], feats[300:], labels[300:])
    assert set(acc) == {"knn/top1_k10", "knn/top1_k20", "knn/top1_k100", "knn/top1_k200"}
    assert all(v > 0.99 for v in acc.values()), acc


def test_knn_random_labels_are_chance() -> None:
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(4000, 16, generator=g), torch.randint(0, 5, (4000,), generator=g)
    acc = knn_accuracies(feats[:2000], labels[:2000], feats[2000:], labels[2000:], ks=(20, 200))
    assert all(0.15 < v < 0.25 for v in acc.values()), acc


def test_knn_k_above_bank_size_uses_the_whole_bank() -> None:
    # Bank: 3 samples of class 0 far from the query, 1 of class 1 next to it. k = 1 -> class 1;
    # k clipped to 4 at a huge temperature -> plain majority -> class 0.
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
    bank_labels = torch.tensor([0, 0, 0, 1])
    query, query_label = torch.tensor([[0.0, 1.0]]), torch.tensor([1])
    acc = knn_accuracies(bank, bank_labels, query, query_label, ks=(1, 1000), temperature=1e3)
    assert acc == {"knn/top1_k1": 1.0, "knn/top1_k1000": 0.0}


# --------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_blobs_best_in_grid_and_deterministic() -> None:
    feats, labels = _blobs(300, 5, 16, spread=3.0, seed=2)
    kwargs = dict(lrs=(1e-4, 1e-2), weight_decays=(0.0, 0.1), epochs=10, batch_size=256, seed=3)
    out = linear_probe(feats[:1000], labels[:1000], feats[1000:], labels[1000:], **kwargs)
    assert out["linear/top1"] > 0.98 and out["linear/val_top1"] > 0.98
    assert out["linear/best_lr"] in kwargs["lrs"] and out["linear/best_weight_decay"] in kwargs["weight_decays"]
    assert out == linear_probe(feats[:1000], labels[:1000], feats[1000:], labels[1000:], **kwargs)


def test_linear_probe_picks_the_learning_rate_that_trains() -> None:
    # lr 0 keeps the zero init: all logits tie, argmax is class 0, accuracy 1/4 on validation.
    feats, labels = _blobs(200, 4, 8, spread=3.0, seed=4)
    for lrs in ((0.0, 1e-1), (1e-1, 0.0)):
        out = linear_probe(feats[:600], labels[:600], feats[600:], labels[600:], lrs=lrs,
                           weight_decays=(0.0,), epochs=3, batch_size=128)
        assert out["linear/best_lr"] == 1e-1 and out["linear/top1"] > 0.9, out


# --------------------------------------------------------------------------- docs/theory.md §6
def test_accumulator_equals_one_shot_and_objective_diagnostics() -> None:
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(103, 7, generator=g) * 3, dim=1)
    acc = DiagnosticsAccumulator()
    for chunk in probs.split(17):
        acc.update(chunk)
    chunked, one_shot = acc.result(), dataset_diagnostics(probs)
    assert set(one_shot) == {f"cluster/{k}" for k in DIAG_KEYS}
    reference = information_diagnostics(probs.log(), torch.full((7,), -math.log(7)))
    as_tensor = lambda d, prefix: torch.tensor([float(d[prefix + k]) for k in DIAG_KEYS], dtype=torch.float64)
    assert torch.allclose(as_tensor(chunked, "cluster/"), as_tensor(one_shot, "cluster/"), rtol=1e-12, atol=1e-12)
    assert torch.allclose(as_tensor(one_shot, "cluster/"), as_tensor(reference, ""), rtol=1e-5, atol=1e-6)


def test_uniform_posteriors_have_zero_and_balanced_one_hot_log_k_information() -> None:
    k = 8
    uniform = dataset_diagnostics(torch.full((40, k), 1 / k))
    assert uniform["cluster/mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert uniform["cluster/conditional_entropy"] == pytest.approx(math.log(k))
    one_hot = dataset_diagnostics(torch.eye(k).repeat(5, 1))
    assert one_hot["cluster/mutual_information"] == pytest.approx(math.log(k))
    assert one_hot["cluster/conditional_entropy"] == 0.0
    assert one_hot["cluster/effective_clusters"] == pytest.approx(k)
    collapsed = dataset_diagnostics(torch.eye(k)[torch.zeros(40, dtype=torch.long)])
    assert collapsed["cluster/mutual_information"] == 0.0 and collapsed["cluster/effective_clusters"] == 1.0


def test_empty_accumulator_refuses_a_result() -> None:
    with pytest.raises(ValueError, match="no posterior rows"):
        DiagnosticsAccumulator().result()


# --------------------------------------------------------------------------- plot
def test_usage_plot_writes_a_png(tmp_path) -> None:
    path = tmp_path / "usage.png"
    assert usage_plot(np.array([5, 0, 120, 3, 40]), path, "cluster usage") == path
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
