"""k-NN evaluation and schedules, pinned to their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rayssl.config import load_config
from rayssl.knn import knn_accuracy, merge_neighbours, topk_neighbours, weighted_vote
from rayssl.schedules import build_schedules, cosine_schedule, knn_evaluations, online_knn_every


def test_knn_separable_clusters_is_perfect_and_random_is_chance() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 10
    labels = torch.arange(5).repeat_interleave(40)
    feats = centres[labels] + torch.randn(200, 16, generator=g)
    assert knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2], 5, k=10) == 1.0
    noise = torch.randn(2000, 16, generator=g)
    rand_labels = torch.randint(0, 5, (2000,), generator=g)
    acc = knn_accuracy(noise[:1000], rand_labels[:1000], noise[1000:], rand_labels[1000:], 5, k=20)
    assert 0.1 < acc < 0.3


@settings(max_examples=25, deadline=None)
@given(n=st.integers(20, 80), shards=st.integers(1, 4), k=st.integers(1, 10), seed=st.integers(0, 1000))
def test_sharded_topk_merges_to_the_global_topk(n: int, shards: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (n,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    full = topk_neighbours(bank, labels, queries, k)
    parts = [topk_neighbours(b, lab, queries, k) for b, lab in zip(bank.chunk(shards), labels.chunk(shards))]
    merged = merge_neighbours(parts, k)
    torch.testing.assert_close(merged[0], full[0])
    assert torch.equal(weighted_vote(*merged, 3, 0.07), weighted_vote(*full, 3, 0.07))


def test_weighted_vote_weights_by_similarity() -> None:
    sims = torch.tensor([[0.9, 0.1, 0.1]])
    labels = torch.tensor([[2, 0, 0]])
    assert weighted_vote(sims, labels, 3, 0.07).item() == 2  # one close neighbour beats two far
    assert weighted_vote(sims, labels, 3, 100.0).item() == 0  # ~uniform weights: majority


def test_cosine_schedule_warmup_and_ends() -> None:
    s = cosine_schedule(1.0, 0.1, 100, warmup_steps=10, warmup_start=0.0)
    assert len(s) == 100 and s[0] == 0.0 and np.all(np.diff(s[:11]) > 0)
    assert s[10] == 1.0 and abs(s[-1] - 0.1) < 1e-3 and np.all(np.diff(s[10:]) <= 0)


def test_a_held_schedule_starts_its_cosine_late() -> None:
    """``hold_until`` (a budgeted run's timed steps): warm-up, then the start value up to that
    step, then the whole cosine over the steps left; the length stays ``total_steps``."""
    s = cosine_schedule(1.0, 0.1, 100, warmup_steps=10, hold_until=40)
    assert len(s) == 100 and np.all(s[10:41] == 1.0) and s[41] < 1.0 and abs(s[-1] - 0.1) < 1e-3
    assert np.array_equal(s[40:], cosine_schedule(1.0, 0.1, 60))
    assert np.array_equal(cosine_schedule(1.0, 0.1, 100, 10, hold_until=5), cosine_schedule(1.0, 0.1, 100, 10))


def test_run_schedules_follow_config() -> None:
    cfg = load_config(None, ["train.epochs=2", "optim.lr=0.001", "optim.warmup_epochs=1",
                             "objective.teacher_temperature_warmup=0.02",
                             "objective.teacher_temperature=0.07", "objective.teacher_temperature_warmup_epochs=1"])
    s = build_schedules(cfg, steps_per_epoch=50, global_batch=512)
    assert {len(v) for v in s.values()} == {100}
    assert abs(s["lr"].max() - 0.002) < 1e-12  # linear scaling: 0.001 x 512 / 256
    assert s["teacher_temperature"][0] == 0.02 and np.all(s["teacher_temperature"][50:] == 0.07)
    assert s["momentum"][0] == cfg.optim.teacher_momentum and np.all(np.diff(s["momentum"]) >= 0)


@pytest.mark.parametrize("epochs, every_epochs, log_every, steps_per_epoch, every, evaluations", [
    (2, 0.5, 20, 78, 40, 4),   # 39 steps rounds to the nearest logged step, 40: 40, 80, 120 + final
    (2, 1.0, 2, 6, 6, 2),      # 6 + final at 12
    (3, 1.0, 20, 10, 20, 2),   # never more often than logging: 20 + final at 30
    (4, None, 20, 234, 0, 1),  # only the final evaluation
])
def test_online_knn_cadence_matches_logged_steps(epochs, every_epochs, log_every, steps_per_epoch,
                                                 every, evaluations) -> None:
    cfg = load_config(None, [f"train.epochs={epochs}", f"eval.every_epochs={every_epochs}",
                             f"train.log_every={log_every}"] if every_epochs else
                      [f"train.epochs={epochs}", f"train.log_every={log_every}"])
    assert online_knn_every(cfg, steps_per_epoch) == every
    assert knn_evaluations(cfg, steps_per_epoch) == evaluations
