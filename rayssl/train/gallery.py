"""``RunGallery``: what the clusters hold at the end of a run, drawn from the final k-NN's pass.

The final k-NN (``rayssl.train.knn.RunKnn``) extracts the teacher's features of this worker's
share of the evaluation split; ``seen`` takes the teacher's cluster of each image from them,
``argmax softmax(head(f) / tau_t)`` and its probability, as ``jobs/evaluate.py`` does
(``rayssl.eval.evaluate.assign``). ``figures`` then (every rank together, ``rayssl.dist``):

1. gathers every rank's ids, clusters, probabilities and labels, and picks the galleries' clusters
   and images the same way on every rank (``rayssl.eval.gallery.select``);
2. reads this worker's share of the evaluation split once more, keeping only the picked images
   (a few hundred: nothing else is held), and gathers them;
3. draws, on rank 0, ``gallery_top.png``, ``gallery_tail.png`` and, with labels,
   ``cluster_class_map.png`` (the figures of ``jobs/evaluate.py --gallery`` but its embedding map).

Ray-free: the batches come from ``Worker.knn_sets`` (Ray Data shards in the job, lists in tests)
and must carry an ``id`` column (``rayssl.data.datasets.decode_stage`` passes it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from rayssl import dist


@dataclass
class RunGallery:
    """Collects this worker's evaluation images' clusters (``seen``), then draws (``figures``)."""

    head: nn.Module  # the teacher's projection head and prototypes
    temperature: float  # objective.teacher_temperature
    clusters: int  # eval.gallery_clusters: clusters per gallery
    rank: int = 0
    parts: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"id": [], "cluster": [], "max_prob": [],
                                                                         "label": []})
    chosen: dict[str, list[tuple[int, list[str]]]] = field(default_factory=dict)  # part -> (cluster, member ids)

    @torch.no_grad()
    def seen(self, batch: dict, feats: list[torch.Tensor]) -> None:
        """One query batch of the final k-NN and its feature sets (the teacher's first)."""
        ok = batch["ok"]
        if "id" not in batch:
            raise ValueError("the evaluation batches have no 'id' column: the end-of-run gallery needs it")
        probs = torch.softmax(self.head.eval()(feats[0]).float() / self.temperature, dim=1)
        top, cluster = probs.max(dim=1)
        for key, value in (("id", np.asarray(batch["id"][ok]).astype(str)), ("cluster", cluster.numpy()),
                           ("max_prob", top.numpy()), ("label", np.asarray(batch["label"][ok]))):
            self.parts[key].append(value)

    def figures(self, queries: Callable[[], Iterable[dict]], num_clusters: int,
                class_names: Sequence[str] | None) -> dict[str, Figure]:
        """The figures (rank 0; ``{}`` on the others): every rank calls it after the final k-NN,
        with ``queries()`` a fresh pass over its share of the evaluation split. ``chosen`` then
        holds each gallery's clusters and the ids of their images, on every rank."""
        from rayssl.eval.gallery import cluster_class_map, gallery_figure, images_by_id, select

        mine = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.parts.items()}
        every = dist.gather_objects(mine)
        found = {k: np.concatenate([p[k] for p in every]) for k in mine}
        if not found["id"].size:
            return {}
        labels = found["label"].astype(np.int64) if (found["label"] >= 0).any() else None
        clusters = found["cluster"].astype(np.int64)
        names = list(class_names) if class_names and labels is not None and labels.max() < len(class_names) else None
        picks = {part: select(clusters, found["max_prob"], labels, top=self.clusters, tail=part == "tail",
                              num_classes=len(names) if names else None) for part in ("top", "tail")}
        self.chosen = {part: [(p.cluster, list(found["id"][p.members])) for p in chosen]
                       for part, chosen in picks.items()}
        members = np.unique(np.concatenate([p.members for chosen in picks.values() for p in chosen]))
        wanted = set(found["id"][members])
        images = {}
        for part in dist.gather_objects(images_by_id(queries(), wanted)):
            images.update(part)
        if self.rank != 0:
            return {}
        keys = [key for key in found["id"][members] if key in images]
        stack = np.stack([images[key] for key in keys])
        where = np.full(len(clusters), -1, np.int64)  # evaluation row -> row of ``stack``
        where[members[np.isin(found["id"][members], keys)]] = np.arange(len(keys))
        titles = {"top": f"the {len(picks['top'])} most-used of {num_clusters} clusters: their most confident images",
                  "tail": f"the {len(picks['tail'])} least-used clusters still used: their most confident images"}
        out = {}
        for part, chosen in picks.items():
            shown = [replace(p, members=where[p.members][where[p.members] >= 0]) for p in chosen]
            out[f"gallery_{part}.png"] = gallery_figure(stack, shown, names, titles[part])
        if labels is not None:
            out["cluster_class_map.png"] = cluster_class_map(clusters, labels, num_clusters, names)
        return out

