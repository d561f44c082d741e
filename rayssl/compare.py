"""Compare the rayssl runs of one MLflow experiment: a table and a plot, read-only.

- ``runs_table``: one row per run (its knobs, final metrics, k-NN), best k-NN first.
- ``comparison_plot``: loss and I(X;K) curves of the table's first runs, and their k-NN, as a PNG;
- ``side_by_side``: one PNG artifact of the table's first runs (e.g. the cluster x class maps of
  ``prior`` and ``center``), next to each other at their own pixel size.

Both take the tracking URI explicitly (an ``MlflowClient``), leaving MLflow's global state alone.
"""

from __future__ import annotations

import os
import tempfile

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from mlflow import MlflowClient
from mlflow.entities import Run

from rayssl.config import mask_uri
from rayssl.mlflow_client import mlflow_client

# column -> run param (logged as a string, converted to the dtype given)
PARAMS = {"mode": ("objective.mode", "string"), "K": ("objective.num_clusters", "Int64"),
          "T_teacher": ("objective.teacher_temperature", "Float64"),
          "T_student": ("objective.student_temperature", "Float64")}
# column -> metric; a run's value is MLflow's latest one, the value at its largest step
METRICS = {"loss": "loss", "I(X;K)": "norm/mutual_information",
           "eff_clusters": "norm/effective_clusters", "knn": "knn/teacher", "linear": "linear/top1"}
CURVES = {"loss": "loss", "norm/mutual_information": "I(X;K) of the teacher (nats)"}


class CompareError(LookupError):
    """The store, the experiment or its runs are not there; the message is one line."""


def _client(tracking_uri: str) -> MlflowClient:
    """A client of ``tracking_uri``; a SQLite file must exist (MLflow would create an empty one)."""
    try:
        return mlflow_client(tracking_uri, create=False)
    except FileNotFoundError as err:
        raise CompareError(f"no MLflow store at {err} (pass --tracking-uri, or set MLFLOW_TRACKING_URI)") from None


def _search(client: MlflowClient, experiment: str, filter_string: str) -> list[Run]:
    """All runs of the experiment named ``experiment`` matching ``filter_string``, newest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise CompareError(f"no experiment {experiment!r} in {mask_uri(client.tracking_uri)}; experiments: {names}")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        if not (token := page.token):
            break
    if not runs:
        matching = f" matching {filter_string!r}" if filter_string else ""
        raise CompareError(f"experiment {experiment!r} has no runs{matching}")
    return runs


def runs_table(experiment: str, tracking_uri: str, filter_string: str = "") -> pd.DataFrame:
    """One row per run of ``experiment`` (MLflow ``filter_string`` syntax), sorted by ``knn``
    descending, runs without it last (then newest first).

    Index ``run_id`` (full); columns ``run`` (name), ``id`` (first 8 characters of the run id),
    ``status``, the ``PARAMS`` and the final ``METRICS``; a missing value is NA, not an error.
    Raises ``CompareError`` for a missing store, an unknown experiment or no matching runs.
    """
    runs = _search(_client(tracking_uri), experiment, filter_string)
    table = pd.DataFrame.from_records(
        [{"run_id": r.info.run_id, "run": r.info.run_name, "id": r.info.run_id[:8], "status": r.info.status}
         | {col: r.data.params.get(key) for col, (key, _) in PARAMS.items()}
         | {col: r.data.metrics.get(key) for col, key in METRICS.items()} for r in runs],
        index="run_id")
    for col, (_, dtype) in PARAMS.items():
        values = table[col] if dtype == "string" else pd.to_numeric(table[col], errors="coerce")
        table[col] = values.astype(dtype)
    table[list(METRICS)] = table[list(METRICS)].astype(float)
    return table.sort_values("knn", ascending=False, na_position="last", kind="stable")


def _history(client: MlflowClient, run_id: str, key: str) -> pd.DataFrame:
    """Columns ``step``, ``value`` of a metric, one row per step (the latest value logged at it,
    as a resumed run logs its steps after the checkpoint again)."""
    frame = pd.DataFrame([(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)],
                         columns=["step", "timestamp", "value"])
    return frame.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last")


def comparison_plot(table: pd.DataFrame, path: str | os.PathLike[str], tracking_uri: str,
                    max_runs: int = 10) -> int:
    """Write a PNG to ``path`` of the first ``max_runs`` rows of ``runs_table``: ``loss`` and
    ``norm/mutual_information`` vs step, and a bar of ``knn`` per run (none where missing);
    one colour and legend entry "run (mode)" per run. Returns the number of runs plotted."""
    client, shown = _client(tracking_uri), table.head(max_runs)
    fig = Figure(figsize=(16, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, mi_ax, bar_ax = fig.subplots(1, 3, width_ratios=[2, 2, 1])
    colors = [f"C{i}" for i in range(len(shown))]
    for ax, (key, label) in zip((loss_ax, mi_ax), CURVES.items()):
        for run_id, color in zip(shown.index, colors):
            history = _history(client, run_id, key)
            ax.plot(history["step"], history["value"], color=color)
        ax.set(xlabel="optimizer step", ylabel=label, title=key)
    bar_ax.bar(range(len(shown)), shown["knn"], color=colors)
    bar_ax.set_xticks(range(len(shown)), shown["run"], rotation=45, ha="right")
    bar_ax.set(ylim=(0, 1), ylabel="teacher k-NN top-1", title="knn/teacher (final)")
    labels = [f"{name} ({mode})" for name, mode in zip(shown["run"], shown["mode"].fillna("?"))]
    fig.legend([Patch(color=c) for c in colors], labels, loc="outside lower center", ncols=min(len(shown), 5))
    fig.savefig(path, format="png", dpi=100)
    return len(shown)


def side_by_side(table: pd.DataFrame, artifact: str, path: str | os.PathLike[str], tracking_uri: str,
                 max_runs: int = 4) -> list[str]:
    """Write a PNG to ``path`` of the PNG artifact ``artifact`` (e.g.
    ``plots/clusters/cluster_class_map.png``) of the first ``max_runs`` rows of ``runs_table`` that
    logged it, in one row, each at its own pixel size under the title "run (mode)". Returns the
    names of the runs shown; ``CompareError`` when none of them has it."""
    from mlflow.exceptions import MlflowException

    client, shown = _client(tracking_uri), []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run_id, row) in enumerate(table.iterrows()):
            if len(shown) == max_runs:
                break
            try:
                local = client.download_artifacts(run_id, artifact, os.path.join(tmp, str(i)))
            except (MlflowException, OSError):  # this run did not log it
                continue
            shown.append((row["run"], f"{row['run']} ({row['mode'] if pd.notna(row['mode']) else '?'})", imread(local)))
    if not shown:
        raise CompareError(f"none of the {len(table)} runs has the artifact {artifact!r} "
                           "(e.g. plots/clusters/cluster_class_map.png, plots/training_curves.png)")
    title_px, dpi = 30, 100
    widths = [image.shape[1] for _, _, image in shown]
    fig = Figure(figsize=(sum(widths) / dpi, (max(image.shape[0] for _, _, image in shown) + title_px) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    left = 0
    for (_, title, image), width in zip(shown, widths):
        ax = fig.add_axes((left / sum(widths), 1 - (image.shape[0] + title_px) / (fig.get_figheight() * dpi),
                           width / sum(widths), image.shape[0] / (fig.get_figheight() * dpi)))
        ax.imshow(image, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=12)
        left += width
    fig.savefig(path, format="png", dpi=dpi)
    return [name for name, _, _ in shown]
