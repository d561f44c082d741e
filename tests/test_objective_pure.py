"""One objective path (docs/theory.md §8): ``ClusterObjective.targets`` is pure and returns the
statistic of the state update, ``update_state`` is the one call that changes the state, training's
loss is ``ClusterObjective.forward``, and the settings are ``rayssl.config.ObjectiveConfig`` alone.

One process, no Ray; a few seconds on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import rayssl.objective
from rayssl.config import ObjectiveConfig, load_config
from rayssl.models import build_encoder, make_teacher
from rayssl.objective import ClusterObjective, TeacherTargets, global_log_prior, target_log_prior
from rayssl.schedules import build_schedules
from rayssl.train.step import Stepper, build_optimizer

K, B, TAU_T = 6, 9, 0.1
CASES = [("none", {}), ("center", dict(center_momentum=0.6)), ("prior", dict(prior_momentum=0.0)),
         ("prior", dict(prior_momentum=0.7, alpha=0.5, target_prior="powerlaw")), ("sinkhorn", {})]


def logits(seed: int, views: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(views, B, K, generator=g) * scale


def with_history(mode: str, scope: str = "global", **kw) -> ClusterObjective:
    """An objective one step into training, so that its state is not the initial one."""
    obj = ClusterObjective(ObjectiveConfig(mode=mode, num_clusters=K, scope=scope, **kw))
    obj.update_state([obj(logits(1, 4), logits(2, 2), TAU_T)[1].stat])
    return obj


def buffers(obj: ClusterObjective) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in obj.named_buffers()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("mode,kw", CASES)
def test_targets_is_pure(mode, kw, scope):
    """Twice on the same logits: identical targets and statistics, bit for bit, and the buffers
    as they were; ``forward`` and ``diagnostics`` change no state either."""
    obj = with_history(mode, scope, **kw)
    if mode in ("center", "prior"):
        assert any(not torch.equal(b, c) for b, c in zip(obj.buffers(), ClusterObjective(obj.cfg).buffers()))
    before = buffers(obj)
    z, s = logits(3, 2), logits(4, 4)
    first, second = obj.targets(z, TAU_T), obj.targets(z, TAU_T)
    assert isinstance(first, TeacherTargets)
    torch.testing.assert_close(first.qt, second.qt, atol=0, rtol=0)
    assert (first.stat is None) == (second.stat is None) == (mode in ("none", "sinkhorn"))
    if first.stat is not None:
        torch.testing.assert_close(first.stat, second.stat, atol=0, rtol=0)
    assert_same(buffers(obj), before)
    loss, third = obj(s, z, TAU_T)
    torch.testing.assert_close(third.qt, first.qt, atol=0, rtol=0)   # forward's targets are targets()'s
    obj.diagnostics(s, z, TAU_T)
    assert_same(buffers(obj), before)
    assert math.isfinite(float(loss))


def test_targets_returns_the_statistic_that_update_state_folds_in():
    """center: stat = c_batch = sum_i z_i / N; prior: stat = log pi_used = log(m pi_ema + (1 - m) pi_batch);
    update_state folds the step's statistics into the EMA as docs/theory.md §3.5 and §4 write it."""
    z1, z2 = logits(5, 2), logits(6, 2)
    center = ClusterObjective(ObjectiveConfig(mode="center", num_clusters=K, center_momentum=0.6))
    stats = [center.targets(z, TAU_T).stat for z in (z1, z2)]
    for stat, z in zip(stats, (z1, z2)):
        torch.testing.assert_close(stat, z.reshape(-1, K).mean(0), atol=1e-6, rtol=1e-6)
    center.update_state(stats)
    torch.testing.assert_close(center.center, 0.4 * (stats[0] + stats[1]) / 2, atol=1e-7, rtol=1e-6)

    m = 0.7
    prior = ClusterObjective(ObjectiveConfig(mode="prior", num_clusters=K, prior_momentum=m))
    stats = [prior.targets(z, TAU_T).stat for z in (z1, z2)]
    for stat, z in zip(stats, (z1, z2)):
        pi_batch = global_log_prior(torch.log_softmax(z.reshape(-1, K) / TAU_T, -1)).exp()
        expected = m * target_log_prior(K).exp() + (1 - m) * pi_batch
        torch.testing.assert_close(stat.exp(), expected, atol=1e-6, rtol=1e-5)
    prior.update_state(stats)
    torch.testing.assert_close(prior.log_prior_ema.exp(), (stats[0].exp() + stats[1].exp()) / 2,
                               atol=1e-6, rtol=1e-5)
    before = buffers(prior)
    prior.update_state([])                                 # nothing to fold: nothing changes
    prior.update_state([None])
    assert_same(buffers(prior), before)


def test_one_definition_of_the_objectives_settings():
    """No second settings class; the objective takes the config's section, with its defaults, and
    keeps a copy (editing the caller's section later does not change the objective)."""
    assert not hasattr(rayssl.objective, "ObjectiveSpec")
    cfg = ObjectiveConfig()
    obj = ClusterObjective(cfg)
    assert obj.center.shape == (ObjectiveConfig.model_fields["num_clusters"].default,)
    assert obj.cfg == cfg and obj.cfg is not cfg
    cfg.student_temperature = 0.5
    assert obj.cfg.student_temperature == ObjectiveConfig().student_temperature


def tiny_stepper(*overrides: str) -> Stepper:
    cfg = load_config(None, ["model.width=4", "model.head_hidden_dim=16", "model.head_bottleneck_dim=8",
                             "objective.num_clusters=16", "optim.warmup_epochs=0", *overrides])
    torch.manual_seed(0)
    student = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters)
    return Stepper(student, make_teacher(student), ClusterObjective(cfg.objective),
                   build_optimizer(student, cfg.optim), build_schedules(cfg, 10, 8), cfg, 10,
                   torch.device("cpu"), False)


def views(seed: int, nan: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(4, 1, 28, 28, generator=g) for _ in range(2)]
    out += [torch.randn(4, 1, 14, 14, generator=g) for _ in range(2)]
    if nan:
        out[0][0, 0, 0, 0] = float("nan")
    return out


def spy_on_forward(obj: ClusterObjective) -> list[tuple[torch.Tensor, TeacherTargets]]:
    """Every (loss, targets) that ``obj.forward`` returns from now on."""
    calls, forward = [], obj.forward

    def spy(*args):
        out = forward(*args)
        calls.append(out)
        return out

    obj.forward = spy
    return calls


@pytest.mark.parametrize("mode", ["center", "prior"])
def test_the_training_step_goes_through_the_objectives_entry_point(mode):
    """``Stepper.micro_batch``'s loss is ``ClusterObjective.forward``'s, and ``finish`` folds in
    exactly the statistics of the step's micro-batches (2 here), once, after the optimizer step."""
    stepper = tiny_stepper(f"objective.mode={mode}", "objective.center_momentum=0.6",
                           "objective.prior_momentum=0.5")
    obj = stepper.objective
    calls = spy_on_forward(obj)
    losses = [stepper.micro_batch(views(seed), 0, last=seed == 1) for seed in (0, 1)]
    assert len(calls) == 2
    for loss, (their_loss, _) in zip(losses, calls):
        torch.testing.assert_close(loss, their_loss.detach(), atol=0, rtol=0)
    before = buffers(obj)
    assert_same(before, buffers(ClusterObjective(obj.cfg)))           # nothing folded in before finish
    expected = ClusterObjective(obj.cfg)
    expected.load_state_dict(before)
    expected.update_state([targets.stat for _, targets in calls])
    assert len(stepper.finish(0)) == 2
    assert_same(buffers(obj), buffers(expected))
    assert any(not torch.equal(before[n], b) for n, b in obj.named_buffers())


def test_a_skipped_step_leaves_the_objective_state_as_it_was():
    """A non-finite step (``train.skip_nonfinite``) drops its statistics with its gradients: the
    centre is not poisoned by the NaN batch, and the next step folds in its own statistics only."""
    stepper = tiny_stepper("objective.mode=center", "objective.center_momentum=0.6", "train.skip_nonfinite=1")
    obj = stepper.objective
    stepper.micro_batch(views(0), 0, last=True)
    assert len(stepper.finish(0)) == 1
    before = buffers(obj)
    stepper.micro_batch(views(1, nan=True), 1, last=True)
    assert stepper.finish(1) == []
    assert_same(buffers(obj), before)
    calls = spy_on_forward(obj)
    stepper.micro_batch(views(2), 2, last=True)
    expected = ClusterObjective(obj.cfg)
    expected.load_state_dict(before)
    expected.update_state([calls[0][1].stat])
    assert len(stepper.finish(2)) == 1
    assert_same(buffers(obj), buffers(expected))
    assert torch.isfinite(obj.center).all()
