"""The feature protocol: what every k-NN row gets alike (the teacher, raw pixels, random init).

Two standard steps, chosen on the validation split (docs/benchmarks.md, "[1/5] ... sixth round"):

- **Precise BatchNorm** (``eval.precise_bn_images``; Wu & Johnson 2021, "Rethinking 'Batch' in
  BatchNorm"). A network keeps the running statistics of its *training* inputs: colour-jittered
  crops here, seen through an exponential average. Before features are extracted, each
  BatchNorm layer's statistics are recomputed on clean (evaluation-preprocessed) images as the
  equal-weight average over B batches, layer after layer in one pass,

      mu = 1/B sum_b mean(x_b),   sigma^2 = 1/B sum_b var(x_b),

  and averaged over ranks weighted by their batch counts, so every worker extracts with the
  same statistics. A network without BatchNorm is unchanged (raw pixels have none).
- **Centring** (``eval.center``). Features after ReLU and average pooling are non-negative, so
  every cosine similarity is high. Each feature is centred by the bank's mean before the L2
  normalisation of the k-NN,

      f' = (f - m) / ||f - m||,   m = 1/N sum_{i in bank} f_i,

  with ``m`` summed and counted over all ranks' shares of the bank.

Pure torch (``rayssl.dist`` collectives are the identity in one process): no Ray, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from rayssl import dist


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[Tensor], forward: Callable[[nn.Module, Tensor], object]
               ) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm statistics are recomputed on ``batches``
    (``forward(model, x)`` runs one batch through it); ``model`` itself when it has no BatchNorm.

    All ranks call it together. A rank with no batch contributes nothing to the average.
    """
    if not _batchnorms(model):
        return model
    model = copy.deepcopy(model).train()
    layers = _batchnorms(model)
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative: the equal-weight average over the batches seen
    for x in batches:
        forward(model, x)
    for m in layers:
        n = m.num_batches_tracked.double()
        total = dist.all_sum(n)
        if float(total) == 0:
            raise ValueError("eval.precise_bn_images: no clean image reached the BatchNorm statistics")
        for buf in (m.running_mean, m.running_var):
            buf.copy_(dist.all_sum(buf.double() * n) / total)
        m.num_batches_tracked.copy_(total.long())
    return model.eval()


def bank_mean(bank: Tensor) -> Tensor:
    """The mean bank feature ``m`` (1, D) over every rank's share of the bank (float64 sums)."""
    total = dist.all_sum(bank.double().sum(0, keepdim=True))
    return (total / dist.sum_int(bank.shape[0])).to(bank.dtype)
