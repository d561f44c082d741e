"""Reference test: ``objective.mode=center`` is DINO's loss and centre update (docs/theory.md §4, §7.15).

The reference below is written from the DINO paper (Caron et al., 2021, "Emerging Properties
in Self-Supervised Vision Transformers"): Algorithm 1 and the multi-crop loss of its Eq. (3).
For teacher logits t (the two global crops) and student logits s (every crop), with centre C:

    P_t(x) = softmax((t(x) - C) / tau_t)            centre and sharpen, no gradient
    P_s(x) = softmax(s(x) / tau_s)
    H(a, b) = mean over the batch of -sum_k a_k log b_k
    L = mean over pairs (x teacher global crop, x' student crop, x' != x) of H(P_t(x), P_s(x'))
    C <- m C + (1 - m) * mean over the batch and both global crops of t       after the loss

Where the paper leaves a choice open, the reference takes the choice of the published
DINOLoss, and rayssl's ``ClusterObjective`` must agree with it to 1e-6 (absolute plus 1e-6
relative: rayssl computes in float32, whose rounding at a loss near 10 is already ~1e-6; the
reference is float64):

- Normalisation over pairs. Eq. (3) writes a *sum* over the pairs; Algorithm 1 (two crops)
  weighs its two pairs 1/2 each, and the published code divides by the number of pairs. The
  reference averages over the P = 2 * Vs - 2 pairs, as rayssl does (docs/theory.md §1); the
  sum of Eq. (3) is P times this.
- Crop layout. DINO concatenates crops along the batch axis, (Vs * B, K) with the global crops
  first; rayssl takes (Vs, B, K) with the global crops first. The reference works on DINO's
  layout, fed ``x.flatten(0, 1)``.
- When the centre moves. The loss of a step uses the centre *before* that step's update (C
  starts at zero, so the first step is the raw softmax). DINO updates C inside the loss call;
  rayssl folds the batch mean in at ``update_state``, once per optimizer step (``Stepper.finish``),
  so that gradient accumulation sees one centre per step. Without accumulation the sequences
  of losses and centres are the same.
- The batch mean of the centre is over the global batch. DINO divides the all-reduced sum by
  (local batch x world size); rayssl all-reduces the count, the same for equal batches and in a
  single process (docs/theory.md §3.4, §7.8); this test runs in one process.

No Ray and no process group; a few seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from rayssl.config import ObjectiveConfig, load_config
from rayssl.models import build_encoder, make_teacher
from rayssl.objective import ClusterObjective
from rayssl.schedules import build_schedules
from rayssl.train.step import Stepper, build_optimizer

TOL = dict(atol=1e-6, rtol=1e-6)  # worst seen: 2.2e-6 on a loss of 12.6 (bound 1.4e-5); centres 3e-8


class DinoReference:
    """DINO's loss with its centre, from the paper's equations, in float64 on DINO's layout."""

    def __init__(self, num_clusters: int, student_temperature: float, center_momentum: float,
                 mean_over_pairs: bool = True):
        self.tau_s, self.m = student_temperature, center_momentum
        self.mean_over_pairs = mean_over_pairs
        self.center = torch.zeros(1, num_clusters, dtype=torch.float64)

    def teacher_probs(self, teacher: torch.Tensor, tau_t: float) -> list[torch.Tensor]:
        """P_t of each global crop: softmax((t - C) / tau_t), one (B, K) block per crop."""
        return list(torch.softmax((teacher.double() - self.center) / tau_t, dim=1).chunk(2))

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, tau_t: float, num_crops: int) -> torch.Tensor:
        """L for student (num_crops * B, K) and teacher (2 * B, K); then the centre update."""
        targets = self.teacher_probs(teacher, tau_t)
        log_ps = torch.log_softmax(student.double() / self.tau_s, dim=1).chunk(num_crops)
        terms = [(-(p_t * log_ps[v]).sum(dim=1)).mean()
                 for g, p_t in enumerate(targets) for v in range(num_crops) if v != g]
        total = torch.stack(terms).sum()
        self.center = self.m * self.center + (1 - self.m) * teacher.double().mean(dim=0, keepdim=True)
        return total / len(terms) if self.mean_over_pairs else total


def logits(seed: int, views: int, batch: int, k: int, scale: float) -> torch.Tensor:
    """Float32 logits (views, B, K) with a per-cluster offset of the same scale, so that the
    centre matters (cosine-like magnitudes: the losses stay near log K, as in training)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, 1, k, generator=g) * scale
    return (torch.randn(views, batch, k, generator=g) * scale + offset).float()


def run_both(spec: ObjectiveConfig, ref: DinoReference, steps: int, num_crops: int, batch: int, tau_t: float,
             dtype: torch.dtype = torch.float32):
    """Losses and centres of rayssl and of the reference over ``steps`` steps on the same logits
    (in ``dtype``: rayssl's objective, its state and the logits)."""
    obj = ClusterObjective(spec).to(dtype)
    out = []
    for step in range(steps):
        teacher = logits(100 + step, 2, batch, spec.num_clusters, scale=0.1).to(dtype)
        student = logits(200 + step, num_crops, batch, spec.num_clusters, scale=0.3).to(dtype)
        loss, targets = obj(student, teacher, tau_t)             # the loss, with the step's centre ...
        obj.update_state([targets.stat])                         # ... then the EMA, as Stepper.finish
        expected = ref.loss(student.flatten(0, 1), teacher.flatten(0, 1), tau_t, num_crops)
        out.append((loss.double(), expected, obj.center.double().clone(), ref.center[0].clone()))
    return out


@pytest.mark.parametrize("num_crops", [2, 4, 8])
@pytest.mark.parametrize("center_momentum", [0.9, 0.5, 0.0])
def test_center_mode_equals_dino_loss_and_center(num_crops, center_momentum):
    k, batch, tau_s, tau_t = 64, 16, 0.1, 0.04
    spec = ObjectiveConfig(mode="center", num_clusters=k, student_temperature=tau_s,
                           center_momentum=center_momentum)
    ref = DinoReference(k, tau_s, center_momentum)
    for step, (loss, expected, center, ref_center) in enumerate(run_both(spec, ref, 4, num_crops, batch, tau_t)):
        torch.testing.assert_close(loss, expected, **TOL, msg=lambda m: f"step {step} loss: {m}")
        torch.testing.assert_close(center, ref_center, **TOL, msg=lambda m: f"step {step} centre: {m}")


def test_center_mode_targets_equal_dino_teacher_probabilities():
    """The targets themselves: softmax((t - C) / tau_t) with the centre of the previous steps."""
    k, batch, tau_t = 32, 8, 0.07
    obj = ClusterObjective(ObjectiveConfig(mode="center", num_clusters=k, center_momentum=0.9))
    ref = DinoReference(k, 0.1, 0.9)
    for step in range(3):
        teacher = logits(300 + step, 2, batch, k, scale=0.1)
        got = obj.targets(teacher, tau_t)
        obj.update_state([got.stat])
        expected = torch.stack(ref.teacher_probs(teacher.flatten(0, 1), tau_t))
        ref.loss(logits(400 + step, 2, batch, k, 0.3).flatten(0, 1), teacher.flatten(0, 1), tau_t, 2)
        torch.testing.assert_close(got.qt.double(), expected, **TOL)


def test_the_comparison_can_fail():
    """The same comparison with a perturbed centre momentum, or the sum of Eq. (3) instead of the
    mean over pairs, is far outside the tolerance: the test above is not vacuous."""
    k, batch, tau_s, tau_t, crops = 64, 16, 0.1, 0.04, 4
    spec = ObjectiveConfig(mode="center", num_clusters=k, student_temperature=tau_s, center_momentum=0.9)
    runs = {
        "momentum 0.8": run_both(spec, DinoReference(k, tau_s, 0.8), 3, crops, batch, tau_t),
        "sum over pairs": run_both(spec, DinoReference(k, tau_s, 0.9, mean_over_pairs=False), 3, crops, batch, tau_t),
        "rayssl momentum 0.8": run_both(spec.model_copy(update={"center_momentum": 0.8}),
                                        DinoReference(k, tau_s, 0.9), 3, crops, batch, tau_t),
    }
    for name, steps in runs.items():
        worst = max(max(float((loss - expected).abs()), float((center - ref_center).abs().max()))
                    for loss, expected, center, ref_center in steps)
        assert worst > 1e-3, (name, worst)


def tiny_stepper(*overrides: str) -> Stepper:
    cfg = load_config(None, ["model.width=4", "model.head_hidden_dim=16", "model.head_bottleneck_dim=8",
                             "objective.num_clusters=16", "objective.mode=center", "optim.warmup_epochs=0",
                             "objective.teacher_temperature_warmup=0.02",
                             "objective.teacher_temperature_warmup_epochs=0.5", *overrides])
    torch.manual_seed(0)
    student = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters)
    objective = ClusterObjective(cfg.objective)
    return Stepper(student, make_teacher(student), objective, build_optimizer(student, cfg.optim),
                   build_schedules(cfg, 10, 8), cfg, 10, torch.device("cpu"), False)


def test_training_step_in_center_mode_is_dino():
    """Through ``Stepper`` as training calls it (2 global + 2 local crops, the teacher temperature
    schedule, one optimizer step and teacher EMA per step): each step's loss and the centre after
    ``finish`` equal DINO's on the logits that step produced."""
    stepper = tiny_stepper("objective.center_momentum=0.9")
    spec = stepper.objective.cfg
    ref = DinoReference(spec.num_clusters, spec.student_temperature, spec.center_momentum)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        views = [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]
        views += [torch.randn(8, 1, 14, 14, generator=g) for _ in range(2)]
        loss = stepper.micro_batch(views, step, last=True)
        student, teacher, tau_t = stepper.last_outputs
        expected = ref.loss(student.flatten(0, 1), teacher.flatten(0, 1), tau_t, len(views))
        assert len(stepper.finish(step)) == 1
        torch.testing.assert_close(loss.double(), expected, **TOL, msg=lambda m: f"step {step} loss: {m}")
        torch.testing.assert_close(stepper.objective.center.double(), ref.center[0], **TOL,
                                   msg=lambda m: f"step {step} centre: {m}")
    assert float(ref.center.abs().max()) > 1e-3  # the centre moved, so the later steps test it


class LightlyReference:
    """lightly's published ``DINOLoss`` (the peers extra) behind ``DinoReference``'s interface:
    the loss of benchmarks/peers.py's ``lightly_loss_in_rayssl`` arm, in its own float32."""

    def __init__(self, num_clusters: int, student_temperature: float, center_momentum: float):
        from lightly.loss import DINOLoss

        self.loss_fn = DINOLoss(num_clusters, warmup_teacher_temp_epochs=0, student_temp=student_temperature,
                                center_momentum=center_momentum)

    @property
    def center(self) -> torch.Tensor:
        return self.loss_fn.center.double().flatten(0, 1)  # (1, K), as DinoReference's

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, tau_t: float, num_crops: int) -> torch.Tensor:
        return self.loss_fn(list(teacher.chunk(2)), list(student.chunk(num_crops)), teacher_temp=tau_t).double()


@pytest.mark.parametrize("num_crops", [2, 4, 8])
def test_center_mode_equals_lightly_dino_loss_step_by_step(num_crops):
    """The peers benchmark's control: rayssl's ``center`` and lightly's ``DINOLoss`` give the same
    loss and the same centre at every step, to float32 rounding; so the gap between the
    ``rayssl_center`` and ``lightly_loss_in_rayssl`` arms is the run-to-run spread, not the equation."""
    pytest.importorskip("lightly", reason="lightly is the peers extra: pip install -e '.[peers]' (make test has it)")
    k, batch, tau_s, tau_t = 64, 16, 0.1, 0.04
    spec = ObjectiveConfig(mode="center", num_clusters=k, student_temperature=tau_s, center_momentum=0.9)
    steps = run_both(spec, LightlyReference(k, tau_s, 0.9), 5, num_crops, batch, tau_t)
    for step, (loss, expected, center, ref_center) in enumerate(steps):
        torch.testing.assert_close(loss, expected, **TOL, msg=lambda m: f"step {step} loss: {m}")
        torch.testing.assert_close(center, ref_center, **TOL, msg=lambda m: f"step {step} centre: {m}")
    assert float(steps[-1][3].abs().max()) > 1e-3  # the centre moved, so the later steps test it
    wrong = run_both(spec, LightlyReference(k, tau_s, 0.8), 3, num_crops, batch, tau_t)  # it can fail
    assert max(float((c - r).abs().max()) for _, _, c, r in wrong) > 1e-4


@pytest.mark.parametrize("reference", ["paper", "lightly"])
def test_in_float64_center_mode_equals_dino_to_float64_rounding(reference):
    """Run in float64 (``peers.py --precision fp64``), rayssl's objective and its state stay in
    float64, and the loss and centre equal DINO's (the paper's, and lightly's ``DINOLoss`` in
    float64) to 1e-12: the two arms compute one equation, not two that agree to float32 only."""
    if reference == "lightly":
        pytest.importorskip("lightly", reason="lightly is the peers extra: pip install -e '.[peers]' (make test has it)")
    try:  # the default dtype back to float32 whatever happens
        if reference == "lightly":
            torch.set_default_dtype(torch.float64)  # lightly makes tensor(teacher_temp) in the default dtype
            ref = LightlyReference(64, 0.1, 0.9)
            ref.loss_fn.double()
        else:
            ref = DinoReference(64, 0.1, 0.9)
        spec = ObjectiveConfig(mode="center", num_clusters=64, student_temperature=0.1, center_momentum=0.9)
        steps = run_both(spec, ref, 4, 4, 16, 0.04, torch.float64)
    finally:
        torch.set_default_dtype(torch.float32)
    for step, (loss, expected, center, ref_center) in enumerate(steps):
        assert loss.dtype == center.dtype == torch.float64
        torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12, msg=lambda m: f"step {step} loss: {m}")
        torch.testing.assert_close(center, ref_center, atol=1e-12, rtol=1e-12, msg=lambda m: f"step {step} centre: {m}")
