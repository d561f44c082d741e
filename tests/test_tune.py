"""Sweeps: the space is checked before any trial; a real 2-trial Tune + Train sweep with ASHA,
MLflow parent and child runs, and a best config that runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rayssl.config import ConfigError, load_config
from rayssl.tune import load_sweep, sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data.train_limit": 1024, "data.eval_limit": 256, "eval.knn_train_limit": 1024, "eval.baselines": False,
        "model.width": 8, "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
        "objective.num_clusters": 32, "train.batch_size": 32, "train.steps_per_epoch": 6, "train.epochs": 3,
        "train.log_every": 2, "train.checkpoint_every": 6, "optim.warmup_epochs": 0, "eval.gallery_clusters": 0,
        "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5}


def space_file(tmp_path: Path, space: dict, sweep_section: dict | None = None, fixed: dict | None = None) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"sweep": sweep_section or {}, "fixed": fixed or {}, "space": space}))
    return path


@pytest.mark.parametrize("space, message", [
    ({"objective.num_cluster": {"choice": [64, 128]}},
     "space.objective.num_cluster: unknown key (did you mean objective.num_clusters?)"),
    ({"objective.mode": {"choice": []}}, "space.objective.mode: choice needs a non-empty list of values"),
    ({"objective.teacher_temperature": {"uniform": [-0.1, 0.1]}},
     "space.objective.teacher_temperature: uniform [-0.1, 0.1]: objective.teacher_temperature: "
     "Input should be greater than 0"),
    ({"objective.teacher_temperature": {"loguniform": [0.0, 0.1]}},
     "space.objective.teacher_temperature: loguniform needs 0 < low"),
    ({"objective.num_clusters": {"randint": [512, 256]}}, "space.objective.num_clusters: randint needs [low, high]"),
    ({"objective.mode": {"choice": ["prior", "centre"]}}, "space.objective.mode: choice ['prior', 'centre']: "
     "objective.mode: Input should be"),
    ({"objective.alpha": {"normal": [0, 1]}}, "space.objective.alpha: expected one of choice, grid"),
    ({}, "space: needs at least one entry"),
])
def test_invalid_space_is_one_clear_line(tmp_path, space: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_sweep(space_file(tmp_path, space), None)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_invalid_sweep_settings_and_cli_fail_before_any_trial(tmp_path) -> None:
    good = {"objective.alpha": {"uniform": [0.5, 1.0]}}
    with pytest.raises(ConfigError, match=r"^sweep.num_sample: unknown key \(did you mean sweep.num_samples\?\)"):
        load_sweep(space_file(tmp_path, good, {"num_sample": 3}), None)
    with pytest.raises(ConfigError, match=r"^sweep.reduction_factor: Input should be greater than 1"):
        load_sweep(space_file(tmp_path, good), None, ["sweep.reduction_factor=1"])
    sweeps = tmp_path / "sweeps"
    bad = space_file(tmp_path, {"objective.teacher_temperature": {"uniform": [-0.1, 0.1]}},
                     {"storage_path": str(sweeps)})
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/sweep.py"), "--space", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: space.objective.teacher_temperature: uniform [-0.1, 0.1]")
    assert not sweeps.exists()  # nothing started, nothing written


@pytest.mark.parametrize("space", sorted((ROOT / "configs/sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_space_files_load(space) -> None:
    settings, base, checked = load_sweep(space, ROOT / "configs/fashion_mnist.yaml")
    assert checked and all(key in base.flat() for key in checked)


def test_a_sweeps_budget_covers_training_unless_the_space_says(tmp_path) -> None:
    """The default config's budget covers the job; a sweep's trials compare training time."""
    space, fixed = {"objective.teacher_temperature": {"uniform": [0.02, 0.08]}}, {"train.time_budget": "5m"}
    _, base, _ = load_sweep(space_file(tmp_path, space, fixed=fixed), ROOT / "configs/fashion_mnist.yaml")
    assert (base.train.time_budget, base.train.time_budget_scope) == ("5m", "training")
    _, base, _ = load_sweep(space_file(tmp_path, space, fixed={**fixed, "train.time_budget_scope": "job"}),
                            ROOT / "configs/fashion_mnist.yaml")
    assert base.train.time_budget_scope == "job"


def test_trials_log_to_the_base_store_and_evaluate_as_often_as_asked(tmp_path) -> None:
    from rayssl.tracking import default_uri
    from rayssl.tune import trial_config

    base = load_config(None, [f"run.storage_path={tmp_path}", "train.epochs=2"])
    trial = trial_config(base, {"objective.mode": "center"}, "t1", str(tmp_path / "sweeps/s/trials"), "knn/teacher", 4)
    assert trial.tracking.uri == default_uri(str(tmp_path)) and trial.run.name == "t1"
    assert trial.objective.mode == "center" and trial.eval.every_epochs == 0.5
    assert trial.run.storage_path == str(tmp_path / "sweeps/s/trials")


def test_concurrency_fits_trials_in_the_cluster() -> None:
    """Each trial holds its workers, its driver (sweep.trial_cpu) and one CPU for Ray Data."""
    from rayssl.tune import SweepConfig, default_concurrency

    base = load_config(None, ["scaling.num_workers=1", "scaling.cpus_per_worker=0.5"])
    sweep_settings = SweepConfig(trial_cpu=0.1)
    assert default_concurrency(base, sweep_settings, {"CPU": 4.0}) == 2  # 4 // (0.5 + 0.1 + 1)
    assert default_concurrency(base, sweep_settings, {"CPU": 1.0}) == 1  # never 0
    gpu = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.use_gpu=true"])
    assert default_concurrency(gpu, sweep_settings, {"CPU": 64.0, "GPU": 4.0}) == 2  # the GPUs bind first
    elastic = load_config(None, ["scaling.num_workers=[1,2]", "scaling.cpus_per_worker=0.5"])
    assert default_concurrency(elastic, sweep_settings, {"CPU": 4.0}) == 1  # a trial holds its max: 4 // 2.1


def test_two_trial_sweep_with_asha_mlflow_and_a_runnable_best_config(ray_cluster, shard_cache, tmp_path) -> None:
    """One trial at a time (1 worker each): the width-8 ConvNet sets the bar at the first k-NN
    evaluation, and the 1-channel-wide one is the arm ASHA must stop there."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    fixed = {**TINY, **dict(o.split("=", 1) for o in shard_cache), "tracking.uri": uri, "tracking.experiment": "sweep-test",
             "tracking.log_model": False, "run.storage_path": str(tmp_path / "runs"), "train.epochs": 2,
             "scaling.num_workers": 1, "eval.knn_train_limit": 512}
    path = space_file(tmp_path, {"model.width": {"grid": [8, 1]}, "objective.mode": {"choice": ["prior", "center"]},
                                 "objective.teacher_temperature": {"loguniform": [0.02, 0.08]}},
                      {"name": "tiny", "num_samples": 1, "evaluations": 2, "time_budget_s": 900, "seed": 0,
                       "max_concurrent_trials": 1, "storage_path": str(tmp_path / "sweeps")}, fixed)
    settings, base, space = load_sweep(path, ROOT / "configs/fashion_mnist.yaml")
    summary = sweep(base, settings, space)

    table = summary["table"]
    assert summary["num_trials"] == 2 and list(table["model.width"]) == [8, 1], table.to_string()
    assert summary["metric"] == "knn/teacher" and 0.1 < summary["best_value"] <= 1
    assert summary["max_concurrent_trials"] == 1
    stopped = table[table["stopped"] != ""]
    finished = table[table["stopped"] == ""]
    assert list(stopped["model.width"]) == [1] and (stopped["stopped"] == "early").all(), table.to_string()
    assert (stopped["reports"] < 2).all() and (finished["reports"] == 2).all(), table.to_string()
    assert summary["best_params"]["model.width"] == 8
    folder = Path(summary["folder"])
    assert (folder / "trials.csv").exists()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    parent = client.search_runs([experiment], "tags.`rayssl.sweep` = 'tiny'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert sorted(c.data.params["model.width"] for c in children) == ["1", "8"]
    statuses = [c.info.status for c in children]  # trials Tune stopped are not left RUNNING
    assert "RUNNING" not in statuses and statuses.count("KILLED") <= len(stopped), statuses
    assert parent[0].data.metrics["best_value"] == pytest.approx(summary["best_value"])
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id)} >= {"trials.csv", "best.yaml"}

    best = load_config(folder / "best.yaml", ["train.epochs=1", "tracking.enabled=false",
                                              f"run.storage_path={tmp_path / 'best'}", "run.name=best"])
    assert best.objective.mode == summary["best_params"]["objective.mode"] and best.model.width == 8
    assert best.objective.teacher_temperature == pytest.approx(summary["best_params"]["objective.teacher_temperature"])
    assert best.run.name == "best" and best.eval.every_epochs == pytest.approx(1.0)  # a fresh run, as the trial ran
