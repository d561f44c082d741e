"""The student/teacher training step, free of Ray (testable in one process)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rayssl import dist
from rayssl.models import ema_update, unwrap
from rayssl.objective import ClusterObjective


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX flags in /proc/cpuinfo).

    Only there is bf16 autocast a win on the CPU: the default convnet4 step runs faster at the
    same k-NN (docs/benchmarks.md, the levers table); elsewhere oneDNN emulates it, slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def use_bf16(precision: str, device: torch.device) -> bool:
    """``train.precision``: bf16, fp32, or auto = bf16 on a GPU or on a CPU with native bf16."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


class NonFiniteError(FloatingPointError):
    """A step with a NaN/inf loss or gradient beyond ``train.skip_nonfinite``; one line."""


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights only, never on biases and norm parameters (as DINO)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_wd": True}]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if optim_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.0)


class ClusterUsage:
    """The teacher's clusters over an epoch, for the per-epoch plots (no collective per step).

    - prior: pi_k = mean over images and global views of softmax(z / tau_t)_k, the teacher's
      cluster marginal *before* normalisation (pi of docs/theory.md §3.1);
    - assigned: how many (image, view) pairs have k as the argmax of the normalised target q_t.
    ``collect`` all-reduces both (sums and count separately) and starts the next epoch.
    """

    def __init__(self, num_clusters: int, device: torch.device) -> None:
        self.sums = torch.zeros(2, num_clusters, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, teacher_logits: Tensor, targets: Tensor, teacher_temperature: float) -> None:
        z = teacher_logits.float().flatten(0, 1)
        self.sums[0] += torch.softmax(z / teacher_temperature, dim=-1).sum(0, dtype=torch.float64)
        hard = targets.flatten(0, 1).argmax(-1)  # index_add_, unlike bincount, never syncs with the host
        self.sums[1].index_add_(0, hard, torch.ones_like(hard, dtype=self.sums.dtype))
        self.count += z.shape[0]

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """``(prior, assigned)`` over all workers since the last call; resets."""
        stats = dist.all_sum(torch.cat([self.sums.flatten(), self.count]))
        k = self.sums.shape[1]
        prior = (stats[:k] / stats[-1].clamp_min(1)).cpu().numpy()
        assigned = stats[k:2 * k].cpu().numpy()
        self.sums.zero_(), self.count.zero_()
        return prior, assigned


class Stepper:
    """One optimizer step = ``accumulate`` micro-batches (default ``optim.accumulate_steps``;
    ``rayssl.train.batching``), then the EMA updates.

    Order within a step (DINO), docs/theory.md §8:

        micro_batch (each of the step's micro-batches)
            teacher forward on the 2 global views, student forward on all views
            loss, targets = ClusterObjective.forward(student, teacher, tau_t)   targets then the CE
            backward (DDP syncs on the last micro-batch only); targets.stat kept for the step
        finish
            prototype gradients dropped while frozen, clipping (a non-finite norm skips the step)
            optimizer step, ClusterObjective.update_state(the step's stats), teacher EMA
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, objective: ClusterObjective,
                 optimizer: torch.optim.Optimizer, schedules: dict[str, np.ndarray], cfg,
                 steps_per_epoch: int, device: torch.device, bf16: bool, accumulate: int | None = None):
        self.student, self.teacher, self.objective = student, teacher, objective
        self.optimizer, self.schedules, self.cfg = optimizer, schedules, cfg
        self.freeze_steps = round(cfg.optim.freeze_prototypes_epochs * steps_per_epoch)
        self.device, self.accumulate = device, accumulate or cfg.optim.accumulate_steps
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.last_outputs: tuple | None = None  # (student, teacher, tau_t) of the last micro-batch
        self.usage = ClusterUsage(objective.cfg.num_clusters, device)
        self.step_losses: list[Tensor] = []  # this step's micro-batch losses
        self.step_stats: list[Tensor | None] = []  # and their batch statistics, for the objective's state
        self.nonfinite_steps = 0  # skipped so far (restored from the checkpoint)
        # forward passes update the BatchNorm statistics: a skipped step puts them back
        self.buffers = [b for m in (unwrap(student), teacher) for b in m.buffers()]
        self.saved_buffers = [b.clone() for b in self.buffers]

    def _set_hyperparameters(self, step: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.schedules["lr"][step]
            if not g.get("no_wd"):
                g["weight_decay"] = self.schedules["wd"][step]

    def micro_batch(self, views: list[Tensor], step: int, last: bool) -> Tensor:
        """Forward and backward of one micro-batch; returns the (unscaled) loss, that of
        ``ClusterObjective.forward`` (docs/theory.md §1). The objective's state is not touched
        here: the micro-batch's statistic waits in ``step_stats`` for ``finish``."""
        tau_t = float(self.schedules["teacher_temperature"][step])
        if not self.step_losses:  # the step's first micro-batch
            for saved, buffer in zip(self.saved_buffers, self.buffers):
                saved.copy_(buffer)
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        sync = contextlib.nullcontext() if last or not hasattr(self.student, "no_sync") else self.student.no_sync()
        with sync:
            with self.autocast:
                with torch.no_grad():
                    teacher_out = self.teacher(views[:2])
                student_out = self.student(views)
                loss, targets = self.objective(student_out, teacher_out, tau_t)
            (loss / self.accumulate).backward()
        self.step_stats.append(targets.stat)
        self.usage.add(teacher_out, targets.qt, tau_t)
        self.last_outputs = (student_out.detach(), teacher_out, tau_t)
        self.step_losses.append(loss.detach())
        return loss.detach()

    def finish(self, step: int) -> list[Tensor]:
        """Clip, step the optimizer, update the objective state and the teacher; the step's
        micro-batch losses, or ``[]`` for a step skipped because its loss or gradient is not
        finite (no update at all; ``NonFiniteError`` once more than ``train.skip_nonfinite``).

        The check costs one host sync per step (as DINO's). It reads the gradient norm after
        DDP's all-reduce, the same on every rank, so every rank skips or stops together.
        """
        losses, self.step_losses = self.step_losses, []
        stats, self.step_stats = self.step_stats, []  # a skipped step drops them: the state stays as it was
        self._set_hyperparameters(step)
        if step < self.freeze_steps:
            for p in unwrap(self.student).head.prototype_parameters():
                p.grad = None
        params = [p for p in self.student.parameters() if p.grad is not None]
        if self.cfg.optim.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not bool(torch.isfinite(norm)):
            self._skip(step, losses, float(norm))
            return []
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.update_state(stats)
        ema_update(self.teacher, self.student, float(self.schedules["momentum"][step]))
        return losses

    def _skip(self, step: int, losses: list[Tensor], norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for saved, buffer in zip(self.saved_buffers, self.buffers):
            buffer.copy_(saved)
        self.nonfinite_steps += 1
        bad_loss = dist.all_max(torch.stack([~torch.isfinite(x) for x in losses]).any().float().reshape(1))
        term = "loss" if bool(bad_loss) else f"gradient (norm {norm})"
        if self.nonfinite_steps > self.cfg.train.skip_nonfinite:
            raise NonFiniteError(f"non-finite {term} at step {step + 1} (train.skip_nonfinite="
                                 f"{self.cfg.train.skip_nonfinite}, {self.nonfinite_steps} seen)")

    def state_dict(self) -> dict:
        """Student, teacher, optimizer and objective state (center / prior EMA)."""
        return {"student": unwrap(self.student).state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "objective": self.objective.state_dict(),
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.student).load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.nonfinite_steps = state.get("nonfinite_steps", 0)

    def diagnostics(self) -> dict[str, float]:
        """docs/theory.md §6 on the last micro-batch (global statistics)."""
        return self.objective.diagnostics(*self.last_outputs)
