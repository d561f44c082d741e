"""Metrics of frozen features and cluster assignments: pure functions, no Ray.

- ``knn_accuracies``: DINO's weighted k-NN for several k from one top-max(k) search.
- ``linear_probe``: logistic regression on standardised features, LR x weight-decay grid.
- ``clustering_metrics`` / ``cluster_usage``: NMI, ARI, Hungarian and majority accuracy, usage.
- ``dataset_diagnostics`` / ``DiagnosticsAccumulator``: docs/theory.md §6 over a whole dataset.
- ``usage_plot``: the sorted cluster-usage histogram as a PNG (the only function that writes).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.model_selection import train_test_split
from torch import Tensor

from rayssl.knn import topk_neighbours, weighted_vote
from rayssl.objective import _entropy_rows
from rayssl.plots import usage_figure

ArrayLike = Tensor | np.ndarray


def _num_classes(*labels: Tensor) -> int:
    """1 + the largest label in any of ``labels``."""
    return 1 + max(int(y.max()) for y in labels)


# --------------------------------------------------------------------------- k-NN
def knn_accuracies(train_feats: ArrayLike, train_labels: ArrayLike, eval_feats: ArrayLike,
                   eval_labels: ArrayLike, ks: tuple[int, ...] = (10, 20, 100, 200),
                   temperature: float = 0.07, num_classes: int | None = None) -> dict[str, float]:
    """Weighted k-NN top-1 accuracy of the eval features (the queries) against the train bank, per k.

        pred(x) = argmax_c sum_{j in top-k(x)} exp(cos(x, b_j) / T) [y_j = c]

    One search for the top-max(ks) neighbours (``rayssl.knn.topk_neighbours``, chunked over
    queries); each k votes with the first k of them, as the list is sorted by similarity. A k
    above the bank size uses the whole bank. The search runs on the features' device, the vote
    on the CPU. Keys ``knn/top1_k{k}`` with k as requested.
    """
    bank = F.normalize(torch.as_tensor(train_feats).float(), dim=1)
    queries = F.normalize(torch.as_tensor(eval_feats).float(), dim=1)
    bank_labels = torch.as_tensor(train_labels).long().to(bank.device)
    query_labels = torch.as_tensor(eval_labels).long().cpu()
    if num_classes is None:
        num_classes = _num_classes(bank_labels, query_labels)
    sims, labels = topk_neighbours(bank, bank_labels, queries, max(ks))
    sims, labels = sims.cpu(), labels.cpu()
    out = {}
    for k in ks:
        pred = weighted_vote(sims[:, :k], labels[:, :k], num_classes, temperature)
        out[f"knn/top1_k{k}"] = float((pred == query_labels).float().mean())
    return out


# --------------------------------------------------------------------------- linear probe
def _logits(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Logits (G, N, C) of G linear classifiers, x_i W_g + b_g, for W (G, D, C) and b (G, C)."""
    return torch.einsum("nd,gdc->gnc", x, w) + b[:, None]


def _fit_linear(x: Tensor, y: Tensor, num_classes: int, grid: list[tuple[float, float]],
                epochs: int, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Logistic regressions argmin_{W,b} mean_i CE(x_i W + b, y_i), one per (lr, weight decay) in ``grid``.

    AdamW (decoupled weight decay on W and b) on shuffled mini-batches, learning rate
    cosine-annealed from lr to 0 over all steps, zero initialisation (the problem is convex).
    The G fits run side by side: the same ``seed``-ed batch order, one batched matmul per step,
    one optimizer parameter group per pair, so each equals its own separate fit.
    Returns W (G, D, C) and b (G, C).
    """
    g = torch.Generator().manual_seed(seed)
    ws = [torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True) for _ in grid]
    bs = [torch.zeros(num_classes, device=x.device, requires_grad=True) for _ in grid]
    opt = torch.optim.AdamW([{"params": [w, b], "lr": lr, "weight_decay": wd}
                             for w, b, (lr, wd) in zip(ws, bs, grid)])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(x.shape[0] / batch_size))
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).to(x.device).split(batch_size):
            logits = _logits(x[idx], torch.stack(ws), torch.stack(bs))
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(len(grid)), reduction="sum") / idx.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return torch.stack(ws).detach(), torch.stack(bs).detach()


def _accuracies(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> list[float]:
    """Top-1 accuracy of each of the G classifiers, mean_i [argmax_c (x_i W_g + b_g)_c = y_i]."""
    return (_logits(x, w, b).argmax(dim=-1) == y).float().mean(dim=1).tolist()


def linear_probe(train_feats: ArrayLike, train_labels: ArrayLike, eval_feats: ArrayLike,
                 eval_labels: ArrayLike, *, lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2),
                 weight_decays: tuple[float, ...] = (0.0, 0.1), epochs: int = 30,
                 batch_size: int = 1024, val_fraction: float = 0.1, seed: int = 0,
                 device: str | torch.device | None = None) -> dict[str, float]:
    """Linear-probe top-1 accuracy, hyperparameters chosen on a held-out validation split.

    Features are standardised, (x - mean) / std with the train set's mean and std (no labels;
    std clamped at 1e-6). A stratified split (``val_fraction``, ``seed``) of the train set
    picks the (lr, weight decay) of ``_fit_linear`` with the best validation accuracy (first
    in grid order on ties); that pair is refitted on the whole train set and scored on the eval set.
    Runs on ``device``, else CUDA when available, else the CPU. Keys ``linear/top1``,
    ``linear/val_top1``, ``linear/best_lr``, ``linear/best_weight_decay``.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    x_train = torch.as_tensor(train_feats).float().to(dev)
    x_eval = torch.as_tensor(eval_feats).float().to(dev)
    y_train = torch.as_tensor(train_labels).long().to(dev)
    y_eval = torch.as_tensor(eval_labels).long().to(dev)
    num_classes = _num_classes(y_train, y_eval)
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)
    x_train, x_eval = (x_train - mean) / std, (x_eval - mean) / std

    fit_idx, val_idx = train_test_split(np.arange(x_train.shape[0]), test_size=val_fraction,
                                        random_state=seed, stratify=y_train.cpu().numpy())
    fit_idx, val_idx = torch.as_tensor(fit_idx, device=dev), torch.as_tensor(val_idx, device=dev)
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    w, b = _fit_linear(x_train[fit_idx], y_train[fit_idx], num_classes, grid, epochs, batch_size, seed)
    val_accs = _accuracies(w, b, x_train[val_idx], y_train[val_idx])
    best = max(range(len(grid)), key=val_accs.__getitem__)
    w, b = _fit_linear(x_train, y_train, num_classes, [grid[best]], epochs, batch_size, seed)
    return {"linear/top1": _accuracies(w, b, x_eval, y_eval)[0], "linear/val_top1": val_accs[best],
            "linear/best_lr": grid[best][0], "linear/best_weight_decay": grid[best][1]}


# --------------------------------------------------------------------------- cluster assignments
def cluster_usage(clusters: ArrayLike, num_clusters: int) -> np.ndarray:
    """Samples per cluster, counts[k] = #{i : cluster_i = k} for k = 0..num_clusters-1."""
    counts = np.bincount(np.asarray(clusters).ravel(), minlength=num_clusters)
    if counts.size > num_clusters:
        raise ValueError(f"cluster_usage: cluster id {counts.size - 1} >= num_clusters={num_clusters}")
    return counts


def clustering_metrics(clusters: ArrayLike, labels: ArrayLike, num_clusters: int) -> dict[str, float]:
    """Agreement of cluster assignments with class labels, and cluster usage.

    With the contingency matrix n_ck = #{i : label_i = c, cluster_i = k} and N samples:

        nmi                 I(C;K) / ((H(C) + H(K)) / 2)            (sklearn, arithmetic mean)
        ari                 adjusted Rand index                     (sklearn)
        hungarian_accuracy  max over one-to-one maps m: sum_k n_{m(k)k} / N   (scipy; with more
                            clusters than classes, the unmatched clusters count as errors)
        majority_accuracy   sum_k max_c n_ck / N                    (each cluster -> its majority class)
        empty_clusters      #{k < num_clusters : no sample},  used_clusters = num_clusters - empty

    Keys prefixed ``cluster/``.
    """
    clusters, labels = np.asarray(clusters).ravel(), np.asarray(labels).ravel()
    table = contingency_matrix(labels, clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    counts = cluster_usage(clusters, num_clusters)
    return {
        "cluster/nmi": float(normalized_mutual_info_score(labels, clusters)),
        "cluster/ari": float(adjusted_rand_score(labels, clusters)),
        "cluster/hungarian_accuracy": float(table[rows, cols].sum() / clusters.size),
        "cluster/majority_accuracy": float(table.max(axis=0).sum() / clusters.size),
        "cluster/empty_clusters": int((counts == 0).sum()),
        "cluster/used_clusters": int((counts > 0).sum()),
    }


# --------------------------------------------------------------------------- docs/theory.md §6
class DiagnosticsAccumulator:
    """docs/theory.md §6 over a dataset whose posteriors q_i (rows of (n, K)) come in chunks.

    Keeps, in float64, S = sum_i q_i, E = sum_i H(q_i) and N; then pi = S / N and

        H(K)   = -sum_k pi_k log pi_k      marginal entropy; exp H(K) = effective clusters
        H(K|X) = E / N                     mean row entropy (0 log 0 = 0)
        I(X;K) = H(K) - H(K|X)

    Purely local (no collective), so any process may call it alone.
    """

    def __init__(self) -> None:
        self._row_sum: Tensor | None = None
        self._entropy_sum: Tensor | None = None
        self._count = 0

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        """Add the posterior rows ``probs`` (n, K) to the sums."""
        p = probs.detach().double()
        row_sum, entropy_sum = p.sum(dim=0), _entropy_rows(p.log()).sum()
        if self._row_sum is None:
            self._row_sum, self._entropy_sum = row_sum, entropy_sum
        else:
            self._row_sum, self._entropy_sum = self._row_sum + row_sum, self._entropy_sum + entropy_sum
        self._count += p.shape[0]

    def result(self) -> dict[str, float]:
        """``cluster/{marginal_entropy, conditional_entropy, mutual_information, effective_clusters}``."""
        if self._count == 0:
            raise ValueError("DiagnosticsAccumulator.result: no posterior rows were added")
        h_marginal = float(_entropy_rows((self._row_sum / self._count).log()))
        h_conditional = float(self._entropy_sum / self._count)
        return {
            "cluster/marginal_entropy": h_marginal,
            "cluster/conditional_entropy": h_conditional,
            "cluster/mutual_information": h_marginal - h_conditional,
            "cluster/effective_clusters": math.exp(h_marginal),
        }


def dataset_diagnostics(probs: Tensor) -> dict[str, float]:
    """``DiagnosticsAccumulator`` fed all the posterior rows ``probs`` (N, K) at once."""
    acc = DiagnosticsAccumulator()
    acc.update(probs)
    return acc.result()


# --------------------------------------------------------------------------- plot
def usage_plot(counts: ArrayLike, path: str | os.PathLike[str], title: str) -> str | os.PathLike[str]:
    """Write a PNG of the cluster sizes sorted in decreasing order (bars, log y) to ``path``."""
    usage_figure(np.asarray(counts), title).savefig(path, format="png", dpi=100)
    return path
