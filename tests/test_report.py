"""The final report (``rayssl.report``) and its ``report.md`` artifact, without Ray."""

from __future__ import annotations

import math
from pathlib import Path

from rayssl import report, tracking
from rayssl.config import load_config
from rayssl.monitor import CollapseAlarm

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "/root/rayssl_results/demo"


def step(n: int, images_per_second: float, **extra: float) -> dict:
    """A logged step as ``TrainRun._metrics`` writes it (the keys the report reads)."""
    return {"step": n, "epoch": n / 234, "loss": 5.1, "images_per_second": images_per_second, "world_size": 2,
            "norm/mutual_information": 3.245, "norm/marginal_entropy": 5.404, "norm/conditional_entropy": 2.159,
            "norm/effective_clusters": 222.26, "norm/unused_clusters": 31.0, "kl_teacher_student": 0.421, **extra}


def results(**extra) -> dict:
    return {"knn/raw_pixels": 0.8459, "knn/random_init": 0.8362, "knn/teacher": 0.8736, "train_seconds": 600.0,
            "eval_seconds": 60.0, "run_path": FOLDER, "mlflow_run_id": "abc",
            "history": [step(20, 400.0), step(40, 1100.0), step(60, 900.0), step(80, 1000.0, loss=4.9)], **extra}


def config(*overrides: str) -> dict:
    return load_config(None, ["run.name=demo", *overrides]).redacted()


def test_report_has_knn_against_baselines_time_split_throughput_diagnostics_and_next_command() -> None:
    text = report.render(results(), config(), wall_seconds=724.0, run_folder=FOLDER,
                         mlflow_hint="MLflow run abc (experiment 1): mlflow ui --backend-store-uri sqlite:///x.db")
    print(text)
    assert text.startswith("# rayssl run demo\n\n`objective.mode=prior`, K = 256, convnet4, 2 worker(s), step 80")
    assert "| raw pixels | 84.59 % |" in text and "| **teacher, end of training** | **87.36 %** |" in text
    assert "(raw pixels): +2.77 points" in text  # against the better of the two baselines
    assert "weighted 20-NN" in text and "not measured" not in text
    # 724 s of wall time: 600 training, 60 evaluation, the other 64 start-up and wrap-up
    assert "| start-up and wrap-up (Ray, workers, the data stream's first batch, MLflow) | 1 min 04 s | 9% |" in text
    assert "| training (online k-NN included) | 10 min 00 s | 83% |" in text
    assert "| **total wall time** | **12 min 04 s** | |" in text
    assert "950 images/s (median over 4 logged steps)" in text
    assert "| loss (`loss`) | 4.900 |" in text  # the last logged step
    assert "| effective clusters exp H(K) (`norm/effective_clusters`) | 222.3 |" in text
    assert f"log K = {math.log(256):.2f} nats" in text
    assert f"python jobs/evaluate.py --checkpoint {FOLDER}" in text
    assert "mlflow ui --backend-store-uri sqlite:///x.db" in text
    assert "Stopped" not in text and "Collapse" not in text


def test_missing_baselines_unlabelled_data_and_missing_timings_are_said() -> None:
    partial = results()
    del partial["knn/raw_pixels"], partial["eval_seconds"]
    text = report.render(partial, config("eval.knn_k=10"), wall_seconds=700.0, run_folder=FOLDER)
    assert "weighted 10-NN" in text
    assert "| raw pixels | not measured |" in text and "A baseline is missing" in text
    assert "(the same network at random init (step 0)): +3.74 points" in text
    assert "| evaluation (k-NN baselines and final k-NN) | 0.0 s | 0% |" in text

    unlabelled = {k: v for k, v in results().items() if not k.startswith("knn/")}
    text = report.render(unlabelled, config(), wall_seconds=None, run_folder=None)
    assert "## k-NN\n\nNot measured: it needs labelled" in text
    assert "Training 10 min 00 s, evaluation 1 min 00 s." in text
    assert "jobs/evaluate.py" not in text  # no folder, no command to run on it


def test_a_collapsed_run_says_so_stopped_or_not() -> None:
    alarm = CollapseAlarm.of(load_config(None, ["monitor.patience=2"]).monitor)
    history = [step(n, 1000.0, **{"norm/effective_clusters": 2.3, "norm/mutual_information": 0.8}) for n in (20, 40)]
    collapse = [alarm.observe(m["step"], m) for m in history][-1]
    stopped = report.render(results(history=history, stopped="collapse", stop_reason=collapse, collapse=collapse),
                            config(), wall_seconds=724.0, run_folder=FOLDER)
    assert f"**Stopped early (collapse)**: {collapse}" in stopped
    assert "monitor.min_effective_clusters=7" in stopped and "Collapse alarm" not in stopped
    assert "| effective clusters exp H(K) (`norm/effective_clusters`) | 2.3 |" in stopped

    warned = report.render(results(history=history, collapse=collapse), config(), wall_seconds=724.0)
    assert f"**Collapse alarm** (training went on: `monitor.stop_on_collapse=false`): {collapse}" in warned
    resumed = report.render(results(resumed_from_step=400), config(), wall_seconds=724.0)
    assert "Resumed from the checkpoint of step 400" in resumed


def test_report_carries_no_secret() -> None:
    cfg = config("data.access_key_id=AKIAEXAMPLE", "data.secret_access_key=s3cr3t-key",
                 "tracking.uri=http://user:pa55word@mlflow:5000")
    hint = tracking.ui_hint(tracking.MlflowRun("http://user:pa55word@mlflow:5000", "abc", "1"))
    text = report.render(results(), cfg, wall_seconds=724.0, run_folder=FOLDER, mlflow_hint=hint)
    assert "user:***@mlflow" in text
    assert not any(secret in text for secret in ("pa55word", "s3cr3t-key", "AKIAEXAMPLE"))


def test_report_md_is_logged_to_an_ended_run_by_id(tmp_path) -> None:
    """A real SQLite store: the run rank 0 ended stays FINISHED and gets ``report.md``."""
    from mlflow import MlflowClient

    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "run.name=demo"])
    mlflow_run = tracking.start(cfg, str(tmp_path / "demo"))
    client = MlflowClient(mlflow_run.uri)
    client.set_terminated(mlflow_run.run_id, status="FINISHED")
    text = report.render(results(), cfg.redacted(), wall_seconds=724.0, run_folder=FOLDER)

    assert tracking.log_report(mlflow_run.uri, mlflow_run.run_id, text)
    run = client.get_run(mlflow_run.run_id)
    assert run.info.status == "FINISHED"
    path = client.download_artifacts(mlflow_run.run_id, "report.md", str(tmp_path))
    assert open(path).read() == text

    missing = tmp_path / "none" / "mlflow.db"
    assert not tracking.log_report(f"sqlite:///{missing}", mlflow_run.run_id, text)
    assert not missing.parent.exists()  # a wrong store is reported, not created


def test_pretrain_job_prints_and_logs_the_report_with_the_folder_evaluate_takes(tmp_path) -> None:
    """``jobs/pretrain.py``'s ``final_report`` on a finished run's results: local runs name Ray's
    run folder; s3:// runs the URI ``jobs/evaluate.py --checkpoint`` takes (Ray's path has no scheme)."""
    import importlib.util

    from mlflow import MlflowClient

    spec = importlib.util.spec_from_file_location("pretrain_job", ROOT / "jobs/pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "run.name=demo"])
    mlflow_run = tracking.start(cfg, str(tmp_path / "demo"))
    text = job.final_report(cfg, results(mlflow_run_id=mlflow_run.run_id), 724.0)
    assert f"python jobs/evaluate.py --checkpoint {FOLDER}\n" in text
    path = MlflowClient(mlflow_run.uri).download_artifacts(mlflow_run.run_id, "report.md", str(tmp_path))
    assert open(path).read() == text

    s3 = load_config(None, ["run.storage_path=s3://bucket/runs/", "run.name=demo", "tracking.enabled=false"])
    untracked = {k: v for k, v in results(run_path="bucket/runs/demo").items() if k != "mlflow_run_id"}
    assert "python jobs/evaluate.py --checkpoint s3://bucket/runs/demo\n" in job.final_report(s3, untracked, 724.0)


def test_figures_section_links_what_the_run_logged() -> None:
    """With MLflow: the curves, the first and last epochs' cluster plots and the galleries, as links
    relative to the artifact root; without the galleries when they are off or the run stopped early,
    and no section without MLflow (test_evaluate checks every link against a real run's artifacts)."""
    hint = "MLflow run abc (experiment 1): mlflow ui --backend-store-uri sqlite:///x.db"
    long_run = results(history=[step(234 * 3 + 5, 900.0)])
    text = report.render(long_run, config(), 724.0, FOLDER, hint)
    assert "- [training curves: loss, schedules, diagnostics](plots/training_curves.png)" in text
    assert "(plots/cluster_prior/epoch_001.png)" in text and "(plots/cluster_usage/epoch_003.png)" in text
    assert "epoch_002" not in text
    assert "[clusters x classes](plots/clusters/cluster_class_map.png)" in text
    assert "plots/clusters/" not in report.render(long_run, config("eval.gallery_clusters=0"), 724.0, FOLDER, hint)
    assert "plots/clusters/" not in report.render(results(stopped="nonfinite"), config(), 724.0, FOLDER, hint)
    assert "## Figures" not in report.render(long_run, config(), 724.0, FOLDER)
