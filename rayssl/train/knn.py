"""``RunKnn``: the weighted k-NN of a run's networks on this worker's labelled sets (every rank
calls it together: the features, the BatchNorm statistics and the neighbours are collectives)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch import nn

from rayssl.config import Config
from rayssl.eval.online import Seen, batch_images, first_images, knn_eval
from rayssl.eval.protocol import precise_bn
from rayssl.models import unwrap
from rayssl.train.gallery import RunGallery
from rayssl.transforms import MultiCrop


@dataclass(frozen=True)
class RunKnn:
    """``knn(rows)``: the k-NN accuracy of each named row, on fresh ``sets()`` (``Worker.knn_sets``), or
    with ``online`` on the smaller ``online_sets()`` (``Worker.online_knn_sets``) when there are any."""

    cfg: Config
    num_classes: int
    crops: MultiCrop  # the run's eval transform (rayssl.train.views.Views.crops)
    sets: Callable[[], tuple[Iterable[dict], Iterable[dict]]]
    world: int
    device: torch.device
    autocast: AbstractContextManager  # the training step's (rayssl.train.step.Stepper.autocast)
    online_sets: Callable[[], tuple[Iterable[dict], Iterable[dict]]] | None = None

    def __call__(self, rows: dict[str, nn.Module | None], *, online: bool = False,
                 seen: Seen | None = None) -> dict[str, float]:
        """Weighted k-NN of each named row: a network's backbone features, or the raw pixels (None),
        under the feature protocol (``rayssl.eval.protocol``): each network with its BatchNorm
        statistics recomputed on this worker's share of the first ``eval.precise_bn_images`` clean
        bank images, every row centred by the bank mean (``eval.center``). ``seen`` gets each query
        batch and its features (``rayssl.eval.online.knn_eval``)."""
        e, size = self.cfg.eval, self.cfg.augment.global_crop_size
        bank, queries = (self.online_sets if online and self.online_sets else self.sets)()
        clean, bank = first_images(bank, -(-e.precise_bn_images // self.world))

        def features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
            with self.autocast:
                return backbone(self.crops.eval_transform(x, size).contiguous(memory_format=torch.channels_last))

        nets = {name: unwrap(m).backbone for name, m in rows.items() if m is not None}
        if e.precise_bn_images:
            nets = {name: precise_bn(m, (batch_images(b, self.device) for b in clean), features)
                    for name, m in nets.items()}

        @torch.no_grad()
        def fn(x: torch.Tensor) -> list[torch.Tensor]:
            for m in nets.values():
                m.eval()
            return [x.flatten(1).float() / 255 if m is None else features(nets[name], x) for name, m in rows.items()]
        return knn_eval(bank, queries, fn, list(rows), k=e.knn_k, temperature=e.knn_temperature,
                        num_classes=self.num_classes, device=self.device, center=e.center, seen=seen)

    def final(self, teacher: nn.Module, rank: int, class_names: Sequence[str]) -> tuple[float, dict[str, Figure]]:
        """The teacher's k-NN on the full sets and, from the same pass, what its clusters hold
        (``eval.gallery_clusters``, ``rayssl.train.gallery``): the figures on rank 0, else ``{}``."""
        if not self.cfg.eval.gallery_clusters:
            return self({"teacher": teacher})["teacher"], {}
        gallery = RunGallery(unwrap(teacher).head, self.cfg.objective.teacher_temperature,
                             self.cfg.eval.gallery_clusters, rank)
        accuracy = self({"teacher": teacher}, seen=gallery.seen)["teacher"]
        return accuracy, gallery.figures(lambda: self.sets()[1], self.cfg.objective.num_clusters, class_names)
