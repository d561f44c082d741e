"""Weighted k-NN evaluation of frozen features (DINO's protocol), shardable across workers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_neighbours(bank: Tensor, bank_labels: Tensor, queries: Tensor, k: int,
                    chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Cosine similarities and labels of the k nearest bank rows of each query.

    ``bank`` and ``queries`` are L2-normalised. A worker holding one shard of the bank returns
    its local top-k; ``merge_neighbours`` combines the shards exactly.
    """
    k = min(k, bank.shape[0])
    sims, labels = [], []
    for i in range(0, queries.shape[0], chunk):
        s, idx = (queries[i:i + chunk] @ bank.T).topk(k, dim=1)
        sims.append(s)
        labels.append(bank_labels[idx])
    return torch.cat(sims), torch.cat(labels)


def merge_neighbours(parts: list[tuple[Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor]:
    """Exact global top-k from per-shard top-k lists (concatenate along k, keep the best k)."""
    sims = torch.cat([p[0] for p in parts], dim=1)
    labels = torch.cat([p[1] for p in parts], dim=1)
    s, idx = sims.topk(min(k, sims.shape[1]), dim=1)
    return s, labels.gather(1, idx)


def weighted_vote(sims: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Predicted class per query: argmax_c sum_j exp(sim_j / T) [label_j = c]."""
    weights = (sims / temperature).exp()
    votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
    votes.scatter_add_(1, labels, weights)
    return votes.argmax(dim=1)


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN top-1 accuracy (single process) on L2-normalised copies of the features."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    sims, labels = topk_neighbours(bank, bank_labels, queries, k)
    pred = weighted_vote(sims, labels, num_classes, temperature)
    return float((pred == query_labels).float().mean())
