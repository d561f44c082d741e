"""rayssl against a tuned peer: several arms, the same machine, data, backbone, batch and time.

    python benchmarks/peers.py --dataset fashion-mnist --budget 6m --seeds 0 1 2
    python benchmarks/peers.py --dataset scenes --budget 6m --seeds 0 1 2 --arms rayssl_prior lightly_dino
    python benchmarks/peers.py --dataset fashion-mnist --seeds 0 1 2 --tuned lr=0.002 optimizer=adamw batch_norm=true
    python benchmarks/peers.py --dataset fashion-mnist --table          # the table of an existing JSON
    python benchmarks/peers.py --dataset fashion-mnist --split test --seeds 0 1 2 --arms rayssl_prior  # final figures, once

Arms (the JSON keys), every one on rayssl's ``convnet4`` (``model.width=32``) at a global batch of 256:

- ``lightly_dino``: lightly 1.6 as its DINO example writes it (DataLoader over PIL images,
  ``DINOTransform``, ``DINOProjectionHead(256, 512, 64, 2048, freeze_last_layer=1)``, ``DINOLoss``
  with its own centring, ``update_momentum`` on a ``cosine_schedule`` from 0.996 to 1, Adam at a
  constant 0.001, fp32, contiguous NCHW). Global crops only (``n_local_views=0``), as rayssl's default;
  on 1-channel images blur, solarisation and random grayscale are off; on the scenes lightly's
  defaults except the sizes. Normalised with the training set's mean and std.
- ``lightly_dino_tuned``: the same code with the ``--tuned`` knobs (``TUNED``); without any it is
  not run and the JSON says so (it has no tuning yet).
- ``lightly_loss_in_rayssl``: rayssl's harness (below) with lightly's ``DINOLoss`` in place
  of rayssl's objective, temperatures and centre momentum from the config: it isolates the objective.
- ``rayssl_none``, ``rayssl_center``, ``rayssl_prior``, ``rayssl_sinkhorn``: rayssl's harness, as
  ``benchmarks/levers.py`` (Stepper, MultiCrop, objective, schedules; ``train.precision=auto``:
  bf16 on native-bf16 CPUs) with ``objective.mode=<mode>``, on the dataset's config.
- ``rayssl_default`` (only when named in ``--arms``): ``jobs/pretrain.py`` itself (Ray Train, 2 workers, Ray Data) with
  ``data.train_limit=50000`` and the budget as ``train.time_budget_scope=training``; its own k-NN
  (test split) is ignored: its final checkpoint's teacher is scored here like every other arm.

Equal time: each arm trains for ``--budget`` of training seconds (evaluations excluded), sized by
``rayssl.train.budget``'s rule: steps 50-150 are timed (schedules held at their warm-up/start values),
the total is fixed from that rate (at most ``train.epochs``), every schedule is built over it and
re-fitted 7 times on the way. A budget that ends before the timed steps stops at its clock.
``--steps N`` trains the harness arms exactly N steps instead: with one seed, two arms then see the
same initial network, batches and crops, and differ only in their arithmetic. ``--precision``
sets that arithmetic for the harness arms (``fp32``, or ``fp64``: networks, objective state, crops
and loss in float64: 134 img/s on the scenes against fp32's 599 on a 2-core AMD EPYC with
``avx512_bf16``); every network is scored in float32.

Honest protocol (as levers.py): training reads only the first 50k *train* images; the k-NN bank
is those 50k, the queries the held-out last 10k of train (``--split val``); ``--split test``
queries the test split, for final figures only. Every network is scored alike: the teacher
backbone with precise BatchNorm (10k clean bank images), features centred by the bank mean,
weighted 20-NN at T = 0.07 (``eval.knn_k``, the job's k; levers.py's ``10`` is the number of
classes) and the project's linear probe (``rayssl.eval.metrics.linear_probe``). Raw pixels and the
network at random init are scored once per dataset. The k-NN curve during training is the cheap
one: running BatchNorm statistics, a 10k bank subset, centred, at a quarter, half, three quarters
and the end of the budget.

Each arm x seed runs in its own process (so its peak RSS is its own) and is written to the JSON
as soon as it ends; arms x seeds already there are skipped, so an interrupted table resumes.
Several invocations may share one ``--out``: each save merges what the others wrote, so a pair runs
side by side, one process per core with ``--threads 1``, which suits the slow ``fp64`` pairs.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.stats
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import ConfigError, load_config  # noqa: E402
from rayssl.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from rayssl.eval.metrics import linear_probe  # noqa: E402
from rayssl.eval.protocol import bank_mean, precise_bn  # noqa: E402
from rayssl.knn import knn_accuracy  # noqa: E402
from rayssl.models import build_encoder, make_teacher  # noqa: E402
from rayssl.objective import ClusterObjective, at_least_fp32  # noqa: E402
from rayssl.schedules import build_schedules, stretch  # noqa: E402
from rayssl.train.budget import MARGIN, budget_total, measure_window, parse_duration, refit_due  # noqa: E402
from rayssl.train.step import Stepper, build_optimizer, use_bf16  # noqa: E402
from rayssl.transforms import EvalPreprocess, MultiCrop  # noqa: E402

TRAIN, BATCH, CLASSES, PRECISE_BN, CURVE_BANK = 50_000, 256, 10, 10_000, 10_000
CONFIGS = {"fashion-mnist": ROOT / "configs/fashion_mnist.yaml", "scenes": ROOT / "configs/fashion_mnist_scenes.yaml"}
MODES = ("none", "center", "prior", "sinkhorn")
ARMS = ("lightly_dino", "lightly_loss_in_rayssl", *(f"rayssl_{m}" for m in MODES),
        "lightly_dino_tuned", "rayssl_default")
# lightly_dino_tuned's knobs and the example's values (the lightly_dino arm)
TUNED = {"lr": 0.001, "optimizer": "adam", "weight_decay": 0.0, "momentum": 0.996, "output_dim": 2048,
         "batch_norm": False, "cj_strength": 0.5, "local_views": 0, "channels_last": False, "bf16": False}
# --tune: a careful lightly user's search on the validation split, one change at a time on top
# of the best so far (kept when its k-NN beats it), in this order: speed first, then the knobs
# the issue names (LR and optimizer, head BatchNorm, prototypes, teacher momentum, jitter); bf16
# autocast (the speed rayssl's arms get on a native-bf16 CPU) came after the first four probes
TUNE_STEPS = (("channels-last", {"channels_last": True}),
              ("adamw, weight decay 0.04", {"optimizer": "adamw", "weight_decay": 0.04}),
              ("lr 0.002", {"lr": 0.002}), ("bf16 autocast", {"bf16": True}), ("lr 0.004", {"lr": 0.004}),
              ("head BatchNorm", {"batch_norm": True}),
              ("teacher momentum 0.99", {"momentum": 0.99}), ("teacher momentum 0.95", {"momentum": 0.95}),
              ("jitter 1.0", {"cj_strength": 1.0}), ("jitter 1.25", {"cj_strength": 1.25}),
              ("256 prototypes", {"output_dim": 256}),
              # a second round, once the first was done (rayssl's levers table took 35 runs)
              ("2 local views", {"local_views": 2}), ("6 local views (DINOTransform's default)", {"local_views": 6}),
              ("1024 prototypes", {"output_dim": 1024}), ("lr 0.0005", {"lr": 0.0005}))
CURVE_AT = (0.25, 0.5, 0.75)  # fractions of the budget (and the end)


# ----------------------------------------------------------------------------- data
class Data:
    """uint8 images (N, C, H, W): ``train`` (the first 50k of train, or ``--limit``) and ``query``
    (the last 10k of train, or the test split), labels, and the training set's mean / std."""

    def __init__(self, dataset: str, split: str, data_dir: str, limit: int | None) -> None:
        x, y = _images(dataset, "train", data_dir)
        n = min(limit or TRAIN, TRAIN)
        self.train, self.train_y = x[:n], y[:n]
        qx, qy = (x[TRAIN:], y[TRAIN:]) if split == "val" else _images(dataset, "test", data_dir)
        self.query, self.query_y = qx[:limit], qy[:limit]
        self.channels, self.size = x.shape[1], x.shape[-1]
        f = self.train.float() / 255
        self.mean = tuple(f.mean(dim=(0, 2, 3)).tolist())
        self.std = tuple(f.std(dim=(0, 2, 3)).tolist())
        self.prep = EvalPreprocess(self.size, self.channels, self.mean, self.std)


def _images(dataset: str, split: str, data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) and labels of a split; the scenes built once into ~/.cache/rayssl/peers."""
    x, y = load_fashion_mnist(data_dir, split)
    if dataset == "scenes":
        from rayssl.data import scenes

        cache = Path("~/.cache/rayssl/peers").expanduser() / f"scenes-{split}.npy"
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, scenes.scenes(x, scenes.load_photos(), scenes.SEED, split))
        return torch.from_numpy(np.load(cache)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def features(backbone, images: torch.Tensor, prep) -> torch.Tensor:
    backbone.eval()
    dtype = next(backbone.parameters()).dtype  # float64 under --precision fp64
    return torch.cat([backbone(prep(images[i:i + 1000]).to(dtype).contiguous(memory_format=torch.channels_last))
                      for i in range(0, len(images), 1000)])


def centered(bank: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = bank_mean(bank.float())
    return bank - m, query - m


def score(bank: torch.Tensor, query: torch.Tensor, data: Data, k: int) -> dict:
    """Weighted k-NN and the linear probe of centred features."""
    bank, query = centered(bank, query)
    probe = linear_probe(bank, data.train_y, query, data.query_y)
    return {"knn": round(knn_accuracy(bank, data.train_y, query, data.query_y, CLASSES, k), 4),
            "linear": round(probe["linear/top1"], 4)}


def evaluate(backbone, data: Data, k: int, prep=None) -> dict:
    """The feature protocol: precise BN on 10k clean bank images, centring, k-NN and linear probe."""
    prep = prep or data.prep
    clean = (prep(data.train[i:i + 500]).contiguous(memory_format=torch.channels_last)
             for i in range(0, min(PRECISE_BN, len(data.train)), 500))
    bn = precise_bn(backbone, clean, lambda m, x: m(x))
    return score(features(bn, data.train, prep), features(bn, data.query, prep), data, k)


def cheap_knn(backbone, data: Data, k: int) -> float:
    """The curve's k-NN: running BN statistics, the first 10k bank images, centred."""
    was = backbone.training
    bank, query = centered(features(backbone, data.train[:CURVE_BANK], data.prep), features(backbone, data.query, data.prep))
    backbone.train(was)
    return round(knn_accuracy(bank, data.train_y[:CURVE_BANK], query, data.query_y, CLASSES, k), 4)


def baselines(data: Data, cfg, k: int) -> dict:
    """Raw pixels in [0, 1] and the harness's network at random init (seed 0), same protocol."""
    raw = lambda x: data.prep.pixels(x).flatten(1)  # noqa: E731
    torch.manual_seed(0)
    net = build_encoder(cfg.model, data.channels, data.size, cfg.objective.num_clusters)
    return {"raw_pixels": score(raw(data.train), raw(data.query), data, k),
            "random_init": evaluate(net.backbone.to(memory_format=torch.channels_last), data, k)}


# ----------------------------------------------------------------------------- equal time
class TrainingClock:
    """Training seconds: ``clock()`` counts from construction, ``paused`` keeps evaluations out."""

    def __init__(self) -> None:
        self.elapsed, self.started = 0.0, time.perf_counter()

    def clock(self) -> float:
        return self.elapsed + (0.0 if self.started is None else time.perf_counter() - self.started)

    @contextmanager
    def paused(self):
        self.elapsed, self.started = self.clock(), None
        try:
            yield
        finally:
            self.started = time.perf_counter()


class Budget(TrainingClock):
    """``--budget`` training seconds by ``rayssl.train.budget``'s rule (module docstring).

    ``build(total, hold_until)`` gives the schedules (per-step arrays); ``schedules`` is held at
    their warm-up/start values until the total is fixed, then built over it and stretched at each
    re-fit.
    """

    def __init__(self, seconds: float, warmup_steps: int, cap: int, build) -> None:
        super().__init__()
        self.seconds, self.build, self.cap, self.total = seconds, build, cap, cap
        self.first, self.last = measure_window(0, warmup_steps)
        self.schedules = build(cap, self.last)
        self.timed_from = self.fit_clock = None
        self.fixed_at, self.refits, self.how = 0, 0, "clock"

    def after(self, step: int) -> None:
        """After ``step`` steps: time, fix, re-fit, or (before the fix) stop when the clock runs out."""
        now = self.clock()
        if self.fit_clock is None:
            if step == self.first:
                self.timed_from = now
            if step == self.last:
                self._fit(step, now, (now - self.timed_from) / (self.last - self.first))
                self.schedules, self.how = self.build(self.total, step), "timed"
            elif now >= MARGIN * self.seconds:
                self.total = step
        elif refit_due(step, self.last, self.total, self.refits, self.fixed_at):
            self._fit(step, now, (now - self.fit_clock) / (step - self.fixed_at))
            self.schedules, self.refits = stretch(self.schedules, step, self.total), self.refits + 1

    def _fit(self, step: int, now: float, seconds_per_step: float) -> None:
        self.total = budget_total(self.seconds, now, step, seconds_per_step, self.cap)
        self.fixed_at, self.fit_clock = step, now

    def progress(self, step: int) -> float:
        """The fraction of the budget spent (the curve's points are at ``CURVE_AT`` of it)."""
        return self.clock() / (MARGIN * self.seconds)


class Steps(TrainingClock):
    """``--steps``: a fixed step count instead of a time budget (the objective's control: two arms
    with the same seed then see the same initial network, batches and crops at every step). Its
    schedules span the steps from step 0; the curve's points are at the same fractions of the steps."""

    def __init__(self, steps: int, build) -> None:
        super().__init__()
        self.total, self.how, self.refits = steps, "steps", 0
        self.schedules = build(steps, 0)

    def after(self, step: int) -> None:
        pass

    def progress(self, step: int) -> float:
        return step / self.total


def train_loop(budget: Budget | Steps, step_fn, backbone, data: Data, k: int) -> dict:
    """Steps until the budget's total, the cheap k-NN at the ``CURVE_AT`` fractions and the end."""
    curve, marks, step = [], list(CURVE_AT), 0
    while step < budget.total:
        step_fn(step)
        step += 1
        budget.after(step)
        if marks and budget.progress(step) >= marks[0]:
            marks.pop(0)
            with budget.paused():
                curve.append([round(budget.clock(), 1), cheap_knn(backbone, data, k)])
        if step % 50 == 0:
            print(f"  step {step}/{budget.total} {budget.clock():.0f}s", flush=True)
    seconds = budget.clock()
    curve.append([round(seconds, 1), cheap_knn(backbone, data, k)])
    return {"steps": step, "train_seconds": round(seconds, 1), "images_per_second": round(step * BATCH / seconds, 1),
            "budget_fixed_by": budget.how, "refits": budget.refits, "curve": curve}


# ----------------------------------------------------------------------------- rayssl's harness
class LightlyLossStepper(Stepper):
    """rayssl's Stepper with lightly's ``DINOLoss`` as the loss (its own centre, updated in each
    forward); the objective (mode ``center``) only serves ``diagnostics``, its centre copied from
    lightly's before each call."""

    def __init__(self, *args, loss, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss = loss

    def micro_batch(self, views, step, last):
        tau_t = float(self.schedules["teacher_temperature"][step])
        if not self.step_losses:
            for saved, buffer in zip(self.saved_buffers, self.buffers):
                saved.copy_(buffer)
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with self.autocast:
            with torch.no_grad():
                teacher_out = self.teacher(views[:2])
            student_out = self.student(views)
        loss = self.loss(list(at_least_fp32(teacher_out)), list(at_least_fp32(student_out)), teacher_temp=tau_t)
        (loss / self.accumulate).backward()
        self.last_outputs = (student_out.detach(), teacher_out, tau_t)
        self.step_losses.append(loss.detach())
        return loss.detach()

    def diagnostics(self):
        self.objective.center.copy_(self.loss.center.flatten())
        return super().diagnostics()


def run_harness(arm: str, cfg, data: Data, budget_s: float, k: int, steps: int | None = None,
                fp64: bool = False) -> tuple[dict, torch.nn.Module]:
    """levers.py's training for a time budget (or exactly ``steps``): one process, the global batch in one step;
    ``fp64``: networks, objective state, crops and loss in float64 (no autocast)."""
    spe = TRAIN // BATCH  # steps per epoch of the 50k, also under --limit
    dtype = torch.float64 if fp64 else torch.float32
    student = build_encoder(cfg.model, data.channels, data.size, cfg.objective.num_clusters)
    student = student.to(dtype=dtype, memory_format=torch.channels_last)
    teacher = make_teacher(student)
    obj = cfg.objective
    spec = obj.model_copy(update={"mode": "center"}) if arm.startswith("lightly") else obj
    build = lambda total, hold: build_schedules(cfg, spe, BATCH, total, hold)  # noqa: E731
    budget = Steps(steps, build) if steps else Budget(
        budget_s, max(round(cfg.optim.warmup_epochs * spe), round(obj.teacher_temperature_warmup_epochs * spe)),
        round(cfg.train.epochs * spe), build)
    bf16 = not fp64 and use_bf16(cfg.train.precision, torch.device("cpu"))
    args = (student, teacher, ClusterObjective(spec).to(dtype), build_optimizer(student, cfg.optim), budget.schedules, cfg, spe,
            torch.device("cpu"), bf16)
    if arm.startswith("lightly"):
        from lightly.loss import DINOLoss

        loss = DINOLoss(obj.num_clusters, warmup_teacher_temp=obj.teacher_temperature_warmup,
                        teacher_temp=obj.teacher_temperature, warmup_teacher_temp_epochs=0,
                        student_temp=obj.student_temperature, center_momentum=obj.center_momentum).to(dtype)
        stepper = LightlyLossStepper(*args, loss=loss)
    else:
        stepper = Stepper(*args)
    crops = MultiCrop(cfg.augment, data.channels, data.mean, data.std)

    def step_fn(step: int) -> None:  # under fp64 also float64 by default (lightly's tensor(teacher_temp), crops)
        torch.set_default_dtype(dtype)
        idx = torch.randint(0, len(data.train), (BATCH,))
        student.train(), teacher.train()
        stepper.schedules = budget.schedules
        stepper.micro_batch([v.to(dtype) for v in crops(data.train[idx])], step, True)
        stepper.finish(step)
        torch.set_default_dtype(torch.float32)  # the curve's evaluations as every arm's

    out = train_loop(budget, step_fn, teacher.backbone, data, k)
    diag = stepper.diagnostics()
    out.update({"precision": "bf16" if bf16 else "fp64" if fp64 else "fp32", "I(X;K)": round(diag["norm/mutual_information"], 4),
                "effective_clusters": round(diag["norm/effective_clusters"], 2)})
    return out, teacher.backbone.float()  # scored in float32 as every arm


# ----------------------------------------------------------------------------- lightly as its users write it
class Images(torch.utils.data.Dataset):
    """PIL images of a uint8 (N, C, H, W) tensor through ``transform`` (lightly's input)."""

    def __init__(self, images: torch.Tensor, transform) -> None:
        self.images, self.transform = images.permute(0, 2, 3, 1).squeeze(-1).numpy(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i]))


def lightly_transform(data: Data, knobs: dict, local_size: int):
    """``DINOTransform`` for the dataset (module docstring). lightly 1.6 does not pass ``cj_strength``
    to the second global view (it keeps 0.5), so the strength is set through the four jitter
    factors at lightly's default ``cj_strength`` 0.5: at 0.5 (the example) these are its defaults."""
    from lightly.transforms import DINOTransform

    gray = {"gaussian_blur": (0.0, 0.0, 0.0), "solarization_prob": 0.0, "random_gray_scale": 0.0} if data.channels == 1 else {}
    s = knobs["cj_strength"] / 0.5
    jitter = {"cj_bright": 0.8 * s, "cj_contrast": 0.8 * s, "cj_sat": 0.4 * s, "cj_hue": 0.2 * s}
    return DINOTransform(global_crop_size=data.size, local_crop_size=local_size, n_local_views=knobs["local_views"],
                         normalize={"mean": list(data.mean), "std": list(data.std)}, **jitter, **gray)


def run_lightly(knobs: dict, cfg, data: Data, budget_s: float, k: int, loader_workers: int
                ) -> tuple[dict, torch.nn.Module]:
    """lightly's DINO example (examples/pytorch/dino.py) with ``knobs`` (``TUNED``), for a time budget."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from rayssl.models import build_backbone

    backbone, dim = build_backbone("convnet4", data.channels, data.size, False, cfg.model.width)
    head = lambda **kw: DINOProjectionHead(dim, 512, 64, knobs["output_dim"], batch_norm=knobs["batch_norm"], **kw)  # noqa: E731
    student_head, teacher_head = head(freeze_last_layer=1), head()  # the example's own heads: not copies
    teacher_backbone = copy.deepcopy(backbone)
    deactivate_requires_grad(teacher_backbone), deactivate_requires_grad(teacher_head)
    nets = torch.nn.ModuleList([backbone, student_head, teacher_backbone, teacher_head])
    if knobs["channels_last"]:
        nets.to(memory_format=torch.channels_last)
    opt_cls = torch.optim.AdamW if knobs["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = opt_cls(nets.parameters(), lr=knobs["lr"], weight_decay=knobs["weight_decay"])
    criterion = DINOLoss(output_dim=knobs["output_dim"], warmup_teacher_temp_epochs=5)
    loader = torch.utils.data.DataLoader(Images(data.train, lightly_transform(data, knobs, cfg.augment.local_crop_size)),
                                         batch_size=BATCH, shuffle=True, drop_last=len(data.train) >= BATCH,
                                         num_workers=loader_workers, persistent_workers=loader_workers > 0)
    spe, start = len(loader), knobs["momentum"]

    def momentum(total: int, hold: int) -> dict:  # lightly's cosine over the steps after the hold
        return {"momentum": np.array([start if s < hold else cosine_schedule(s - hold, total - hold, start, 1.0)
                                      for s in range(total)])}

    budget = Budget(budget_s, 0, round(cfg.train.epochs * TRAIN // BATCH), momentum)
    batches = iter(())

    def step_fn(step: int) -> None:
        nonlocal batches
        views = next(batches, None)
        if views is None:
            batches = iter(loader)
            views = next(batches)
        if knobs["channels_last"]:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        epoch = step // spe
        m = float(budget.schedules["momentum"][step])
        update_momentum(backbone, teacher_backbone, m=m)
        update_momentum(student_head, teacher_head, m=m)
        nets.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=knobs["bf16"]):
            teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
            student_out = [student_head(backbone(v)) for v in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        student_head.cancel_last_layer_gradients(current_epoch=epoch)
        optimizer.step()
        optimizer.zero_grad()

    out = train_loop(budget, step_fn, teacher_backbone, data, k)
    out.update({"precision": "bf16" if knobs["bf16"] else "fp32", "loader_workers": loader_workers, **loader_peak_rss_mb(loader)})
    return out, teacher_backbone


# ----------------------------------------------------------------------------- the job itself
def run_job(args, data: Data, seed: int) -> tuple[dict, torch.nn.Module, EvalPreprocess]:
    """``jobs/pretrain.py`` on Ray for the budget; its final checkpoint's teacher, scored here."""
    from rayssl.eval.backbone import read_checkpoint, teacher_from_state

    with tempfile.TemporaryDirectory(prefix="peers-job-") as tmp:
        name = f"peers-{args.dataset}-s{seed}"
        cmd = [sys.executable, str(ROOT / "jobs/pretrain.py"), "--config", str(CONFIGS[args.dataset]),
               f"data.train_limit={len(data.train)}", f"train.time_budget={parse_duration(args.budget):g}s",
               "train.time_budget_scope=training", f"train.seed={seed}", f"run.name={name}",
               f"run.storage_path={tmp}", "tracking.enabled=false", "eval.baselines=false"]
        started = time.time()
        subprocess.run(cmd, check=True)
        state = read_checkpoint(f"{tmp}/{name}")
    teacher, job_cfg, meta = teacher_from_state(state)
    plan = state.get("budget") or {}
    out = {"steps": state["step"], "images_per_second": plan.get("images_per_second"),
           "job_seconds": round(time.time() - started, 1), "precision": job_cfg.train.precision,
           "note": "train_seconds is the budget; job_seconds includes Ray start-up and the job's own test-split k-NN"}
    out["train_seconds"] = parse_duration(args.budget)
    prep = EvalPreprocess(data.size, data.channels, meta.mean, meta.std)
    return out, teacher.backbone.to(memory_format=torch.channels_last), prep


# ----------------------------------------------------------------------------- one arm, one process
def loader_peak_rss_mb(loader) -> dict:
    """The DataLoader workers' peak RSS (VmHWM, summed), read while they live (persistent workers)."""
    pids = [w.pid for w in getattr(getattr(loader, "_iterator", None), "_workers", [])]
    kb = sum(int(line.split()[1]) for pid in pids for line in Path(f"/proc/{pid}/status").read_text().splitlines()
             if line.startswith("VmHWM:"))
    return {"loader_peak_rss_mb": round(kb / 1024, 1)} if pids else {}


def run_one(args, arm: str, seed: int) -> dict:
    """Train and score one arm (or ``baselines``) in this process."""
    torch.set_num_threads(args.threads)
    mode = [f"objective.mode={arm.removeprefix('rayssl_')}"] if arm.removeprefix("rayssl_") in MODES else []
    cfg = load_config(str(CONFIGS[args.dataset]), [f"train.seed={seed}", f"train.precision={args.precision.replace('fp64', 'fp32')}",
                                                   *mode, *args.set])
    data = Data(args.dataset, args.split, args.data_dir or cfg.data.fashion_mnist_dir, args.limit)
    k, budget_s = cfg.eval.knn_k, parse_duration(args.budget)
    if arm == "baselines":
        return baselines(data, cfg, k)
    torch.manual_seed(seed)
    prep = None
    if arm == "rayssl_default":
        out, backbone, prep = run_job(args, data, seed)
    elif arm.startswith("lightly_dino"):
        knobs = {**TUNED, **(tuned_knobs(args.tuned) if arm == "lightly_dino_tuned" else {})}
        out, backbone = run_lightly(knobs, cfg, data, budget_s, k, args.loader_workers)
        out["knobs"] = knobs
    else:
        out, backbone = run_harness(arm, cfg, data, budget_s, k, args.steps, args.precision == "fp64")
    out["threads"] = args.threads  # the order of float sums: with --steps, a seed's arms pair only at one count
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # before the final evaluation
    out.update(evaluate(backbone, data, k, prep))
    return out


def tuned_knobs(items: list[str]) -> dict:
    """``KEY=VALUE`` (YAML values) of ``TUNED``'s keys."""
    knobs = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in TUNED or not value:
            raise SystemExit(f"--tuned {item}: expected KEY=VALUE with KEY one of {', '.join(TUNED)}")
        knobs[key] = yaml.safe_load(value)
    return knobs


# ----------------------------------------------------------------------------- driver
def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return {"model": name, "avx512_bf16": "avx512_bf16" in info.split(), "cores": os.cpu_count()}


RENAMED = {"lightly_dino_example": "lightly_dino", "lightly_loss_in_rayssl_harness": "lightly_loss_in_rayssl",
           "rayssl_default_job": "rayssl_default"}  # the arms' names before 2026-12-06


SETTINGS = ("dataset", "split", "budget", "limit", "steps", "precision", "set")  # one --out, one setting of each
BEFORE = {"precision": "auto", "set": []}  # what the JSONs written before a setting existed ran with


def setting(results: dict, key: str):
    return results.get(key, BEFORE.get(key))


def other_settings(path: Path, written: dict, wanted: dict) -> str | None:
    """One line naming the file and the key when the JSON at ``path`` ran with other settings."""
    key = next((key for key in SETTINGS if setting(written, key) != wanted[key]), None)
    return key and f"{path}: {key} is {setting(written, key)!r}, not {wanted[key]!r}; use another --out"


def load_results(args) -> dict:
    """The JSON at ``--out`` (checked against this run's ``SETTINGS``), or a
    new one. ``runs`` holds every arm x seed as it ran; ``arms`` is their summary, rebuilt at each save."""
    path = Path(args.out)
    if not path.exists():
        return {"dataset": args.dataset, "split": args.split, "budget": args.budget, "steps": args.steps,
                "precision": args.precision, "set": args.set,
                "budget_s": parse_duration(args.budget), "limit": args.limit, "cpu": cpu(), "baselines": None,
                "runs": {}, "arms": []}
    results = read(path)
    if stop := other_settings(path, results, vars(args)):
        raise SystemExit(stop)
    return results


def read(path: Path) -> dict:
    """A results JSON, in today's layout (the first one kept ``arms`` -> seed -> run, by old names),
    its ``arms`` summarised afresh from its runs."""
    results = json.loads(path.read_text())
    if isinstance(results["arms"], dict):
        results["runs"] = {RENAMED.get(arm, arm): seeds for arm, seeds in results.pop("arms").items()}
        results["budget_s"] = parse_duration(results["budget"])
    results["arms"] = [summary(arm, seeds) for arm, seeds in results["runs"].items() if seeds]
    return results


def summary(arm: str, seeds: dict) -> dict:
    """One arm over its seeds: per-seed k-NN, mean and sample sd (None for one seed), linear probe
    mean, img/s, training wall seconds, peak RSS (the process and its DataLoader workers), and the
    harness arms' I(X;K) and effective clusters at the end (means; None for the other arms)."""
    runs = [seeds[s] for s in sorted(seeds, key=int)]
    knn = [r["knn"] for r in runs]

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(float(np.mean(values)), 4) if values else None
    return {"name": arm, "seeds": [int(s) for s in sorted(seeds, key=int)], "knn": knn,
            "knn_mean": round(float(np.mean(knn)), 4), "knn_sd": round(float(np.std(knn, ddof=1)), 4) if len(knn) > 1 else None,
            "linear_mean": mean("linear"), "img_s": mean("images_per_second"), "wall_s": mean("train_seconds"),
            "steps": mean("steps"), "peak_rss_mb": max(r.get("peak_rss_mb", 0) + r.get("loader_peak_rss_mb", 0) for r in runs),
            "mutual_information": mean("I(X;K)"), "effective_clusters": mean("effective_clusters")}


def save(results: dict, path: str) -> None:
    """Write ``results`` to ``path``, first merging in what another invocation with the same ``--out``
    wrote since this one read it (its arms x seeds and baselines), under a lock on the folder: arms
    run side by side (``--threads 1`` each, one process per core) add to one JSON, not over each other.
    Two invocations that created ``path`` at once with other settings stop here, not merge: the
    second writes its runs beside ``path`` (``<stem>-<pid>.json``) and names it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(Path(path).parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if Path(path).exists():
            written = read(Path(path))
            if stop := other_settings(Path(path), written, {key: setting(results, key) for key in SETTINGS}):
                kept = Path(path).with_name(f"{Path(path).stem}-{os.getpid()}.json")  # this invocation's runs, not lost
                save_json(results, kept)
                raise SystemExit(f"{stop}; this invocation's runs are in {kept}")
            for arm, seeds in written["runs"].items():
                for seed, run in seeds.items():
                    results["runs"].setdefault(arm, {}).setdefault(seed, run)
            results["baselines"] = results["baselines"] or written["baselines"]
        results["arms"] = [summary(arm, seeds) for arm, seeds in results["runs"].items() if seeds]
        save_json(results, path)
    finally:
        os.close(folder)


def save_json(results: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def launch(args, arm: str, seed: int) -> dict:
    """``run_one`` in a fresh process (``--one``), or in this one with ``--inline``; its result."""
    if args.inline:
        return run_one(args, arm, seed)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--one", arm, str(seed), "--result", f.name, "--dataset", args.dataset,
               "--budget", args.budget, *(["--steps", str(args.steps)] if args.steps else []),
               "--split", args.split, "--threads", str(args.threads), "--precision", args.precision,
               "--loader-workers", str(args.loader_workers), *(["--limit", str(args.limit)] if args.limit else []),
               *(["--data-dir", args.data_dir] if args.data_dir else []), *(["--tuned", *args.tuned] if args.tuned else []),
               *(["--set", *args.set] if args.set else [])]
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


def tune(args) -> dict:
    """``TUNE_STEPS`` for ``lightly_dino_tuned`` (seed 0, ``--split val``), every probe written to
    ``peers-<dataset>-tuning.json`` as it ends (a rerun resumes); the start is the example's knobs,
    scored by the ``lightly_dino`` seed-0 run of ``--out`` when there is one (the same code)."""
    path = Path(args.out).with_name(f"peers-{args.dataset}-tuning.json")
    log = json.loads(path.read_text()) if path.exists() else {
        "dataset": args.dataset, "split": args.split, "budget": args.budget, "seed": 0, "probes": []}
    if (log["split"], log["budget"]) != (args.split, args.budget):
        raise SystemExit(f"{path}: split {log['split']}, budget {log['budget']}; use the same or remove it")
    main = read(Path(args.out)) if Path(args.out).exists() else {"runs": {}}
    example = main["runs"].get("lightly_dino", {}).get("0")

    def probe(label: str, knobs: dict) -> dict:
        done = next((p for p in log["probes"] if {**TUNED, **p["knobs"]} == knobs), None)
        if done is None:
            if label == "the example" and example is not None:
                run = {**example, "from": Path(args.out).name}
            else:
                print(f"[peers] tuning: {label}", flush=True)
                run = launch(argparse.Namespace(**{**vars(args), "tuned": [f"{k}={json.dumps(v)}" for k, v in knobs.items()]}),
                             "lightly_dino_tuned", 0)
            done = {"name": label, "knobs": knobs, "knn": run["knn"], "linear": run["linear"], "steps": run["steps"],
                    "img_s": run["images_per_second"], **({"from": run["from"]} if "from" in run else {})}
            log["probes"].append(done)
            save_json(log, path)
        return done

    knobs = dict(TUNED)
    best = probe("the example", knobs)["knn"]
    for label, change in TUNE_STEPS[:args.tune_steps]:
        found = probe(label, {**knobs, **change})
        found["kept"] = found["knn"] > best
        if found["kept"]:
            knobs, best = {**TUNED, **found["knobs"]}, found["knn"]
    log["best"], log["best_knn"] = knobs, best
    save_json(log, path)
    print(f"[peers] tuned: {' '.join(f'{k}={json.dumps(v)}' for k, v in knobs.items() if TUNED[k] != v)} "
          f"(k-NN {100 * best:.1f} %, val)", flush=True)
    return log


def drive(args) -> dict:
    results = load_results(args)
    if results["baselines"] is None:
        print("[peers] baselines: raw pixels, random init", flush=True)
        results["baselines"] = launch(args, "baselines", 0)
        save(results, args.out)
    knobs = {**TUNED, **tuned_knobs(args.tuned)}
    if args.tuned and "lightly_dino_tuned" in args.arms:
        results.pop("untuned", None)
    for arm in args.arms:
        if arm == "lightly_dino_tuned" and not args.tuned:
            results.setdefault("untuned", "lightly_dino_tuned: no --tuned knobs given, so no tuning yet; not run")
            print(f"[peers] {results['untuned']}", flush=True)
            continue
        done = results["runs"].setdefault(arm, {})
        for seed in args.seeds:
            if str(seed) in done:
                if arm == "lightly_dino_tuned" and done[str(seed)]["knobs"] != knobs:
                    raise SystemExit(f"{args.out}: lightly_dino_tuned seed {seed} ran with other knobs "
                                     f"({done[str(seed)]['knobs']}); use another --out")
                print(f"[peers] {arm} seed {seed}: done, skipped", flush=True)
                continue
            print(f"[peers] {arm} seed {seed}: {training(results)}{overrides(results)}", flush=True)
            done[str(seed)] = launch(args, arm, seed)
            save(results, args.out)
    return results


# ----------------------------------------------------------------------------- table and plot
def _pct(mean: float | None, sd: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if sd is not None else f"{100 * mean:.1f}"


def training(results: dict) -> str:
    """What each arm got: the budget's training time, or ``--steps``."""
    return f"{results['steps']} steps" if results.get("steps") else f"{results['budget']} of training"


def overrides(results: dict) -> str:
    """`` (key=value, ...)``: the harness arms' ``--set``; empty without."""
    return f" ({', '.join(got)})" if (got := setting(results, "set")) else ""


def per_arm(results: dict) -> str:
    return f"{training(results)} per arm{overrides(results)}"


def table(results: dict) -> str:
    """Markdown: arm, seeds, k-NN and linear probe (mean ± sd over seeds, %), steps, img/s, wall."""
    lines = [f"{results['dataset']}, {results['split']} split, {per_arm(results)}, "
             f"{results['cpu']['model']} (avx512_bf16: {results['cpu']['avx512_bf16']})", "",
             "| arm | seeds | k-NN % | linear % | steps | img/s | training wall s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in (results.get("baselines") or {}).items():
        lines.append(f"| {name} | - | {_pct(row['knn'])} | {_pct(row['linear'])} | - | - | - | - |")
    for a in results["arms"]:
        lines.append(f"| {a['name']} | {len(a['seeds'])} | {_pct(a['knn_mean'], a['knn_sd'])} | "
                     f"{_pct(a['linear_mean'])} | {a['steps'] or 0:.0f} | {a['img_s'] or 0:.0f} | "
                     f"{a['wall_s'] or 0:.0f} | {a['peak_rss_mb']:.0f} |")
    if "untuned" in results:
        lines += ["", results["untuned"]]
    return "\n".join(lines)


def modes_table(results: dict) -> str:
    """Markdown: the harness arms of ``objective.mode`` (and lightly's ``DINOLoss``, ``center``'s
    control): k-NN (mean ± sd), linear probe, I(X;K) in nats and effective clusters (of
    ``objective.num_clusters``) at the end, means over seeds. Empty when no such arm ran."""
    arms = {a["name"]: a for a in results["arms"]}
    names = [n for n in (*(f"rayssl_{m}" for m in MODES), "lightly_loss_in_rayssl") if n in arms]
    if not names:
        return ""
    lines = [f"{results['dataset']}, {results['split']} split, {per_arm(results)}", "",
             "| arm | seeds | k-NN % | linear % | I(X;K) nats | effective clusters |", "|---|---|---|---|---|---|"]
    for a in (arms[n] for n in names):
        info = "-" if a.get("mutual_information") is None else f"{a['mutual_information']:.2f}"
        eff = "-" if a.get("effective_clusters") is None else f"{a['effective_clusters']:.0f}"
        lines.append(f"| {a['name']} | {len(a['seeds'])} | {_pct(a['knn_mean'], a['knn_sd'])} | "
                     f"{_pct(a['linear_mean'])} | {info} | {eff} |")
    return "\n".join(lines + paired(results, "rayssl_center", "lightly_loss_in_rayssl"))


def paired(results: dict, a: str, b: str) -> list[str]:
    """``a`` minus ``b``, k-NN points seed by seed over the seeds both ran, and their mean; from two
    pairs on also their sd and the mean's 95 % interval (Student's t over the pairs). A line of
    markdown; none without a common seed."""
    runs = results["runs"]
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})), key=int)
    if not seeds:
        return []
    diffs = [100 * (runs[a][s]["knn"] - runs[b][s]["knn"]) for s in seeds]
    said = ", ".join(f"{d:+.1f} (seed {s})" for s, d in zip(seeds, diffs))
    line = f"{a} - {b}, k-NN points, same seed: {said}; mean {np.mean(diffs):+.2f}"
    if len(diffs) > 1:
        ci = scipy.stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        line += f" (sd {np.std(diffs, ddof=1):.2f} over {len(diffs)} pairs; 95 % interval {ci.low:+.2f} to {ci.high:+.2f})"
    return ["", line]


def lines(results: dict) -> list[dict]:
    """The plot's lines: per arm the mean over its seeds, point by point, over training seconds; for
    ``--steps`` (the objective's control, compared seed by seed) one line per arm and seed over steps,
    a seed's colour and an arm's line style, so that each seed's pair is seen together. Each line:
    ``label``, ``x``, ``y`` (k-NN %), ``color``, ``style``."""
    out, styles = [], itertools.cycle(("-", "--", ":", "-."))
    steps = results.get("steps")
    at = steps and [math.ceil(f * steps) for f in CURVE_AT] + [steps]  # train_loop's points: the first step past each
    for arm, seeds in results["runs"].items():
        style = next(styles)
        done = {s: r["curve"] for s, r in sorted(seeds.items(), key=lambda kv: int(kv[0])) if r.get("curve")}
        if steps:
            out += [{"label": f"{arm} seed {s}", "x": at[:len(c)], "y": [100 * p[1] for p in c],
                     "color": f"C{int(s) % 10}", "style": style} for s, c in done.items()]
        elif done:
            n = min(len(c) for c in done.values())
            pts = np.array([c[:n] for c in done.values()]).mean(axis=0)
            out.append({"label": f"{arm} (seeds {', '.join(done)})", "x": list(pts[:, 0]), "y": list(100 * pts[:, 1]),
                        "color": None, "style": style})
    return out


def plot(results: dict, path: str) -> None:
    """The cheap k-NN over training (``lines``) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line in lines(results):
        ax.plot(line["x"], line["y"], marker="o", color=line["color"], linestyle=line["style"], label=line["label"])
    ax.set(xlabel="step" if results.get("steps") else "training seconds",
           ylabel="teacher k-NN % (running BN, 10k bank)",
           title=f"{results['dataset']}: {training(results)} per arm, {results['split']} split"
           + "".join(f"\n{o}" for o in setting(results, "set")))
    ax.grid(alpha=0.3), ax.legend(fontsize=7, ncol=2 if results.get("steps") else 1)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="tuning: --tuned takes lr (Adam's 0.001 first; 2-4x for short budgets), "
                                       "optimizer adam|adamw with weight_decay (0.04 as rayssl), momentum (teacher "
                                       "EMA start: 0.95-0.99 for runs of a few epochs), output_dim (prototypes; "
                                       "rayssl uses 256), batch_norm (true: BatchNorm in the head, the convnet "
                                       "recipe), cj_strength (lightly's 0.5; x0.8 brightness/contrast), "
                                       "local_views (each costs time: fewer steps in the budget), channels_last, bf16 "
                                       "(autocast: on CPUs with native bf16, ~1.4x the steps of fp32 channels-last).")
    p.add_argument("--dataset", choices=sorted(CONFIGS), default="fashion-mnist")
    p.add_argument("--budget", default="6m", help="training time per arm (6m, 90s): every arm gets the same")
    p.add_argument("--steps", type=int, help="the harness arms train exactly this many steps, not for --budget "
                   "(the objective's control: lightly_loss_in_rayssl beside rayssl_center, seed by seed; "
                   "write it to its own --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:-1]),
                   help="default: all but rayssl_default (Ray; name it to run it)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val: the last 10k train images are the queries; test: final figures only, once")
    p.add_argument("--out", help="results JSON (default docs/benchmarks/peers-<dataset>.json; a PNG beside it)")
    p.add_argument("--tuned", nargs="*", default=[], metavar="KEY=VALUE", help="lightly_dino_tuned's knobs (below)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per arm (1 for arms side by side: one invocation per core, the same --out)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32", "fp64"), default="auto",
                   help="the harness arms' train.precision (auto: bf16 on CPUs with native bf16); fp64 trains "
                        "in float64 (slow). With --steps, fp32 and fp64 show how far two arms' results move "
                        "with float rounding alone")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides for every harness arm alike (objective.teacher_temperature=0.03): "
                        "the same harness with a knob changed; write it to its own --out")
    p.add_argument("--loader-workers", type=int, default=1,
                   help="DataLoader workers of the lightly arms (1: its PIL crops overlap the step)")
    p.add_argument("--limit", type=int, help="train and query on the first N images only (tests; "
                                             "schedules keep the 50k's epoch length)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX files (default: the config's data.fashion_mnist_dir)")
    p.add_argument("--inline", action="store_true",
                   help="run the arms in this process (tests: no start-up per arm; peak RSS is then cumulative)")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    p.add_argument("--tune", action="store_true",
                   help="tune lightly_dino_tuned on the validation split (TUNE_STEPS, greedy; resumes) "
                        "and print its --tuned knobs")
    p.add_argument("--tune-steps", type=int, default=len(TUNE_STEPS), help="walk the first N steps only (tests)")
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        Path(args.result).write_text(json.dumps(run_one(args, args.one[0], int(args.one[1]))))
        return
    args.out = args.out or str(ROOT / f"docs/benchmarks/peers-{args.dataset}.json")
    if args.table:
        results = read(Path(args.out))
        print("\n\n".join(t for t in (table(results), modes_table(results)) if t))
        return
    parse_duration(args.budget)
    tuned_knobs(args.tuned)
    harness = {"lightly_loss_in_rayssl", *(f"rayssl_{m}" for m in MODES)}
    if args.steps and not set(args.arms) <= harness:
        p.error("--steps: only the harness arms (lightly_loss_in_rayssl, rayssl_<mode>) train a fixed step count")
    if args.precision != "auto" and not set(args.arms) <= harness:
        p.error("--precision: only the harness arms (lightly_loss_in_rayssl, rayssl_<mode>) take it; "
                "lightly's own arms take --tuned bf16=..., the job its config")
    if args.set and not set(args.arms) <= harness:
        p.error("--set: only the harness arms (lightly_loss_in_rayssl, rayssl_<mode>) read rayssl's config")
    if fixed := {o.split("=", 1)[0] for o in args.set} & {"objective.mode", "train.seed", "train.precision"}:
        p.error(f"--set: {', '.join(sorted(fixed))} is set by --arms, --seeds or --precision")
    try:
        load_config(str(CONFIGS[args.dataset]), args.set)
    except ConfigError as e:
        p.error(f"--set: {e}")
    if args.tune:
        if args.split != "val":
            raise SystemExit("--tune reads the validation split only (--split val)")
        tune(args)
        return
    results = drive(args)
    plot(results, str(Path(args.out).with_suffix(".png")))
    print("\n\n".join(t for t in (table(results), modes_table(results)) if t))


if __name__ == "__main__":
    main()
