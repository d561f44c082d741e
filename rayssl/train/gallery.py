"""``RunGallery``: what the clusters hold at the end of a run, drawn from the final k-NN's pass
or, in a run without one, from a pass of its own (``GalleryPass``).

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

Without a k-NN (no labels, or no labelled evaluation split) there is no pass to ride on:
``GalleryPass`` reads ``Worker.gallery_images`` (the first ``eval.gallery_images`` of
``data.eval_source``, else of ``data.source``) once for the clusters and once more for the picked
images; class histograms and the cluster x class map only where those images have labels.

Ray-free: the batches come from ``Worker.knn_sets`` or ``Worker.gallery_images`` (Ray Data shards
in the job, lists in tests) and must carry an ``id`` column (``rayssl.data.datasets.decode_stage``
passes it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from rayssl import dist
from rayssl.config import Config
from rayssl.eval.online import batch_images
from rayssl.models import unwrap
from rayssl.transforms import MultiCrop


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
        from rayssl.eval.gallery import cluster_class_map, galleries, images_by_id, select, shown_ids

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
        images = {}
        for part in dist.gather_objects(images_by_id(queries(), set(shown_ids(picks, found["id"])))):
            images.update(part)
        if self.rank != 0:
            return {}
        out = galleries(picks, found["id"], images, num_clusters, names)
        if labels is not None:
            out["cluster_class_map.png"] = cluster_class_map(clusters, labels, num_clusters, names)
        return out


@dataclass(frozen=True)
class GalleryPass:
    """The end-of-run gallery of a run without a k-NN (data without labels, or with no labelled
    evaluation split; every rank calls ``figures`` together): the teacher's cluster of each of this
    worker's ``images()`` (``Worker.gallery_images``), from its backbone features of the evaluation
    crop (``MultiCrop.eval_transform``) with the teacher's own BatchNorm statistics (the k-NN pass
    recomputes them on clean bank images; here there is no bank); then ``RunGallery.figures``
    (class histograms and the cluster x class map only where the images have labels)."""

    cfg: Config
    crops: MultiCrop  # the run's eval transform (rayssl.train.views.Views.crops)
    images: Callable[[], Iterable[dict]]
    device: torch.device
    autocast: AbstractContextManager  # the training step's (rayssl.train.step.Stepper.autocast)

    @torch.no_grad()
    def figures(self, teacher: nn.Module, rank: int, class_names: Sequence[str]) -> dict[str, Figure]:
        gallery = RunGallery(unwrap(teacher).head, self.cfg.objective.teacher_temperature,
                             self.cfg.eval.gallery_clusters, rank)
        backbone, size = unwrap(teacher).backbone.eval(), self.cfg.augment.global_crop_size
        for batch in self.images():
            if batch["ok"].any():
                with self.autocast:
                    x = self.crops.eval_transform(batch_images(batch, self.device), size)
                    feats = backbone(x.contiguous(memory_format=torch.channels_last)).float()
                gallery.seen(batch, [feats])
        return gallery.figures(self.images, self.cfg.objective.num_clusters, class_names)
