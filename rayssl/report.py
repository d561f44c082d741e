"""The final report of a pretraining run: what a user reads when ``jobs/pretrain.py`` ends.

A pure function of what the driver already holds (no Ray, no MLflow): rank 0's results (k-NN
of the teacher and its baselines, ``train_seconds``, ``eval_seconds``, the collapse alarm or a
stop, this launch's metric ``history``), the redacted config, the driver's wall time and the
paths. The same markdown is printed and logged to the MLflow run as ``report.md``, so the
numbers that decide whether a run worked, where its time went and what to run next sit in one
place instead of scattered over the console.
"""

from __future__ import annotations

import math
import statistics

from rayssl.train.budget import BudgetPlan

BASELINES = (("raw_pixels", "raw pixels"), ("random_init", "the same network at random init (step 0)"))
DIAGNOSTICS = (  # metric of the last logged step, label, format
    ("loss", "loss", "{:.3f}"),
    ("norm/mutual_information", "I(X;K), normalised teacher", "{:.2f} nats"),
    ("norm/marginal_entropy", "H(K)", "{:.2f} nats"),
    ("norm/conditional_entropy", "H(K\\|X)", "{:.2f} nats"),  # a pipe escaped for a markdown table cell
    ("norm/effective_clusters", "effective clusters exp H(K)", "{:.1f}"),
    ("norm/unused_clusters", "unused clusters (argmax of no image in the batch)", "{:.0f}"),
    ("kl_teacher_student", "KL(teacher \\|\\| student)", "{:.3f}"),
)


def render(results: dict, config: dict, wall_seconds: float | None = None, run_folder: str | None = None,
           mlflow_hint: str | None = None, backlog: str | None = None) -> str:
    """The report as markdown.

    ``results``: what ``rayssl.train.launch.fit`` returns (``history`` included); ``config``: the
    redacted config (``Config.redacted()``: secrets already masked); ``wall_seconds``: the
    driver's time from start to now; ``run_folder``: where the checkpoints are (what
    ``jobs/evaluate.py --checkpoint`` takes); ``mlflow_hint``: ``rayssl.tracking.ui_hint``;
    ``backlog``: the run folder, when it holds what MLflow did not take (``rayssl.tracking_backlog``).
    """
    objective, history = config["objective"], results.get("history") or []
    title = (f"# rayssl run {config['run']['name']}\n\n`objective.mode={objective['mode']}`, "
             f"K = {objective['num_clusters']}, {config['model']['backbone']}, {_workers(history, config)} worker(s)"
             + (f", step {history[-1]['step']}" if history else ""))
    sections = [title, _outcome(results, backlog), _knn(results, config), _time(results, history, wall_seconds),
                _diagnostics(history, objective["num_clusters"]), _figures(results, config, history, mlflow_hint),
                _next(run_folder, mlflow_hint)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _workers(history: list[dict], config: dict) -> str:
    if history and "world_size" in history[-1]:
        return f"{history[-1]['world_size']:.0f}"
    return str(config["scaling"]["num_workers"])


def _outcome(results: dict, backlog: str | None) -> str:
    """Whether the run ended as planned: stopped early, the collapse alarm, a resume, MLflow's backlog."""
    lines = []
    if results.get("stopped"):
        lines.append(f"**Stopped early ({results['stopped']})**: {results.get('stop_reason', '')}")
    if results.get("collapse") and results.get("stopped") != "collapse":
        lines.append(f"**Collapse alarm** (training went on: `monitor.stop_on_collapse=false`): {results['collapse']}")
    if "resumed_from_step" in results:
        lines.append(f"Resumed from the checkpoint of step {results['resumed_from_step']}; times and throughput "
                     "below are this launch's.")
    if backlog:
        lines.append(f"**MLflow backlog left**: MLflow did not answer when training ended, so what it did not take "
                     f"(metrics with their steps, params, tags, artifacts, the model, the final status) is kept in "
                     f"`{backlog}/tracking_backlog`. Deliver it into the same MLflow run with:\n\n"
                     f"```bash\npython jobs/sync_tracking.py {backlog}\n```")
    return "\n\n".join(lines)


def _knn(results: dict, config: dict) -> str:
    """The teacher's k-NN next to its baselines, and its gain over the best baseline measured."""
    if "knn/teacher" not in results:
        return "## k-NN\n\nNot measured: it needs labelled `data.source` and `data.eval_source` shards."
    e = config["eval"]
    rows = [f"## k-NN (weighted {e['knn_k']}-NN, top-1, `data.eval_source` queries)", "",
            "| features | top-1 |", "|---|---|"]
    measured = {key: results[f"knn/{key}"] for key, _ in BASELINES if f"knn/{key}" in results}
    for key, label in BASELINES:
        rows.append(f"| {label} | {_pct(measured[key]) if key in measured else 'not measured'} |")
    teacher = results["knn/teacher"]
    rows.append(f"| **teacher, end of training** | **{_pct(teacher)}** |")
    if measured:
        name, best = max(measured.items(), key=lambda kv: kv[1])
        rows += ["", f"Teacher vs the best baseline ({dict(BASELINES)[name]}): {100 * (teacher - best):+.2f} points."]
    if len(measured) < len(BASELINES):
        rows += ["", "A baseline is missing: `eval.baselines=false`, or a resumed run whose first launch "
                 "skipped it; `jobs/evaluate.py` measures both."]
    return "\n".join(rows)


def _time(results: dict, history: list[dict], wall: float | None) -> str:
    """Wall time split into start-up/wrap-up, training and evaluation; images per second."""
    train, evaluation = results.get("train_seconds"), results.get("eval_seconds")
    rows = ["## Time", ""]
    if wall is not None and train is not None:
        evaluation = evaluation or 0.0
        other = max(wall - train - evaluation, 0.0)
        rows += ["| where | time | share |", "|---|---|---|"]
        for label, seconds in (("start-up and wrap-up (Ray, workers, the data stream's first batch, MLflow)", other),
                               ("training (online k-NN included)", train),
                               ("evaluation (k-NN baselines and final k-NN)", evaluation)):
            rows.append(f"| {label} | {_duration(seconds)} | {seconds / wall:.0%} |")
        rows.append(f"| **total wall time** | **{_duration(wall)}** | |")
    elif train is not None:
        rows.append(f"Training {_duration(train)}, evaluation {_duration(evaluation or 0.0)}.")
    speeds = [m["images_per_second"] for m in history if math.isfinite(m.get("images_per_second", math.nan))]
    if speeds:
        rows += ["", f"Throughput: {statistics.median(speeds):,.0f} images/s (median over {len(speeds)} logged steps)."]
    if results.get("budget"):
        rows += ["", f"`train.time_budget`: {_budget_line(results['budget'])}."]
    return "\n".join(rows) if len(rows) > 2 else ""


def _budget_line(budget: dict) -> str:
    """What the budget bought (``rayssl.train.budget.BudgetPlan.line``), planned at the measured rate."""
    plan = BudgetPlan(**budget)
    return plan.line() + ("; raise train.epochs to train the whole budget" if plan.capped else "")


def _diagnostics(history: list[dict], num_clusters: int) -> str:
    """docs/theory.md §6 at the last logged step."""
    if not history:
        return ""
    last = history[-1]
    rows = [f"## Diagnostics at the last logged step ({last['step']}, epoch {last.get('epoch', math.nan):.2f})",
            "", "| metric | value |", "|---|---|"]
    for key, label, fmt in DIAGNOSTICS:
        if key in last:
            rows.append(f"| {label} (`{key}`) | {fmt.format(last[key])} |")
    rows += ["", f"Ceiling for both entropies and I(X;K): log K = {math.log(num_clusters):.2f} nats; "
             "I(X;K) near 0 or a few effective clusters means collapse (docs/theory.md §6)."]
    return "\n".join(rows)


def _figures(results: dict, config: dict, history: list[dict], mlflow_hint: str | None) -> str:
    """Links to the figures the run logged to MLflow, relative to the run's artifact root (where
    ``report.md`` is): the training curves, the first and last epochs' cluster plots and, after a
    final k-NN, what the clusters hold (``eval.gallery_clusters``)."""
    if mlflow_hint is None:
        return ""
    rows = ["## Figures (MLflow artifacts of this run)", "",
            "- [training curves: loss, schedules, diagnostics](plots/training_curves.png)"]
    epochs = int(history[-1]["epoch"] + 1e-9) if history and "epoch" in history[-1] else 0
    for epoch in sorted({1, epochs}) if epochs else ():
        rows.append(f"- epoch {epoch}: [teacher cluster prior](plots/cluster_prior/epoch_{epoch:03d}.png), "
                    f"[images per cluster](plots/cluster_usage/epoch_{epoch:03d}.png)")
    if "knn/teacher" in results and config["eval"].get("gallery_clusters") and not results.get("stopped"):
        rows.append("- what the clusters hold: [most-used clusters](plots/clusters/gallery_top.png), "
                    "[least-used clusters](plots/clusters/gallery_tail.png), "
                    "[clusters x classes](plots/clusters/cluster_class_map.png)")
    return "\n".join(rows)


def _next(run_folder: str | None, mlflow_hint: str | None) -> str:
    rows = ["## Where it is, what next", ""]
    if run_folder:
        rows.append(f"- checkpoints: `{run_folder}`")
    if mlflow_hint:
        rows.append(f"- {mlflow_hint}")
    if run_folder:
        rows.append(f"- linear probe, cluster quality and both baselines on the whole evaluation set (joins the "
                    f"MLflow run):\n\n  ```bash\n  python jobs/evaluate.py --checkpoint {run_folder}\n  ```")
    return "\n".join(rows) if len(rows) > 2 else ""


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"
