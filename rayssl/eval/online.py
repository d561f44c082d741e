"""k-NN during training: every worker scores its share of the bank, the exact global top-k is merged.

Ray-free: the sets arrive as iterables of numpy batches (``image`` uint8 (B, H, W, C), ``label``,
``ok``), whatever streams them (Ray Data shards in the job, lists in tests). All ranks call
``knn_eval`` together (it gathers queries, neighbour lists and the bank mean, ``rayssl.dist``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from rayssl import dist
from rayssl.eval.protocol import bank_mean
from rayssl.knn import merge_neighbours, topk_neighbours, weighted_vote

Features = Callable[[torch.Tensor], list[torch.Tensor]]  # uint8 images -> feature sets (B, D)
Seen = Callable[[dict, list[torch.Tensor]], None]  # a batch, its decodable rows' feature sets


def batch_images(batch: dict, device: torch.device) -> torch.Tensor:
    """The decodable rows of a batch, uint8 (B, H, W, C) numpy -> uint8 (B', C, H, W) tensor."""
    x = torch.from_numpy(np.array(batch["image"][batch["ok"]]))  # a writable copy
    return x.permute(0, 3, 1, 2).to(device, non_blocking=True)


def first_images(batches: Iterable[dict], images: int) -> tuple[list[dict], Iterator[dict]]:
    """The first batches that hold at least ``images`` decodable rows (all of them if fewer), and
    an iterator over every batch, those first ones included: one pass over the stream serves both
    the precise-BatchNorm statistics and the features."""
    it, head, count = iter(batches), [], 0
    while count < images and (batch := next(it, None)) is not None:
        head.append(batch)
        count += int(batch["ok"].sum())
    return head, itertools.chain(head, it)


def features_of(batches: Iterable[dict], fn: Features, device: torch.device,
                seen: Seen | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features (one float tensor per feature set ``fn`` returns) and labels of the decodable rows
    of in-memory ``batches``, in this process (a checkpoint's features over Ray Data are
    ``rayssl.eval.evaluate.stream_features``); ``seen(batch, feats)`` gets each batch and the
    features of its decodable rows as they are extracted."""
    feats, labels = [], []
    for batch in batches:
        if not batch["ok"].any():
            continue
        feats.append([f.float().cpu() for f in fn(batch_images(batch, device))])
        labels.append(torch.from_numpy(np.array(batch["label"][batch["ok"]])))
        if seen is not None:
            seen(batch, feats[-1])
    return [torch.cat(f) for f in zip(*feats)], torch.cat(labels)


def knn_eval(bank: Iterable[dict], queries: Iterable[dict], fn: Features, names: list[str], *, k: int,
             temperature: float, num_classes: int, device: torch.device, center: bool,
             seen: Seen | None = None) -> dict[str, float]:
    """Weighted k-NN accuracy of each feature set ``fn`` returns, named by ``names``.

    Each worker extracts its shard of the bank (labelled training images) and of the queries
    (``data.eval_source``); with ``center`` every set is centred by its global bank mean
    (``rayssl.eval.protocol.bank_mean``) before the L2 normalisation; the queries are gathered,
    each worker returns its local top-k, and the exact global top-k is merged, so W workers
    score exactly what one process would. ``seen`` gets each query batch and its features before
    any centring (``features_of``).
    """
    bank_feats, bank_labels = features_of(bank, fn, device)
    query_feats, query_labels = features_of(queries, fn, device, seen)
    for i in range(len(names)):
        m = bank_mean(bank_feats[i]) if center else 0.0
        bank_feats[i], query_feats[i] = (F.normalize(f - m, dim=1) for f in (bank_feats[i], query_feats[i]))
    parts = dist.gather_objects((query_feats, query_labels))
    all_labels = torch.cat([p[1] for p in parts])
    results = {}
    for i, name in enumerate(names):
        q = torch.cat([p[0][i] for p in parts])
        local = topk_neighbours(bank_feats[i], bank_labels, q, k)
        sims, labels = merge_neighbours(dist.gather_objects(local), k)
        pred = weighted_vote(sims, labels, num_classes, temperature)
        results[name] = float((pred == all_labels).float().mean())
    return results
