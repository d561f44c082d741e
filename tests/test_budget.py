"""``train.time_budget``: the duration strings, the config's one-line errors and the budget
arithmetic of ``rayssl.train.budget`` (the runs themselves: tests/test_train_run.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayssl.config import ConfigError, load_config
from rayssl.train.budget import (MARGIN, MEASURE_STEPS, REFIT_MIN_STEPS, REFITS, SETTLE_STEPS, BudgetError, BudgetPlan, budget_total,
                                 check_budget, measure_window, parse_duration, refit_due)


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("12m", 720), ("8h", 28800), ("1h30m", 5400), ("2.5m", 150), (" 12 min ", 720),
    ("1h 0m 30s", 3630), (45, 45), (0.5, 0.5), ("12M", 720)])
def test_durations_parse(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["12x", "", "m", "-5m", "0s", "12 parsecs", "5", "1h-30m", "nan", True])
def test_bad_durations_are_refused(text) -> None:
    with pytest.raises(BudgetError, match="duration"):
        parse_duration(text)


def test_config_keeps_the_budget_as_written_and_names_the_field_when_bad() -> None:
    assert load_config(None, ["train.time_budget=12m"]).train.budget_seconds == 720
    assert load_config(None, ["train.time_budget=90"]).train.time_budget == "90s"  # a bare number: seconds
    assert load_config(None, []).train.budget_seconds is None
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.time_budget=12x"])
    assert str(err.value) == ("train.time_budget: expected a duration such as 90s, 12m, 8h or 1h30m "
                              "(got '12x')")
    with pytest.raises(ConfigError, match=r"^train\.time_budget: expected a positive duration"):
        load_config(None, ["train.time_budget=0m"])


def test_budget_buys_the_steps_that_fit_the_time_left() -> None:
    # 600 s budget, 20 s already trained, at step 50, 0.5 s a step: 50 + (0.97 * 600 - 20) / 0.5
    assert budget_total(600, 20, 50, 0.5, cap_steps=10_000) == 50 + math.floor((MARGIN * 600 - 20) / 0.5) == 1174
    assert budget_total(600, 20, 50, 0.5, cap_steps=900) == 900  # train.epochs caps it
    assert budget_total(600, 700, 50, 0.5, cap_steps=10_000) == 51  # spent already: one step to end the schedules
    assert budget_total(600, 700, 50, 0.5, cap_steps=50) == 50  # ... unless that is the cap
    # the same budget on a machine twice as fast buys twice the steps after the measured ones
    assert budget_total(600, 20, 50, 0.25, 10_000) - 50 == 2 * (budget_total(600, 20, 50, 0.5, 10_000) - 50)


def test_steps_are_timed_after_settling_and_through_the_lr_warmup() -> None:
    assert measure_window(0, 0) == (SETTLE_STEPS, SETTLE_STEPS + MEASURE_STEPS)
    assert measure_window(0, 500) == (SETTLE_STEPS, 500)  # the warm-up does not depend on the total
    assert measure_window(200, 70) == (200 + SETTLE_STEPS, 200 + SETTLE_STEPS + MEASURE_STEPS)  # a resume


def test_a_budget_shorter_than_the_warmup_is_one_clear_line() -> None:
    check_budget("12m", 720, 0.5, 70, "optim.warmup_epochs")  # 1396 steps: fine
    with pytest.raises(BudgetError) as err:
        check_budget("20s", 20, 0.5, 70, "optim.warmup_epochs")
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.time_budget: 20s buys 38 steps")
    assert "70 steps of optim.warmup_epochs" in message


def test_plan_says_what_the_budget_bought() -> None:
    plan = BudgetPlan("12m", 2140, 234, 470.4, timed_until=110)
    assert plan.line() == "budget 12m: 2,140 steps (9.1 epochs) at 470 img/s"
    assert BudgetPlan(**plan.to_dict()) == plan
    assert "train.epochs cap" in BudgetPlan("1h", 2340, 234, 900.0, 110, capped=True).line()


def test_a_job_budget_leaves_out_the_start_up_and_keeps_the_final_knn_back() -> None:
    # 14m for the job, 150 s since the job started (start-up, baselines, 150 steps), 40 s kept for the
    # final k-NN, at step 150, 0.4 s a step: 150 + (0.97 * 840 - 150 - 40) / 0.4
    assert budget_total(840, 150, 150, 0.4, 10_000, reserve_s=40) == 150 + math.floor((MARGIN * 840 - 190) / 0.4)
    assert budget_total(840, 150, 150, 0.4, 10_000, reserve_s=40) == budget_total(840, 190, 150, 0.4, 10_000)
    with pytest.raises(BudgetError) as err:  # 3 min of start-up and evaluation leave 3m nothing
        check_budget("3m", 180, 0.5, 70, "optim.warmup_epochs", outside_s=180)
    assert str(err.value).startswith("train.time_budget: 3m buys 0 steps besides 3.0 min of start-up and evaluation")
    plan = BudgetPlan("14m", 1702, 234, 640.2, 150, scope="job", outside_seconds=114, reserve_seconds=36)
    assert plan.line() == ("budget 14m for the job: 1,702 steps (7.3 epochs) at 640 img/s, after 1.9 min of "
                           "start-up and baselines, 0.6 min kept for the final k-NN")
    assert BudgetPlan(**plan.to_dict()) == plan
    old = {k: v for k, v in plan.to_dict().items() if k not in ("scope", "outside_seconds", "reserve_seconds")}
    assert BudgetPlan(**old).scope == "training"  # a checkpoint written before the scope existed


def test_refits_come_at_eighths_of_the_way_to_the_current_total() -> None:
    # fixed at step 150 with 1,350 steps: re-timings every 150 steps (of the total each was fixed with)
    assert REFITS == 7
    assert [s for s in range(151, 1350) if refit_due(s, 150, 1350, 0, 150)][:1] == [300]
    assert [s for s in range(301, 1350) if refit_due(s, 150, 1350, 1, 300)][:1] == [450]
    assert [s for s in range(451, 1600) if refit_due(s, 150, 1590, 2, 450)][:1] == [690]  # after a longer re-fit
    assert not any(refit_due(s, 150, 1350, REFITS, 150) for s in range(151, 1350))  # all made
    # a slow stretch cut the total to 862 at step 413: the next point (417) waits for 100 timed steps
    assert [s for s in range(414, 862) if refit_due(s, 150, 862, 2, 413)][:1] == [413 + REFIT_MIN_STEPS]
    plan = BudgetPlan("14m", 1350, 234, 550.0, 150).refit(450, 1590, 650.4, capped=False)
    assert (plan.first_total, plan.total_steps, plan.refits) == (1350, 1590, ((450, 1590),))
    assert plan.line() == "budget 14m: 1,590 steps (6.8 epochs, re-timed at steps 450) at 650 img/s"
    assert BudgetPlan(**plan.to_dict()) == plan


def test_stretch_keeps_the_steps_before_and_the_shape_after() -> None:
    from rayssl.schedules import cosine_schedule, stretch

    lr = {"lr": cosine_schedule(1.0, 0.0, 1000, 100, hold_until=150)}
    for total in (1400, 700):  # the machine sped up / slowed down
        out = stretch(lr, 450, total)["lr"]
        assert len(out) == total and np.array_equal(out[:450], lr["lr"][:450])
        assert out[-1] == lr["lr"][-1] and np.all(np.diff(out[450:]) <= 0)
        half = 450 + (total - 450) // 2  # half-way through the rest: half-way through the old rest's curve
        assert out[half] == pytest.approx(lr["lr"][450 + (1000 - 450) // 2], abs=2e-3)
    assert np.array_equal(stretch(lr, 450, 1000)["lr"], lr["lr"])  # the same total changes nothing
    one = stretch(lr, 450, 451)["lr"]  # one step left: it takes the end value
    assert len(one) == 451 and np.array_equal(one[:450], lr["lr"][:450]) and one[-1] == lr["lr"][-1]
