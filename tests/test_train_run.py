"""``TrainRun`` without Ray: a real (tiny) pretraining run on in-memory Fashion-MNIST batches."""

from __future__ import annotations

import copy
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rayssl.checkpoint import no_space
from rayssl.config import load_config
from rayssl.data.fashion_mnist import load_fashion_mnist
from rayssl.data.meta import DataMeta
from rayssl.schedules import build_schedules, stretch
from rayssl.tracking import MlflowRun, RunLogger, checkpoint_record
from rayssl.train import budget
from rayssl.train.budget import BudgetPlan
from rayssl.train.run import TrainRun
from rayssl.train.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
N, BATCH, STEPS_PER_EPOCH = 256, 32, 8


@pytest.fixture(scope="module")
def data(fashion_mnist_dir):
    """The first N train and test images, PNG-encoded as the shards store them."""
    def encode(images: np.ndarray) -> np.ndarray:
        out = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            out.append(buf.getvalue())
        return np.array(out, dtype=object)

    x, y = load_fashion_mnist(fashion_mnist_dir, "train")
    xt, yt = load_fashion_mnist(fashion_mnist_dir, "test")
    return {"train": encode(x[:N]), "bank": (x[:N], y[:N]), "eval": (xt[:128], yt[:128])}


def config(*extra: str):
    return load_config(ROOT / "configs/fashion_mnist.yaml", [
        "data.decode_on=worker", "data.deterministic=true", "model.width=8", "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32", "objective.num_clusters=32", f"train.batch_size={BATCH}",
        "train.epochs=2", "train.log_every=4", "train.checkpoint_every=8", "train.precision=fp32",
        "optim.warmup_epochs=0", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "train.time_budget=null",
        "train.time_budget_scope=training", "eval.every_epochs=null",
        *extra])


META = DataMeta(num_train=N, num_eval=128, channels=1, image_size=28, classes=tuple("0123456789"),
                mean=(0.286,), std=(0.353,))


class FakeLogger:
    """``Worker.mlflow`` without MLflow: every call (``metrics``, ``tag``, ``end``, ...) kept in order."""

    def __init__(self, log_model: bool = False) -> None:
        self.mlflow_run = MlflowRun("sqlite:///nowhere.db", "0" * 32, log_model=log_model)
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def worker(data, states: list, restore_from: dict | None = None, knn: bool = True) -> Worker:
    """A single worker on lists of batches: a seeded shuffle per pass, reports kept in ``states``."""
    def train_batches(seed: int, rows: int):
        order = np.random.default_rng(seed).permutation(N)
        return [{"image": data["train"][order[i:i + rows]]} for i in range(0, N - rows + 1, rows)]

    def labelled(x, y):
        return [{"id": np.array([f"{len(x)}-{j}" for j in range(i, min(i + 64, len(x)))]), "image": x[i:i + 64, :, :, None],
                 "label": y[i:i + 64], "ok": np.ones(len(x[i:i + 64]), bool)} for i in range(0, len(x), 64)]

    return Worker(train_batches, report=lambda metrics, state: states.append((metrics, copy.deepcopy(state))),
                  restore=lambda say: restore_from,
                  knn_sets=(lambda: (labelled(*data["bank"]), labelled(*data["eval"]))) if knn else None,
                  say=lambda line: None)


def test_run_trains_reports_and_checkpoints(data) -> None:
    """The whole run in one process: logged steps, a state at each checkpoint step, k-NN rows,
    and what MLflow gets through ``Worker.mlflow``: each logged step, each epoch's plots, then the
    results, the curves, the teacher's backbone and the end, in that order."""
    reports: list = []
    w = worker(data, reports)
    w.mlflow = FakeLogger(log_model=True)
    out = TrainRun(config(), META, STEPS_PER_EPOCH, w).run()
    steps = [m["step"] for m in out["history"]]
    assert steps == [4, 8, 12, 16]
    assert [m["step"] for m, s in reports if s is not None] == [8, 16]
    assert reports[-1][0]["knn/teacher"] == out["knn/teacher"] and reports[-1][1] is None
    assert all(0 <= out[f"knn/{k}"] <= 1 for k in ("teacher", "raw_pixels", "random_init"))
    assert all(np.isfinite(m["loss"]) for m in out["history"])
    final = reports[-2][1]
    assert final["step"] == 16 and final["skipped_images"] == 0 and len(final["rng"]) == 1
    assert final["tracking"] == checkpoint_record(w.mlflow.mlflow_run)
    assert out["train_seconds"] > 0

    calls = w.mlflow.calls
    assert w.mlflow.names() == ["metrics", "epoch_plots", "metrics", "metrics", "epoch_plots", "metrics",
                                "figures", "results", "curves", "model", "end"]
    assert [args for name, args, _ in calls if name == "metrics"] == [(m["step"], m) for m in out["history"]]
    assert [args[0] for name, args, _ in calls if name == "epoch_plots"] == [1, 2]
    figures, folder = calls[6][1]  # what the clusters hold (eval.gallery_clusters), from the final k-NN's pass
    assert folder == "plots/clusters"
    assert set(figures) == {"gallery_top.png", "gallery_tail.png", "cluster_class_map.png"}
    assert calls[7][1] == ({k: v for k, v in out.items() if k != "history"}, 16)
    cfg = config()
    assert calls[8][1] == (f"{cfg.objective.mode}, K=32, {cfg.model.backbone}",)
    backbone, example, metadata = calls[9][1]
    assert example.shape == (2, 1, 28, 28) and not any(p.is_cuda for p in backbone.parameters())
    assert metadata == {"input": "normalised images (N, C, H, W); see preprocessing", "image_size": 28,
                        "channels": 1, "mean": [0.286], "std": [0.353]}
    assert calls[10][1:] == ((), {})


def test_online_points_use_the_small_sets_and_the_final_one_the_full_sets(data) -> None:
    """``eval.every_epochs``: each online k-NN point reads ``Worker.online_knn_sets``, the final one
    ``knn_sets``; ``eval.gallery_clusters=0`` draws no gallery."""
    reads: list[str] = []
    w = worker(data, [])
    full = w.knn_sets
    w.knn_sets = lambda: reads.append("full") or full()
    w.online_knn_sets = lambda: reads.append("online") or full()
    w.mlflow = FakeLogger()
    out = TrainRun(config("eval.every_epochs=0.5", "eval.baselines=false", "eval.gallery_clusters=0"), META,
                   STEPS_PER_EPOCH, w).run()
    assert [m["step"] for m in out["history"] if "knn/teacher" in m] == [4, 8, 12]
    assert reads == ["online"] * 3 + ["full"]
    assert "figures" not in w.mlflow.names()


def test_unlabelled_data_gets_both_galleries_from_a_pass_of_their_own(data) -> None:
    """No labels, so no k-NN: ``Worker.gallery_images`` gives the end-of-run galleries (each image
    read once for the clusters and once more only if picked), without class histograms and
    without the cluster x class map; ``eval.gallery_clusters=0`` reads nothing."""
    x = data["bank"][0]
    reads: list[int] = []

    def images():
        reads.append(0)
        return [{"id": np.array([f"u{j}" for j in range(i, i + 64)]), "image": x[i:i + 64, :, :, None],
                 "label": np.full(64, -1), "ok": np.ones(64, bool)} for i in range(0, 192, 64)]

    w = worker(data, [], knn=False)
    w.gallery_images, w.mlflow = images, FakeLogger()
    out = TrainRun(config("eval.baselines=false", "eval.gallery_clusters=4"), META, STEPS_PER_EPOCH, w).run()
    assert "knn/teacher" not in out and out["eval_seconds"] > 0 and len(reads) == 2
    (figures, folder), = [args for name, args, _ in w.mlflow.calls if name == "figures"]
    assert folder == "plots/clusters" and sorted(figures) == ["gallery_tail.png", "gallery_top.png"]
    top = figures["gallery_top.png"]
    assert [ax.get_label() for ax in top.axes] == ["gallery"]  # no class histogram
    assert "most-used of 32 clusters" in top.texts[0].get_text()
    w.mlflow, reads[:] = FakeLogger(), []
    TrainRun(config("eval.baselines=false", "eval.gallery_clusters=0"), META, STEPS_PER_EPOCH, w).run()
    assert reads == [] and "figures" not in w.mlflow.names()


def test_resume_is_bitwise(data) -> None:
    """Stopped after the first epoch's checkpoint and restored from it, the run ends with the
    same weights, bit for bit, as the run that never stopped (data.deterministic)."""
    straight: list = []
    TrainRun(config(), META, STEPS_PER_EPOCH, worker(data, straight, knn=False)).run()
    at_8 = [s for m, s in straight if s is not None and s["step"] == 8][0]
    resumed: list = []
    out = TrainRun(config(), META, STEPS_PER_EPOCH, worker(data, resumed, restore_from=at_8, knn=False)).run()
    assert out["resumed_from_step"] == 8 and [m["step"] for m in out["history"]] == [12, 16]
    a, b = straight[-2][1]["teacher"], resumed[-2][1]["teacher"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_request_finishes_the_step_checkpoints_it_and_resumes_exactly(data) -> None:
    """The driver's stop request (``Worker.stop_requested``, asked after every step; SIGTERM after
    step 5 here, neither a logged nor a checkpoint step) ends the run after that step: its metrics
    logged, a checkpoint of step 5, no final k-NN, ``stopped="signal"``. The relaunch from that
    checkpoint continues at step 6 and ends bitwise equal to the run that was never stopped."""
    straight: list = []
    TrainRun(config(), META, STEPS_PER_EPOCH, worker(data, straight, knn=False)).run()

    asked: list[int] = []

    def sigterm_after_5() -> str | None:
        asked.append(1)
        return "SIGTERM" if len(asked) >= 5 else None

    reports: list = []
    w = worker(data, reports)
    w.stop_requested = sigterm_after_5
    out = TrainRun(config(), META, STEPS_PER_EPOCH, w).run()
    assert len(asked) == 5 and out["stopped"] == "signal" and out["stop_reason"] == "SIGTERM at step 5"
    assert [m["step"] for m in out["history"]] == [4, 5] and out["history"][-1]["stopped"] == "signal"
    assert "knn/teacher" not in out and "knn/raw_pixels" in out  # the baselines ran, the final k-NN did not
    saved = [s for _, s in reports if s is not None]
    assert [s["step"] for s in saved] == [5] and reports[-1][1] is None

    resumed: list = []
    again = TrainRun(config(), META, STEPS_PER_EPOCH, worker(data, resumed, restore_from=saved[0], knn=False)).run()
    assert again["resumed_from_step"] == 5 and [m["step"] for m in again["history"]] == [8, 12, 16]
    assert "stopped" not in again and "stop_reason" not in again
    a, b = straight[-2][1]["teacher"], resumed[-2][1]["teacher"]
    assert straight[-2][1]["step"] == resumed[-2][1]["step"] == 16
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_the_disk_cannot_take_stops_the_run_with_one_line(data) -> None:
    """Rank 0's report raises ``DiskFull`` for the checkpoint of step 3 (after reporting its
    metrics, as ``rayssl.train.loop.report`` does): the run trains one more step (every rank
    learns of it in that step's collective), reports it without a checkpoint although step 4 is a
    checkpoint step, and stops FAILED-bound (``disk_full``, no final k-NN) with one line that names
    the intact checkpoint of step 2."""
    reports: list = []

    def report(metrics: dict, state: dict | None) -> None:
        reports.append((metrics, copy.deepcopy(state)))
        if state is not None and state["step"] == 3:
            raise no_space("/data/runs/r1", 3, 3 * 2**20, 2**19)

    w = worker(data, [])
    w.report = report
    out = TrainRun(config("train.checkpoint_every=1"), META, STEPS_PER_EPOCH, w).run()
    assert [(m["step"], s and s["step"]) for m, s in reports[:-1]] == [(1, 1), (2, 2), (3, 3), (4, None)]
    assert out["stopped"] == "disk_full" and "knn/teacher" not in out and reports[-1][1] is None
    assert out["stop_reason"] == ("/data/runs/r1: no space left on its disk for the checkpoint of step 3 (3.0 MB, "
                                  "0.5 MB free); the checkpoint of step 2 is intact: free space on that disk")
    assert "\n" not in out["stop_reason"]

    reports = []  # the last step's checkpoint: the run is done, it warns and keeps its final k-NN
    last = TrainRun(config("train.checkpoint_every=1", "train.epochs=1"), META, 3, w).run()
    assert "stopped" not in last and "knn/teacher" in last
    assert last["checkpoint_error"].startswith("/data/runs/r1: no space left on its disk for the checkpoint of step 3")


def test_skips_undecodable_and_stops_on_nonfinite(data) -> None:
    """A corrupt image is skipped and counted (views made in the step or ahead, ``data.prefetch_batches``);
    a run whose loss turns NaN stops with the reason
    and without a final k-NN, and reports no checkpoint after the bad step."""
    broken = dict(data, train=data["train"].copy())
    broken["train"][:5] = b"not an image"
    reports: list = []
    for extra in (["data.deterministic=true"], ["data.deterministic=false", "data.prefetch_batches=2"]):
        out = TrainRun(config("train.epochs=1", *extra), META, STEPS_PER_EPOCH,
                       worker(broken, reports, knn=False)).run()  # in the step, then in the prefetch thread
        assert out["history"][-1]["data/skipped_images"] == 5  # the epoch reads every image once

    reports = []
    w = worker(data, reports, knn=False)
    w.mlflow = FakeLogger()
    run = TrainRun(config("train.skip_nonfinite=0"), META, STEPS_PER_EPOCH, w)
    with torch.no_grad():
        next(run.student.parameters()).fill_(float("nan"))
    out = run.run()
    assert out["stopped"] == "nonfinite" and "step 1" in out["stop_reason"]
    assert out["history"] == [] and "train_seconds" not in out
    assert all(state is None for _, state in reports)
    # MLflow: the reason tagged, the rest delivered without a status (the driver marks the run FAILED)
    assert w.mlflow.calls == [("tag", ("rayssl.stopped", out["stop_reason"]), {}), ("end", (), {"status": None})]


def test_collapse_alarm_tags_the_run_and_stops_it(data, tmp_path) -> None:
    """objective.mode=none with a fast, sharp teacher collapses within a few steps: the alarm
    warns, tags the MLflow run (a real SQLite store) and, with monitor.stop_on_collapse, stops
    at the first ``monitor.patience`` steps in a row below a threshold of ``rayssl.monitor.rules``
    (effective clusters or I(X;K)), reporting a checkpoint at that step.
    BatchNorm in the head (the default's model.head_norm) holds this tiny run off collapse, so
    it is off here."""
    import mlflow

    from rayssl import tracking
    from rayssl.monitor import rules

    cfg = config("objective.mode=none", "model.head_norm=false", "optim.teacher_momentum=0.9",
                 "optim.teacher_momentum_end=0.9", "objective.teacher_temperature=0.02",
                 "objective.teacher_temperature_warmup=0.02", "train.epochs=4", "train.log_every=1",
                 "monitor.patience=3", "monitor.stop_on_collapse=true", "tracking.log_model=false",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "run.name=collapse")
    mlflow_run = tracking.start(cfg, str(tmp_path / "collapse"))
    reports: list = []
    lines: list = []
    w = worker(data, reports, knn=False)
    w.say = lines.append
    w.mlflow = RunLogger(mlflow_run, lines.append, model_config=cfg.model.model_dump())
    out = TrainRun(cfg, META, STEPS_PER_EPOCH, w).run()

    assert out["stopped"] == "collapse" and out["stop_reason"].startswith("collapse at step")
    assert out["collapse"] == out["stop_reason"]  # what the final report (rayssl.report) shows
    assert out["eval_seconds"] == 0.0 < out["train_seconds"]  # no labelled data: no k-NN to time
    steps = [m["step"] for m in out["history"]]
    lows = [[m[rule.metric] < rule.threshold for m in out["history"]] for rule in rules(cfg.monitor)]
    first_alarm = min(i for low in lows for i in range(2, len(low)) if all(low[i - 2:i + 1]))
    assert steps[-1] == steps[first_alarm] < 4 * STEPS_PER_EPOCH  # stopped at the first 3 low steps in a row
    assert [s["step"] for _, s in reports if s is not None][-1] == steps[-1]  # a checkpoint at the stop
    assert any(line.startswith("[rayssl] WARNING collapse at step") for line in lines)

    run = mlflow.MlflowClient(mlflow_run.uri).get_run(mlflow_run.run_id)
    assert run.data.tags["rayssl.collapse"] == out["stop_reason"]
    assert run.data.tags["rayssl.stopped"] == out["stop_reason"]


def test_knn_recomputes_batchnorm_on_a_copy(data) -> None:
    """``eval.precise_bn_images``: the k-NN's networks get BatchNorm statistics of clean bank images
    (the random-init teacher's running statistics are still 0 / 1, so its row moves), while the
    live teacher keeps its own for training."""
    run = TrainRun(config(), META, STEPS_PER_EPOCH, worker(data, []))
    before = copy.deepcopy(run.teacher.state_dict())
    precise = run.knn({"raw_pixels": None, "random_init": run.teacher})
    for key, value in run.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    plain = TrainRun(config("eval.precise_bn_images=0"), META, STEPS_PER_EPOCH, worker(data, []))
    found = plain.knn({"raw_pixels": None, "random_init": plain.teacher})
    assert found["raw_pixels"] == precise["raw_pixels"]  # no BatchNorm in the raw pixels
    assert found["random_init"] != precise["random_init"]


def test_passes_start_once_with_their_seeds(data) -> None:
    """With views made in the step or ahead: a pass of one epoch is followed by the next at the
    boundary, one that holds every epoch (Ray Train's stream) is read once on, and a pass that
    ends before its first epoch is full is an error. Each pass starts once, with the seed of the
    step at its start, and none starts after the last epoch; with data.deterministic a pass ends
    at every epoch boundary, even one that holds more."""
    def run(extra: str, epochs_per_pass: int, *more: str, steps_per_epoch: int = STEPS_PER_EPOCH) -> list[int]:
        seeds: list = []
        w = worker(data, [], knn=False)
        one = w.train_batches
        w.train_batches = lambda seed, rows: seeds.append(seed) or [
            b for e in range(epochs_per_pass) for b in one(seed + e, rows)]
        TrainRun(config("train.epochs=3", extra, *more), META, steps_per_epoch, w).run()
        return seeds

    seed = config().train.seed
    for extra in ("data.prefetch_batches=0", "data.prefetch_batches=2"):
        assert run(extra, 1, "data.deterministic=false") == [seed + s for s in (0, 8, 16)], extra
        assert run(extra, 3, "data.deterministic=false") == [seed], extra
    assert run("data.prefetch_batches=0", 3) == [seed + 7919 * e for e in range(3)]  # deterministic
    with pytest.raises(RuntimeError, match=f"ran out at step {STEPS_PER_EPOCH}"):  # a pass feeds 8 of 9 steps
        run("data.deterministic=false", 1, steps_per_epoch=STEPS_PER_EPOCH + 1)


def test_stream_starts_before_the_baselines(data) -> None:
    """The training pass is opened before the k-NN baselines read their sets, so Ray Data reads
    ahead during start-up instead of in the first logged window; a run resumed at its last step
    opens none."""
    events: list[str] = []
    w = worker(data, [])
    train, knn = w.train_batches, w.knn_sets
    w.train_batches = lambda seed, rows: events.append("train") or train(seed, rows)
    w.knn_sets = lambda: events.append("knn") or knn()
    cfg = config("data.deterministic=false", "data.prefetch_batches=2")
    states: list = []
    w.report = lambda metrics, state: states.append(state)
    TrainRun(cfg, META, STEPS_PER_EPOCH, w).run()
    assert events[:2] == ["train", "knn"]
    events.clear()  # resumed at its last step: nothing left to train, no stream opened
    done = worker(data, [], restore_from=[s for s in states if s is not None][-1])
    done.train_batches = lambda seed, rows: events.append("train") or train(seed, rows)
    TrainRun(cfg, META, STEPS_PER_EPOCH, done).run()
    assert events == []


def budget_run(data, *extra: str, restore_from: dict | None = None, mlflow_run=None, knn: bool = False,
               job_started: float | None = None) -> tuple[TrainRun, dict, list, list]:
    """A run of ``train.time_budget`` (capped at 100 epochs, 800 steps): the run, its results,
    its reports and its console lines."""
    reports: list = []
    lines: list = []
    w = worker(data, reports, restore_from=restore_from, knn=knn)
    w.say = lines.append
    w.job_started = w.job_started if job_started is None else job_started
    cfg = config("train.epochs=100", "train.checkpoint_every=400", "optim.warmup_epochs=2", *extra)
    if mlflow_run is not None:
        w.mlflow = RunLogger(mlflow_run, lines.append, model_config=cfg.model.model_dump())
    run = TrainRun(cfg, META, STEPS_PER_EPOCH, w)
    return run, run.run(), reports, lines


@pytest.fixture(scope="module", autouse=True)
def short_timing():
    """Budgeted runs here time steps 10-40 (``rayssl.train.budget``'s window, shortened)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget, "SETTLE_STEPS", 10)
        patch.setattr(budget, "MEASURE_STEPS", 30)
        patch.setattr(budget, "REFIT_MIN_STEPS", 5)
        yield


@pytest.fixture(scope="module")
def budgeted(data, tmp_path_factory):
    """One run of an 8 s budget (steps 10-40 timed, room for more on a busy CI machine) in a real
    SQLite MLflow store, shared by the tests that read it."""
    from rayssl import tracking

    folder = tmp_path_factory.mktemp("budget")
    cfg = config("train.time_budget=8s", "tracking.log_model=false", f"tracking.uri=sqlite:///{folder}/mlflow.db",
                 "run.name=budget")
    return budget_run(data, "train.time_budget=8s", "tracking.log_model=false",
                      mlflow_run=tracking.start(cfg, str(folder / "budget")))


@pytest.mark.xdist_group("budgeted")  # one worker runs the shared 8-s run (make test-fast: --dist loadgroup)
def test_budget_fixes_the_total_and_every_schedule_spans_it(budgeted) -> None:
    """After the timed steps 10-40, the run fixes its total, says what the budget bought,
    checkpoints it there, re-times at its re-fit points (checkpointed too), and every schedule
    spans exactly the final total: the run ends at it, the LR at optim.min_lr and the teacher
    momentum at its end value. The timed steps ran on the final arrays' values (warm-up, then
    held at the peak until the cosines start at step 40); each re-fit kept the steps before it."""
    run, out, reports, lines = budgeted
    plan = BudgetPlan(**out["budget"])
    total = plan.total_steps
    assert 40 < total == run.total_steps == out["history"][-1]["step"] < 800
    # the re-timings came exactly where due (whatever this machine's speed made of the totals)
    due, fitted, last = [], plan.first_total, 40
    for step in range(41, total + 1):
        if budget.refit_due(step, 40, fitted, len(due), last):
            due.append(step)
            fitted, last = dict(plan.refits)[step], step
    assert plan.timed_until == 40 and [at for at, _ in plan.refits] == due
    assert fitted == total and (len(due) >= 1 or plan.first_total - 40 < 8 * 5)  # a re-timing if there was room
    assert {len(v) for v in run.schedules.values()} == {total}
    expected = build_schedules(run.cfg, STEPS_PER_EPOCH, run.plan.global_batch, plan.first_total, hold_until=40)
    for at, fitted in plan.refits:
        assert fitted > at and np.array_equal(stretch(expected, at, fitted)["lr"][:at], expected["lr"][:at])
        expected = stretch(expected, at, fitted)
    assert all(np.array_equal(run.schedules[k], expected[k]) for k in expected)
    assert run.stepper.schedules is run.schedules
    assert all(m["lr"] == expected["lr"][m["step"] - 1] and m["wd"] == expected["wd"][m["step"] - 1]
               for m in out["history"])  # before the fix too
    assert np.all(expected["lr"][16:41] == expected["lr"][16]) and expected["lr"][41] < expected["lr"][16]
    assert np.all(np.diff(expected["lr"][40:]) <= 0)  # one cosine, stretched or squeezed, never bumped
    last = out["history"][-1]
    peak, floor, n = expected["lr"][16], run.cfg.optim.min_lr, plan.first_total - 40  # the cosine's last step
    assert last["lr"] == expected["lr"][-1] == pytest.approx(floor + (peak - floor) * (1 + np.cos(np.pi * (n - 1) / n)) / 2)
    assert last["momentum"] == expected["momentum"][-1]
    fits = [(m, s) for m, s in reports if s is not None and s["step"] in {40, *(at for at, _ in plan.refits)}]
    assert [s["step"] for _, s in fits] == [40, *(at for at, _ in plan.refits)]
    assert fits[0][1]["budget"]["total_steps"] == plan.first_total and fits[-1][1]["total_steps"] == total
    assert lines[[i for i, line in enumerate(lines) if "budget 8s:" in line][0]].startswith(
        f"[rayssl] budget 8s: {plan.first_total:,} steps")
    assert len([line for line in lines if "re-timed at step" in line]) == len(plan.refits)
    import mlflow

    mlflow_run = run.mlflow.mlflow_run
    assert mlflow.MlflowClient(mlflow_run.uri).get_run(mlflow_run.run_id).data.params["train.total_steps"] == str(total)


@pytest.mark.xdist_group("budgeted")  # one worker runs the shared 8-s run (make test-fast: --dist loadgroup)
def test_resumed_budget_run_keeps_the_recorded_total(data, budgeted) -> None:
    """Restored from the checkpoint where the total was fixed, the run keeps it and never times
    steps again, whatever budget it is relaunched with and however fast this launch runs (the
    checkpoint is edited to hold a total this machine could not reach in the budget)."""
    state = copy.deepcopy([s for _, s in budgeted[2] if s is not None and s["step"] == 40][0])
    state["budget"]["total_steps"] = state["budget"]["first_total"] = state["total_steps"] = 60
    for budget in ("1h", "0.2s"):
        run, out, _, lines = budget_run(data, f"train.time_budget={budget}", restore_from=copy.deepcopy(state))
        assert run.total_steps == 60 == out["history"][-1]["step"] and out["budget"]["total_steps"] == 60
        assert {len(v) for v in run.schedules.values()} == {60}
        assert not any("buys" in line or line.startswith("[rayssl] budget") for line in lines)


def test_budget_too_short_for_the_warmup_stops_with_one_line(data) -> None:
    run, out, reports, _ = budget_run(data, "train.time_budget=0.05s")
    assert out["stopped"] == "budget" and "knn/teacher" not in out and "train_seconds" not in out
    reason = out["stop_reason"]
    assert "\n" not in reason and reason.startswith("train.time_budget: 0.05s buys")
    assert "16 steps of optim.warmup_epochs" in reason
    assert run.step == 40 and all(state is None for _, state in reports)


def test_job_budget_subtracts_the_start_up_and_keeps_the_final_knn_back(data) -> None:
    """``train.time_budget_scope=job``: the job started 2 s before the run (its start-up); the
    baselines' k-NN time is kept back for the final k-NN; the total fits what is left, and the
    run ends (final k-NN included) within the budget from the job's start."""
    started = time.time() - 2.0
    run, out, _, lines = budget_run(data, "train.time_budget=10s", "train.time_budget_scope=job", knn=True,
                                    job_started=started)
    plan = BudgetPlan(**out["budget"])
    assert plan.scope == "job" and plan.outside_seconds >= 2.0 + out["baseline_seconds"]
    assert plan.reserve_seconds == out["baseline_seconds"] > 0
    assert any(line.endswith("kept for the final k-NN") and "for the job" in line for line in lines)
    assert run.total_steps == out["history"][-1]["step"] < 800 and "knn/teacher" in out
    assert time.time() - started < 10.0 * 1.5  # the budget's margin and one window's rate error


def test_job_budget_spent_before_training_is_one_line(data) -> None:
    run, out, _, _ = budget_run(data, "train.time_budget=30s", "train.time_budget_scope=job",
                                job_started=time.time() - 40.0)
    assert out["stopped"] == "budget" and "\n" not in out["stop_reason"]
    assert re.match(r"train\.time_budget: 30s buys 0 steps besides 0\.[67] min of start-up and evaluation",
                    out["stop_reason"])


@pytest.mark.slow  # a real mlflow server, stopped mid-run
def test_a_failed_run_keeps_what_mlflow_did_not_take(data, tmp_path) -> None:
    """A run that stops FAILED (here: a budget too short) while its MLflow server does not answer
    leaves its undelivered points in the run folder for ``jobs/sync_tracking.py``, without a
    status (the driver marks the run FAILED)."""
    import socket

    from rayssl.tracking_backlog import DIR, RunFolder

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reports: list = []
    w = worker(data, reports, knn=False)
    lines: list = []
    cfg = config("train.epochs=100", "optim.warmup_epochs=2", "train.time_budget=0.05s")
    w.say, folder = lines.append, RunFolder(None, str(tmp_path / "run"), str(tmp_path / "run"))
    w.mlflow = RunLogger(MlflowRun(f"http://127.0.0.1:{port}", "0" * 32), lines.append, run_folder=folder,
                         model_config=cfg.model.model_dump())
    w.mlflow.retry_seconds = 3600  # no retry during the run: everything waits for the end
    run = TrainRun(cfg, META, STEPS_PER_EPOCH, w)
    out = run.run()
    assert out["stopped"] == "budget"
    kept = [p for p in (tmp_path / "run" / DIR).iterdir() if p.suffix == ".jsonl"]
    assert len(kept) == 1 and any("jobs/sync_tracking.py" in line for line in lines)
    entries = [json.loads(line) for line in kept[0].read_text().splitlines()[1:]]
    assert {e.get("step") for e in entries if e["kind"] == "metrics"} == set(range(4, 40, 4))  # the stop came at step 40
    assert not any(e["kind"] == "status" for e in entries)


def test_a_refused_checkpoint_ends_the_run_before_its_first_step(data) -> None:
    """A checkpoint holding pickled objects (``UnsafeCheckpoint`` from ``Worker.restore``) stops
    the run FAILED with the refusal's line, before any step, baseline or report of a state: the
    driver raises it as one line instead of Ray restarting the workers into it again."""
    from rayssl.checkpoint import UnsafeCheckpoint
    from rayssl.train.saves import FAILED_STOPS

    line = "/runs/r/checkpoint_1/checkpoint.pt: refused, not loaded: it holds pickled objects (posix.system)"

    def refuse(say):
        raise UnsafeCheckpoint(line)

    reports: list = []
    w = worker(data, reports)
    w.restore, w.mlflow = refuse, FakeLogger()
    out = TrainRun(config(), META, STEPS_PER_EPOCH, w).run()
    assert out["stopped"] == "unsafe_checkpoint" in FAILED_STOPS and out["stop_reason"] == line
    assert out["history"] == [] and "knn/raw_pixels" not in out and "knn/teacher" not in out
    assert [state for _, state in reports] == [None]
    assert w.mlflow.names() == ["tag", "end"] and w.mlflow.calls[0][1] == ("rayssl.stopped", line)
