"""rayssl.compare and jobs/compare.py against a real MLflow SQLite store (no Ray)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from rayssl.compare import CompareError, comparison_plot, runs_table

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("jobs_compare", ROOT / "jobs" / "compare.py")
_JOB = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_JOB)
main = _JOB.main

# run name -> (mode, K, terminal status or None for RUNNING, {metric: [value per step 0, 1, 2]})
RUNS = {
    "center-a": ("center", 256, "FINISHED", {"loss": [5.0, 4.0, 3.5], "norm/mutual_information": [0.1, 0.5, 0.9],
                                             "norm/effective_clusters": [10.0, 30.0, 50.0],
                                             "knn/teacher": [0.3, 0.5, 0.6]}),
    "prior-b": ("prior", 1024, "FINISHED", {"loss": [6.0, 5.0, 4.2], "norm/mutual_information": [0.2, 1.0, 2.0],
                                           "norm/effective_clusters": [100.0, 400.0, 800.0],
                                           "knn/teacher": [0.4, 0.7, 0.8], "linear/top1": [0.85]}),
    "none-c": ("none", 256, None, {"loss": [5.0, 4.9, 4.8], "norm/mutual_information": [0.05, 0.01, 0.0],
                                   "norm/effective_clusters": [2.0, 1.1, 1.0]}),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store with experiment "cmp" (the three ``RUNS``) and an empty experiment "empty"."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(root / "artifacts").as_uri())
    client.create_experiment("empty", artifact_location=(root / "empty").as_uri())
    for name, (mode, k, status, metrics) in RUNS.items():
        run_id = client.create_run(exp, run_name=name, tags={"rayssl.version": "0.1.0"}).info.run_id
        for key, value in {"objective.mode": mode, "objective.num_clusters": k, "objective.teacher_temperature": 0.04,
                           "objective.student_temperature": 0.1, "model.backbone": "resnet18"}.items():
            client.log_param(run_id, key, value)
        for key, values in metrics.items():
            for step, value in enumerate(values):
                client.log_metric(run_id, key, value, step=step)
        if status:
            client.set_terminated(run_id, status)
    return uri


def test_table_rows_values_and_order(store: str) -> None:
    table = runs_table("cmp", store)
    assert list(table["run"]) == ["prior-b", "center-a", "none-c"]  # knn descending, missing last
    assert list(table["status"]) == ["FINISHED", "FINISHED", "RUNNING"]
    assert list(table["mode"]) == ["prior", "center", "none"]
    assert list(table["K"]) == [1024, 256, 256]
    assert table["T_teacher"].tolist() == [0.04] * 3 and table["T_student"].tolist() == [0.1] * 3
    assert (table["id"] == table.index.str[:8]).all()
    for run_id, row in table.iterrows():
        metrics = RUNS[row["run"]][3]
        for column, key in [("loss", "loss"), ("I(X;K)", "norm/mutual_information"),
                            ("eff_clusters", "norm/effective_clusters"), ("knn", "knn/teacher"),
                            ("linear", "linear/top1")]:
            expected = metrics[key][-1] if key in metrics else np.nan
            np.testing.assert_equal(row[column], expected, err_msg=f"{row['run']} {column}")


def test_filter_selects_runs(store: str) -> None:
    assert list(runs_table("cmp", store, "params.objective.num_clusters = '256'")["run"]) == ["center-a", "none-c"]


def test_errors(store: str, tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="experiments: Default, cmp, empty"):
        runs_table("nope", store)
    with pytest.raises(CompareError, match="has no runs matching"):
        runs_table("cmp", store, "params.objective.mode = 'sinkhorn'")
    with pytest.raises(CompareError, match="no MLflow store"):
        runs_table("cmp", f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_plot_is_a_png(store: str, tmp_path: Path) -> None:
    table = runs_table("cmp", store)
    path = tmp_path / "compare.png"
    assert comparison_plot(table, path, store, max_runs=2) == 2
    assert comparison_plot(table, path, store) == 3
    assert path.read_bytes().startswith(b"\x89PNG") and imread(path).shape[0] > 0


def test_cli(store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, csv = tmp_path / "out.png", tmp_path / "runs.csv"
    assert main(["cmp", "--tracking-uri", store, "--output", str(png), "--csv", str(csv), "--max-runs", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "id", "status", "mode"]
    assert [line.split()[0] for line in lines[1:4]] == ["prior-b", "center-a", "none-c"]
    assert f"plot (2 of 3 runs): {png}" in out and f"csv: {csv}" in out
    assert f"mlflow ui --backend-store-uri {store}" in out
    assert imread(png).size > 0
    back = pd.read_csv(csv, index_col="run_id", dtype={"id": str})
    pd.testing.assert_frame_equal(back, runs_table("cmp", store), check_dtype=False)


@pytest.mark.parametrize("args, message", [
    (["nope"], "error: no experiment 'nope' in sqlite:"),
    (["empty"], "error: experiment 'empty' has no runs"),
    (["cmp", "--filter", "params.objective.mode =="], "error: "),
])
def test_cli_errors_exit_2(store: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--tracking-uri", store])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_help() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "compare.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--filter" in out and "--max-runs" in out and "differ in one knob" in out


def test_mlflow_client_makes_the_sqlite_folder_or_refuses_a_missing_store(tmp_path: Path) -> None:
    from rayssl.mlflow_client import mlflow_client

    uri = f"sqlite:///{tmp_path / 'new' / 'store' / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError, match="mlflow.db"):
        mlflow_client(uri, create=False)
    assert not (tmp_path / "new").exists()
    assert mlflow_client(uri).tracking_uri == uri and (tmp_path / "new" / "store").is_dir()


def test_one_figure_of_several_runs_side_by_side(store: str, tmp_path: Path, capsys) -> None:
    """``--figure``: the PNG artifact of each run that logged it (best knn first), at its own pixel
    size; a run without it is left out; none with it is one line, exit 2."""
    from PIL import Image

    client = MlflowClient(store)
    table = runs_table("cmp", store)
    colours = {"prior-b": ((200, 0, 0), (60, 40)), "center-a": ((0, 0, 200), (50, 30))}  # (RGB, (width, height))
    for run_id, row in table.iterrows():
        if row["run"] in colours:
            rgb, size = colours[row["run"]]
            folder = tmp_path / row["run"] / "plots" / "clusters"
            folder.mkdir(parents=True)
            Image.new("RGB", size, rgb).save(folder / "map.png")
            client.log_artifact(run_id, str(folder / "map.png"), "plots/clusters")
    out = tmp_path / "side.png"
    assert main(["cmp", "--tracking-uri", store, "--figure", "plots/clusters/map.png", "--output", str(out)]) == 0
    assert "plots/clusters/map.png of 2 runs side by side (prior-b, center-a)" in capsys.readouterr().out
    image = imread(out)[..., :3]
    assert image.shape[1] == 110  # 60 + 50 px, nothing resampled
    row = image[-15]  # below the titles, inside both images
    assert np.isclose(row[:60], [200 / 255, 0, 0], atol=0.01).all(axis=1).mean() > 0.9
    assert np.isclose(row[60:], [0, 0, 200 / 255], atol=0.01).all(axis=1).mean() > 0.9
    with pytest.raises(SystemExit) as exit_:
        main(["cmp", "--tracking-uri", store, "--figure", "plots/nothing.png", "--output", str(out)])
    assert exit_.value.code == 2
    assert "none of the 3 runs has the artifact 'plots/nothing.png'" in capsys.readouterr().err
