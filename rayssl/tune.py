"""Ray Tune sweeps: every trial is a full rayssl pretraining run (its own TorchTrainer).

A space file holds three sections, all checked before any trial starts:

    sweep:  SweepConfig (samples, concurrency, metric, ASHA, time budget)
    fixed:  {dotted.key: value} applied to the base config for every trial (shorter runs)
    space:  {dotted.key: {choice|grid|uniform|loguniform|randint|lograndint: ...}}

Trials follow the Tune + Train pattern of this Ray version: a Tune function trainable that
builds and fits a ``TorchTrainer``, whose reports reach Tune through a Train callback. ASHA
stops weak trials on ``sweep.metric`` (``knn/teacher`` with labels, else the label-free
``norm/mutual_information``); a trial stops itself on rayssl's collapse alarm (its normalised
teacher's I(X;K) stays near 0; ``monitor.*``). MLflow gets one parent run per sweep and a child run per trial.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from rayssl.config import (DEPRECATED, Config, ConfigError, _known_keys, _one_line, _warn_deprecated, load_config,
                           set_dotted)
from rayssl.schedules import knn_evaluations

if TYPE_CHECKING:
    from rayssl.tracking import MlflowRun

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "lograndint")
SWEEP_FILE = "rayssl_sweep.json"  # in the sweep folder: the MLflow parent run, for a restore


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Sweep name; rerunning an unfinished sweep's name resumes it.")
    storage_path: str = Field("~/rayssl_results/sweeps", description="Where Tune keeps the sweep (local path).")
    metric: str = Field("auto", description=(
        "Metric ASHA and the best trial use; auto: knn/teacher with labelled data, else "
        "norm/mutual_information (label-free: I(X;K) of the normalised teacher, 0 when collapsed)."))
    mode: Literal["max", "min"] = Field("max", description=(
        "Whether sweep.metric is better high (max: k-NN accuracy) or low (min: a loss)."))
    num_samples: PositiveInt = Field(8, description="Trials (times the grid size, when the space has grids).")
    max_concurrent_trials: PositiveInt | None = Field(None, description="Default: as many as the cluster fits.")
    search_alg: Literal["random", "optuna", "hyperopt"] = Field("random", description=(
        "random (Tune's variant generator, grids allowed); optuna / hyperopt when installed."))
    time_budget_s: PositiveFloat | None = Field(None, description="Stop the whole sweep after this many seconds.")
    evaluations: PositiveInt = Field(4, description=(
        "Online k-NN evaluations per trial (labelled data): ASHA's time unit, so its rungs."))
    grace_period: PositiveInt = Field(1, description="Evaluations before ASHA may stop a trial.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA keeps 1/reduction_factor per rung.")
    trial_cpu: PositiveFloat = Field(0.1, description="CPU held by each trial's driver (its workers reserve their own).")
    seed: int | None = Field(None, description="Seed of the search algorithm.")


def _check_value(base: dict, key: str, value: Any) -> None:
    """Raise ``ConfigError`` if ``key=value`` makes ``base`` an invalid Config."""
    data = json.loads(json.dumps(base))
    set_dotted(data, key, value)
    try:
        Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def check_space(space: Any, base: dict) -> dict[str, tuple[str, Any]]:
    """``{key: (kind, args)}`` after checking every entry against the Config; one-line
    ``ConfigError`` naming ``space.<key>`` otherwise (unknown key, empty choice, bad range)."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("space: needs at least one entry, e.g. objective.teacher_temperature: {loguniform: [0.02, 0.07]}")
    known = _known_keys()
    out = {}
    for key, spec in space.items():
        where = f"space.{key}"
        if key in DEPRECATED:  # an old key name searches its new one, with the notice
            if DEPRECATED[key] in space:
                raise ConfigError(f"{where} and space.{DEPRECATED[key]} are both set: keep only "
                                  f"space.{DEPRECATED[key]} ({key} is its deprecated name)")
            _warn_deprecated(key)
            key = DEPRECATED[key]
        if key not in known:
            import difflib

            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"{where}: unknown key" + (f" (did you mean {hint[0]}?)" if hint else ""))
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
            raise ConfigError(f"{where}: expected one of {', '.join(KINDS)}, e.g. {{choice: [a, b]}} (got {spec!r})")
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values (got {args!r})")
            values = args
        else:
            numbers = isinstance(args, list) and len(args) == 2 and all(
                isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            if not numbers or not args[0] < args[1]:
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high (got {args!r})")
            if kind.startswith("log") and args[0] <= 0:
                raise ConfigError(f"{where}: {kind} needs 0 < low (got {args!r})")
            if kind.endswith("randint") and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: {kind} needs integer bounds (got {args!r})")
            values = args
        for value in values:
            try:
                _check_value(base, key, value)
            except ConfigError as err:
                raise ConfigError(f"{where}: {kind} {args!r}: {err}") from None
        out[key] = (kind, args)
    return out


def domains(space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Tune search domains; integer ranges include ``high``."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1), "lograndint": lambda a: tune.lograndint(a[0], a[1] + 1)}
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def load_sweep(space_path: str | Path, config_path: str | Path | None, overrides: list[str] = ()
               ) -> tuple[SweepConfig, Config, dict[str, tuple[str, Any]]]:
    """(sweep settings, base config with ``fixed`` applied, checked space) from the files and
    dotted overrides (``sweep.*`` keys go to the sweep, the rest to the base config)."""
    try:
        doc = yaml.safe_load(Path(space_path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{space_path}: cannot read space file: {err}".splitlines()[0]) from None
    if not isinstance(doc, dict) or set(doc) - {"sweep", "fixed", "space"}:
        raise ConfigError(f"{space_path}: top level must hold only sweep, fixed and space")
    sweep_over = [o for o in overrides if o.startswith("sweep.")]
    fixed = [f"{k}={json.dumps(v)}" for k, v in (doc.get("fixed") or {}).items()]
    # trials compare training time: a budget covers the trial's training unless the space says otherwise
    scope = [] if any(o.startswith("train.time_budget_scope=") for o in [*fixed, *overrides]) else [
        "train.time_budget_scope=training"]
    base = load_config(config_path, [*scope, *fixed, *(o for o in overrides if not o.startswith("sweep."))])
    sweep_doc = dict(doc.get("sweep") or {})
    for item in sweep_over:
        key, _, raw = item.removeprefix("sweep.").partition("=")
        sweep_doc[key] = yaml.safe_load(raw)
    try:
        sweep = SweepConfig.model_validate(sweep_doc)
    except ValidationError as err:
        raise ConfigError(_one_line(err, SweepConfig, "sweep.")) from None
    space = check_space(doc.get("space"), base.model_dump(mode="json", round_trip=True))
    return sweep, base, space


def resolve_metric(sweep: SweepConfig, labelled: bool) -> str:
    if sweep.metric != "auto":
        return sweep.metric
    return "knn/teacher" if labelled else "norm/mutual_information"


def trial_config(base: Config, params: dict[str, Any], name: str, storage_path: str,
                 metric: str, evaluations: int) -> Config:
    """The config of one trial: base + sampled values, its own run name and storage, the base's
    MLflow store (not one beside the trial's storage), and online k-NN ``evaluations`` times per
    run when the metric needs it. Trials stop themselves on the collapse alarm
    (``monitor.stop_on_collapse``; threshold and patience from the base's ``monitor.*``)."""
    from rayssl.tracking import tracking_uri

    data = base.model_dump()
    data["tracking"]["uri"] = tracking_uri(base)
    for key, value in params.items():
        set_dotted(data, key, value)
    data["run"].update(name=name, storage_path=storage_path)
    data["monitor"]["stop_on_collapse"] = True
    if metric.startswith("knn/") and data["eval"]["every_epochs"] is None:
        data["eval"]["every_epochs"] = data["train"]["epochs"] / evaluations
    return Config.model_validate(data)


def _report_callback(metric: str):
    """Train -> Tune: rank 0's reports that carry ``metric`` (so ASHA counts evaluations)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportWithMetric(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ReportWithMetric()


def run_trial(params: dict, *, base: dict, sweep: dict, metric: str, parent_run: MlflowRun | None) -> None:
    """The Tune function trainable: one full pretraining run (TorchTrainer) for ``params``."""
    from ray import tune

    from rayssl import tracking
    from rayssl.train.launch import check_inputs, fit

    if parent_run is not None:  # the driver's MLflow credentials: this node may have been started without them
        tracking.use_credentials(parent_run)
    settings = SweepConfig.model_validate(sweep)
    context = tune.get_context()
    cfg = trial_config(Config.model_validate(base), params, f"{settings.name}-{context.get_trial_id()}",
                       str(Path(settings.storage_path).expanduser() / settings.name / "trials"),
                       metric, settings.evaluations)
    fit(check_inputs(cfg), parent_run_id=parent_run and parent_run.run_id, callbacks=[_report_callback(metric)])


def _trial_cpus(base: Config, sweep: SweepConfig) -> float:
    """CPUs one trial holds: its driver, its workers (the max of an elastic range) and one for
    its Ray Data tasks."""
    return base.scaling.max_workers * base.scaling.cpus_per_worker + sweep.trial_cpu + 1


def default_concurrency(base: Config, sweep: SweepConfig, resources: dict[str, float]) -> int:
    """Trials that fit at once in a cluster of ``resources`` (``ray.cluster_resources()``):
    each needs ``_trial_cpus`` (and its workers' GPUs)."""
    s = base.scaling
    fits = resources.get("CPU", 1) // _trial_cpus(base, sweep)
    if s.use_gpu:
        fits = min(fits, resources.get("GPU", 0) // (s.max_workers * s.gpus_per_worker))
    return max(1, int(fits))


def _search_alg(sweep: SweepConfig, metric: str, space: dict, concurrency: int):
    if sweep.search_alg == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)
    if any(kind == "grid" for kind, _ in space.values()):
        raise ConfigError(f"sweep.search_alg: {sweep.search_alg} cannot search a grid; use choice, or search_alg=random")
    try:
        if sweep.search_alg == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=metric, mode=sweep.mode, seed=sweep.seed)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode=sweep.mode, random_state_seed=sweep.seed)
    except (ImportError, AssertionError) as err:
        raise ConfigError(f"sweep.search_alg: {sweep.search_alg} is not installed "
                          f"(pip install {sweep.search_alg}): {err}".splitlines()[0]) from None


def _parent_run(base: Config, sweep: SweepConfig, space: dict, folder: Path) -> MlflowRun | None:
    """The sweep's MLflow parent run (the one of an earlier launch of this sweep, if any)."""
    from rayssl import tracking

    saved = folder / SWEEP_FILE
    previous = json.loads(saved.read_text()).get("run_id") if saved.exists() else None
    params = {f"sweep.{k}": v for k, v in sweep.model_dump().items()}
    params.update({f"space.{k}": f"{kind} {json.dumps(args)}" for k, (kind, args) in space.items()})
    parent_run = tracking.start_parent(base, sweep.name, params, previous)
    if parent_run:
        folder.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"run_id": parent_run.run_id}))
    return parent_run


def sweep(base: Config, sweep: SweepConfig, space: dict[str, tuple[str, Any]]) -> dict:
    """Run (or resume, for an unfinished ``sweep.name``) a sweep; its summary, also written as
    ``trials.csv`` and ``best.yaml`` in the sweep folder and logged to the parent MLflow run."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rayssl import tracking
    from rayssl.train.launch import check_inputs, init_ray

    sweep = sweep.model_copy(update={"name": sweep.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"})
    # a local Ray must fit one trial: its driver, its workers and a CPU for Ray Data
    min_cpus = _trial_cpus(base, sweep)
    launch = check_inputs(base, min_cpus)  # inputs checked (and Fashion-MNIST shards built) once, up front
    meta, steps = launch.data.meta, launch.steps_per_epoch
    init_ray(base.scaling.address, min_cpus)
    metric = resolve_metric(sweep, meta.num_eval > 0)
    if metric.startswith("knn/") and meta.num_eval == 0:
        raise ConfigError(f"sweep.metric: {metric} needs labelled data.source and data.eval_source")
    if metric.startswith("knn/"):  # ASHA counts evaluations: reports without the metric never reach Tune
        probe = trial_config(base, {}, "probe", base.run.storage_path, metric, sweep.evaluations)
        max_t = knn_evaluations(probe, steps)
    else:
        max_t = math.ceil(steps * base.train.epochs / base.train.log_every)
    folder = Path(sweep.storage_path).expanduser().resolve() / sweep.name
    sweep = sweep.model_copy(update={"storage_path": str(folder.parent)})
    parent_run = _parent_run(base, sweep, space, folder)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.model_dump(), sweep=sweep.model_dump(), metric=metric,
                             parent_run=parent_run),
        {"CPU": sweep.trial_cpu})
    # stop_last_trials=False: a trial whose sampled values give it more reports than the base
    # config's max_t still runs to its end
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=sweep.grace_period,
                              reduction_factor=sweep.reduction_factor, stop_last_trials=False)
    concurrency = sweep.max_concurrent_trials or default_concurrency(base, sweep, ray.cluster_resources())
    tune_config = tune.TuneConfig(metric=metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                  # the random search limits itself (Tune ignores this for it)
                                  max_concurrent_trials=None if sweep.search_alg == "random" else concurrency,
                                  scheduler=scheduler,
                                  search_alg=_search_alg(sweep, metric, space, concurrency),
                                  time_budget_s=sweep.time_budget_s)
    run_config = tune.RunConfig(name=sweep.name, storage_path=str(folder.parent), verbose=1)
    started = time.time()
    if tune.Tuner.can_restore(str(folder)):
        tuner = tune.Tuner.restore(str(folder), trainable, resume_errored=True, param_space=domains(space))
    else:
        tuner = tune.Tuner(trainable, param_space=domains(space), tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    summary = summarise(results, base, space, metric, sweep, folder)
    summary["seconds"] = time.time() - started
    summary["max_concurrent_trials"] = concurrency
    tracking.finish_parent(parent_run, summary, [folder / "trials.csv", folder / "best.yaml"])
    return summary


def summarise(results, base: Config, space: dict, metric: str, sweep: SweepConfig, folder: Path) -> dict:
    """The trials table (``trials.csv``) and the best trial's full config (``best.yaml``).

    A trial ran to the end when its last report is the final one (it carries ``train_seconds``)
    and it did not stop itself on the collapse alarm (``stopped``); otherwise ASHA or the time
    budget stopped it ("early").
    """
    import pandas as pd

    rows = []
    for result in results:
        config, metrics = result.config or {}, result.metrics or {}
        rows.append({"trial": metrics.get("trial_id"), **{key: config.get(key) for key in space},
                     metric: metrics.get(metric), "reports": int(metrics.get("training_iteration", 0)),
                     "step": metrics.get("step"),
                     "stopped": ("error" if result.error else metrics.get("stopped") or
                                 ("" if "train_seconds" in metrics else "early"))})
    table = pd.DataFrame(rows).sort_values(metric, ascending=sweep.mode == "min", na_position="last")
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "trials.csv", index=False)
    ranked = table.dropna(subset=[metric])
    if ranked.empty:
        raise RuntimeError(f"sweep {sweep.name}: no trial reported {metric}; see the trials' logs in {folder}")
    # trials that ran to the end beat ones stopped at a smaller budget
    best = ranked.sort_values("stopped", key=lambda s: s != "", kind="stable").iloc[0]
    params = {key: best[key].item() if hasattr(best[key], "item") else best[key] for key in space}
    data = trial_config(base, params, "best", base.run.storage_path, metric, sweep.evaluations).redacted(mask=None)
    data["run"]["name"] = None  # a fresh run, not a resume of the trial
    (folder / "best.yaml").write_text(
        f"# best of sweep {sweep.name}: {metric} = {best[metric]:.4f} (trial {best['trial']})\n"
        + yaml.safe_dump(data, sort_keys=False))
    return {"name": sweep.name, "metric": metric, "best_value": float(best[metric]),
            "best_params": params, "best_trial": best["trial"], "table": table,
            "folder": str(folder), "num_trials": len(table),
            "stopped_early": int((table["stopped"] != "").sum())}
