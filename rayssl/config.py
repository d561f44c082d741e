"""Typed, validated configuration: YAML file + dotted command-line overrides.

Every key here is the one name of its concept: the same dotted name is the CLI override,
the MLflow param and the name in the docs (``objective.mode``, ``train.batch_size``, ...).
"""

from __future__ import annotations

import copy
import difflib
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, SecretStr, ValidationError,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo

from rayssl.names import BACKBONES, MODES, SCOPES, TARGET_PRIORS
from rayssl.train.budget import BudgetError, parse_duration


MASK = "***"


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the field."""


class DeprecatedKeyWarning(FutureWarning):
    """A config key that still works under its old name, for one release (see ``DEPRECATED``).
    A ``FutureWarning``: meant for the user of the jobs, so Python shows it by default."""


# Old dotted key -> its one name now. An old key keeps working for one release: it is moved to
# the new key (YAML, checkpoint configs, dotted overrides) with a one-line notice; setting both
# is an error naming both. Remove an entry in the release after it was added.
DEPRECATED: dict[str, str] = {
    "eval.centre": "eval.center",
    "data.test_limit": "data.eval_limit",
}


def deprecation_notice(old: str) -> str:
    """The one line shown when a config sets the deprecated key ``old``."""
    return f"{old} is deprecated: use {DEPRECATED[old]} ({old} will be removed in the next release)"


def _warn_deprecated(old: str) -> None:
    import warnings

    warnings.warn(deprecation_notice(old), DeprecatedKeyWarning, stacklevel=3)


def upgrade_keys(data: Any) -> Any:
    """A copy of the config mapping ``data`` with every deprecated key (``DEPRECATED``) moved to
    its new name, one notice per key; ``data`` itself is left as it was. Raises ``ConfigError``
    naming both keys when ``data`` sets the old and the new one."""
    data, found = _upgrade(data)
    for old in found:
        _warn_deprecated(old)
    return data


def _upgrade(data: Any) -> tuple[Any, list[str]]:
    """(``data`` with the deprecated keys moved, or ``data`` itself when it has none; those keys)."""
    if not isinstance(data, dict):
        return data, []
    found = []
    for old, new in DEPRECATED.items():
        present, value = _get_dotted(data, old)
        if not present:
            continue
        if _get_dotted(data, new)[0]:
            raise ConfigError(f"{old} and {new} are both set: keep only {new} ({old} is its deprecated name)")
        if not found:
            data = copy.deepcopy(data)
        _pop_dotted(data, old)
        set_dotted(data, new, value)
        found.append(old)
    return data, found


def _get_dotted(data: dict, key: str) -> tuple[bool, Any]:
    """(whether ``key`` is set in ``data``, its value)."""
    node: Any = data
    for k in key.split("."):
        if not isinstance(node, dict) or k not in node:
            return False, None
        node = node[k]
    return True, node


def _pop_dotted(data: dict, key: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for k in parents:
        node = node[k]
    del node[leaf]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Training and evaluation data: where the shards are, how they are decoded and fed."""

    source: str = Field("fashion-mnist", description=(
        "Training shards from jobs/make_shards.py: a local path or s3://bucket/prefix; "
        "'fashion-mnist' shards the IDX files of data.fashion_mnist_dir into data.cache_dir once "
        "('fashion-mnist-scenes': the same images pasted on photos, built there too)."))
    eval_source: str | None = Field(None, description=(
        "The evaluation split: labelled shards whose images the k-NN evaluation scores against the "
        "labelled training shards (the bank); default for fashion-mnist: its test split. Without labels "
        "on both, k-NN is skipped."))
    fashion_mnist_dir: str = Field("/usr/share/datasets/fashion-mnist", description=(
        "Folder holding the Fashion-MNIST IDX files (plain or .gz), read once by the fashion-mnist "
        "sources of data.source to build their shards."))
    cache_dir: str = Field("~/.cache/rayssl", description="Where the fashion-mnist shards are built.")
    endpoint_url: str | None = Field(None, description=(
        "S3-compatible endpoint (MinIO, Ceph); default AWS_ENDPOINT_URL. Credentials come from the AWS "
        "chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, role) unless data.access_key_id "
        "and data.secret_access_key are set (the data's: see data.access_key_id)."))
    region: str | None = Field(None, description="S3 region; default AWS_REGION / AWS_DEFAULT_REGION.")
    outage_limit_s: PositiveFloat = Field(120.0, description=(
        "Seconds an object-storage outage (refused or cut connections, timeouts, 5xx answers) is ridden out "
        "during a run, while shards are read or a checkpoint is uploaded or read, retrying with backoff; "
        "past it the run stops with one line naming the bucket (the newest intact checkpoint is kept)."))
    access_key_id: SecretStr | None = Field(None, description=(
        "S3 access key for the data and the runs; default: the AWS chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
        "role), which is safer, with the data (data.source, data.eval_source) read with "
        "RAYSSL_DATA_ACCESS_KEY_ID / RAYSSL_DATA_SECRET_ACCESS_KEY (+ RAYSSL_DATA_SESSION_TOKEN) when "
        "both are set in the environment: a read-only key for the data prefix, the chain's read-write "
        "one for run.storage_path. Never logged: masked in MLflow params, artifacts and checkpoints."))
    secret_access_key: SecretStr | None = Field(None, description="S3 secret key (see data.access_key_id).")
    image_size: PositiveInt | None = Field(None, description=(
        "Decoded square size in pixels (shorter side resized, centre crop) before multi-crop; default: the "
        "shards' common size, else 8/7 of augment.global_crop_size (256 for 224 crops)."))
    channels: Literal[1, 3] | None = Field(None, description="1 or 3; default: what the shards hold.")
    decode_on: Literal["data", "worker"] = Field("data", description=(
        "'data': decode and multi-crop in Ray Data CPU tasks, a Ray Data execution per epoch (GPU workers "
        "only train; for clusters with CPUs to spare); 'worker': the training worker decodes and crops its "
        "own batches, data.prefetch_batches ahead in a thread, and one Ray Data execution streams the "
        "bytes of every epoch, so epoch boundaries cost no restart (CPU workers: the Fashion-MNIST configs; "
        "on GPUs try it when CPUs are scarce and GPUs idle). Watch the metric data_wait_fraction: above "
        "about 0.1 the input pipeline is the bottleneck."))
    prefetch_batches: int = Field(2, ge=0, description=(
        "Micro-batches each training worker turns into views ahead of the step, in a background thread "
        "(with decode_on=worker: the decoding and multi-crop too, spread over the epoch); 0: in the step. "
        "data.deterministic always uses 0."))
    cpus_per_task: PositiveFloat | None = Field(None, description=(
        "Logical CPUs each Ray Data task (shard reads, decoding, crops) asks for; default: "
        "scaling.cpus_per_worker when below 1, else 1. In the workers' units, so a node that holds a "
        "fractional worker also holds a data task beside it (with 1 CPU per task, two 0.5-CPU workers "
        "on 1-CPU nodes leave no node for the reads: the run stalls)."))
    shuffle_buffer: int = Field(1024, ge=0, description=(
        "Rows in each worker's local shuffle buffer (the file order is shuffled each epoch too); raise it "
        "when the shards are sorted by class."))
    train_limit: PositiveInt | None = Field(None, description="Use only the first N training images.")
    eval_limit: PositiveInt | None = Field(None, description=(
        "Use only the first N images of the evaluation split (data.eval_source). Formerly data.test_limit "
        "(still read, with a deprecation notice, until the next release)."))
    deterministic: bool = Field(False, description=(
        "Replayable training stream (needs data.decode_on=worker): fixed file order, ordered reads, the "
        "local shuffle seeded per epoch, and a resume skips the batches its epoch already used, so a run "
        "resumed after a failure ends bitwise equal to one that never stopped (CPU). Slower; for "
        "debugging and audits."))
    max_image_pixels: PositiveInt = Field(89_478_485, description=(
        "Largest image, in pixels (width x height, read from its header before any pixel is decoded), "
        "that make_shards keeps (--max-image-pixels) and that training and jobs/evaluate.py decode: a "
        "larger one (a decompression bomb: a few KB on disk, gigabytes decoded) is skipped like a corrupt "
        "image, with its reason in the manifest or counted in data/skipped_images, and the rest goes on. "
        "Default: Pillow's own warning threshold (256 MiB as 8-bit RGB), which this explicit cap replaces. "
        "A decode holds a few bytes a pixel: keep it a few times your largest real image; raise it only "
        "for scans or satellite tiles."))
    max_item_bytes: PositiveInt = Field(64 * 2**20, description=(
        "Largest encoded image, in bytes, that make_shards reads (--max-item-bytes; at most this plus one "
        "byte of each file) and that training and jobs/evaluate.py decode; a larger one is skipped like a "
        "corrupt image and the rest goes on. Each image is held whole in memory and in one Parquet cell: "
        "raise it only for uncompressed TIFF/BMP (3 bytes a pixel), and shard those with --reencode jpeg."))


class AugmentConfig(_Section):
    """Multi-crop views (DINO): two global crops for both networks, local crops for the student."""

    global_crop_size: PositiveInt = Field(28, description=(
        "Side in pixels of the two global views (random resized crops), seen by teacher and student."))
    global_crop_scale: tuple[float, float] = Field((0.4, 1.0), description=(
        "[min, max] fraction of the image's area a global crop covers, 0 < min <= max <= 1."))
    local_crops: int = Field(2, ge=0, description=(
        "Local views per image, seen by the student only; 0: global crops only (cheaper steps, as the "
        "short CPU configs do)."))
    local_crop_size: PositiveInt = Field(14, description=(
        "Side in pixels of each local view; at most augment.global_crop_size."))
    local_crop_scale: tuple[float, float] = Field((0.1, 0.4), description=(
        "[min, max] fraction of the image's area a local crop covers, 0 < min <= max <= 1."))
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip of each view.")
    rotation: float = Field(0.0, ge=0.0, le=180.0, description=(
        "Random rotation of every crop, uniform in +-this many degrees (0: none)."))
    color_jitter: float = Field(0.4, ge=0.0, description=(
        "Colour jitter strength s, torchvision's ColorJitter(s, s, s/2, s/4) with p=0.8: brightness and "
        "contrast factors in [1-s, 1+s]; 0.4 is DINO's. 0 disables it. The shipped Fashion-MNIST configs "
        "use more (docs/benchmarks.md)."))
    blur_prob: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Probability of a Gaussian blur of each global view (local views: half of it); 0: none."))
    solarize_prob: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Probability of solarising the second global view only, as DINO does; 0: none."))

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("need 0 < min <= max <= 1")
        return value


class ModelConfig(_Section):
    """The network of student and teacher: a backbone, then a projection head and the prototypes."""

    backbone: Literal[BACKBONES] = Field("convnet4", description=(  # type: ignore[valid-type]
        "Backbone network: convnet4 (four 3x3 conv blocks, for small images such as Fashion-MNIST), "
        "resnet18, resnet50, vit_tiny or vit_small."))
    small_stem: bool = Field(True, description=(
        "ResNets only: a 3x3 stride-1 stem conv without the stem max-pool, for small images; false: "
        "the ImageNet stem (7x7 stride 2 and max-pool)."))
    width: PositiveInt = Field(32, description=(
        "convnet4 only: base channel count (the blocks have width, 2x, 4x, 8x it); ignored by ResNets "
        "and ViTs."))
    head_hidden_dim: PositiveInt = Field(512, description="Width of the projection MLP's hidden layers.")
    head_bottleneck_dim: PositiveInt = Field(128, description=(
        "Output size of the projection MLP, L2-normalised before the cluster prototypes."))
    head_layers: PositiveInt = Field(3, description=(
        "Linear layers of the projection MLP (GELU between them), the last projecting to "
        "model.head_bottleneck_dim."))
    head_norm: bool = Field(False, description=(
        "BatchNorm1d after each hidden layer of the projection MLP (DINO's use_bn_in_head, the usual "
        "choice for convnets: the Fashion-MNIST configs turn it on); leave it off for ViTs, as DINO does."))


class ObjectiveConfig(_Section):
    """The clustering objective: how the teacher's posterior becomes the target, docs/theory.md."""

    mode: Literal[MODES] = Field("prior", description=(  # type: ignore[valid-type]
        "Teacher normalisation: prior (exact inverse cluster prior, the default), center (DINO's "
        "centring), sinkhorn (prior repeated objective.sinkhorn_iters times), none (collapses; a "
        "control). Watch norm/mutual_information: near 0 means collapse."))
    num_clusters: int = Field(256, ge=2, description=(
        "K, the number of cluster prototypes (the head's outputs); 256-1024 for small data, 65536 for "
        "ImageNet. Too large a K for the global batch leaves clusters unused (see norm/unused_clusters); "
        "a larger K wants a lower teacher temperature and a larger batch."))
    teacher_temperature: PositiveFloat = Field(0.04, description=(
        "tau_t of the teacher's softmax, after its warm-up. 0.04 works; if norm/mutual_information "
        "(I(X;K)) falls or the loss stalls early, lower it, or warm it up from "
        "objective.teacher_temperature_warmup over objective.teacher_temperature_warmup_epochs."))
    teacher_temperature_warmup: PositiveFloat = Field(0.04, description=(
        "Teacher temperature at the first step, moved linearly to objective.teacher_temperature over "
        "objective.teacher_temperature_warmup_epochs."))
    teacher_temperature_warmup_epochs: float = Field(0.0, ge=0.0, description=(
        "Epochs of the teacher temperature's linear warm-up; 0: objective.teacher_temperature from the "
        "first step."))
    student_temperature: PositiveFloat = Field(0.1, description="tau_s of the student's softmax (DINO's 0.1).")
    alpha: float = Field(1.0, ge=0.0, description=(
        "Strength of the inverse prior in modes prior and sinkhorn: "
        "log qt = log_softmax(z/tau_t - alpha log pi + log rho); 1: the exact inverse prior, 0: none."))
    target_prior: Literal[TARGET_PRIORS] = Field("uniform", description=(  # type: ignore[valid-type]
        "rho, the cluster marginal the normalisation aims at: uniform (1/K) or powerlaw "
        "(rho_k proportional to k^-objective.target_prior_exponent)."))
    target_prior_exponent: float = Field(1.0, ge=0.0, description=(
        "Exponent of the powerlaw target prior; unused with uniform."))
    prior_momentum: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "EMA momentum of the cluster prior pi in mode prior, folded in once per optimizer step: "
        "0 = the per-batch prior; 0.9-0.99 smooths it when the global batch is small."))
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0, description=(
        "EMA momentum of the center in mode center (DINO's 0.9), updated once per optimizer step."))
    sinkhorn_iters: PositiveInt = Field(3, description=(
        "Normalisation steps of mode sinkhorn (Sinkhorn-Knopp iterations, each a prior step over the "
        "global batch)."))
    scope: Literal[SCOPES] = Field("global", description=(  # type: ignore[valid-type]
        "Batch statistics of the normalisation (pi, center, Sinkhorn marginals): global = all-reduced "
        "over every worker (docs/theory.md section 3.4); local = each worker's own batch, an ablation only "
        "(docs/benchmarks.md)."))


class OptimConfig(_Section):
    """Optimizer and the per-step schedules of learning rate, weight decay and teacher momentum."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd with momentum 0.9.")
    lr: PositiveFloat = Field(2e-3, description=(
        "Peak LR for a global batch of 256 (scaled linearly by global batch / 256), reached after "
        "optim.warmup_epochs, then a cosine to optim.min_lr; lower it first if the loss goes non-finite."))
    min_lr: float = Field(1e-5, ge=0.0, description=(
        "LR at the end of the cosine (not scaled by the batch); at most optim.lr."))
    warmup_epochs: float = Field(0.5, ge=0.0, description="Epochs of the LR's linear warm-up from 0.")
    weight_decay: float = Field(0.04, ge=0.0, description=(
        "Weight decay at the first step, cosine to optim.weight_decay_end."))
    weight_decay_end: float = Field(0.2, ge=0.0, description="Weight decay at the last step.")
    clip_grad: float = Field(3.0, ge=0.0, description="Max grad norm; 0 disables clipping.")
    freeze_prototypes_epochs: float = Field(0.0, ge=0.0, description=(
        "Epochs during which the cluster prototypes (the head's last layer) get no update, as DINO's "
        "freeze_last_layer; 0: never frozen."))
    teacher_momentum: float = Field(0.99, ge=0.0, le=1.0, description=(
        "Teacher EMA momentum at the first step, cosine to optim.teacher_momentum_end: 0.99 for short "
        "runs, 0.996 (DINO) for long ones; lower (a faster teacher) for runs of a few epochs."))
    teacher_momentum_end: float = Field(1.0, ge=0.0, le=1.0, description="Teacher EMA momentum at the last step.")
    accumulate_steps: PositiveInt = Field(1, description=(
        "Micro-batches per optimizer step (gradient accumulation); part of the global batch "
        "(train.batch_size)."))


class TrainConfig(_Section):
    """Run length (epochs or a wall-clock budget), batch, logging, checkpoints, precision."""

    epochs: float = Field(2.0, gt=0.0, description=(
        "The run's length in epochs; with train.time_budget, the most it may train (the data stream "
        "holds this many epochs)."))
    time_budget: str | None = Field(None, description=(
        "Wall-clock time, e.g. 90s, 12m, 8h or 1h30m, of training (or of the whole job: "
        "train.time_budget_scope): the run times its first steps after warm-up, then fixes its total optimizer "
        "steps (MLflow param train.total_steps, kept by every checkpoint and resume) so that training "
        "ends within the budget, at most train.epochs; every schedule spans that total. A resumed or "
        "restarted run keeps the total it fixed. Gives trials of a sweep equal time, whatever their speed. "
        "Unset (null): exactly train.epochs."))
    time_budget_scope: Literal["training", "job"] = Field("training", description=(
        "What train.time_budget covers. training: the training steps only (equal-time sweep trials). "
        "job (as configs/fashion_mnist.yaml sets it): the whole job from its process's start to exit; the run "
        "subtracts the start-up and baselines it spent and keeps back the final k-NN's time, measured by the "
        "baselines' k-NN."))
    batch_size: PositiveInt = Field(128, description=(
        "Images per worker per micro-batch. The global batch is train.batch_size x optim.accumulate_steps "
        "x scaling.num_workers (the max of an elastic range: fewer workers accumulate more); optim.lr is "
        "given per 256 of it."))
    steps_per_epoch: PositiveInt | None = Field(None, description="Default: dataset size / global batch.")
    log_every: PositiveInt = Field(20, description=(
        "Optimizer steps between logged metrics (console, MLflow) and the collapse monitor's checks."))
    checkpoint_every: PositiveInt = Field(200, description=(
        "Optimizer steps between checkpoints (one is also written at the end); a restart recomputes at "
        "most this many steps."))
    seed: int = Field(0, description=(
        "Seed of the initial weights (the same on every worker) and, offset per worker, of the crops and "
        "the data order."))
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=(
        "bf16 autocast or fp32; auto = bf16 on a GPU and on CPUs with native bf16 (AVX-512 BF16 or AMX), "
        "fp32 on other CPUs (speed and accuracy: docs/benchmarks.md). Force fp32 if the loss goes non-finite."))
    skip_nonfinite: int = Field(0, ge=0, description=(
        "Steps with a NaN/inf loss or gradient that may be skipped (no update) before the run stops "
        "(exit code 1); 0: stop at the first, keeping the last good checkpoint."))

    @field_validator("time_budget", mode="before")
    @classmethod
    def _budget(cls, value):
        """A duration string (90s, 12m, 8h, 1h30m) or a number of seconds, kept as written."""
        if value is None:
            return None
        try:
            parse_duration(value)
        except BudgetError as err:
            raise ValueError(str(err)) from None
        return f"{value:g}s" if isinstance(value, (int, float)) else str(value).strip()

    @property
    def budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)


class ScalingConfig(_Section):
    """The Ray cluster and the training workers: how many, what each reserves, where they go."""

    address: str | None = Field(None, description="Ray address; default: join a running cluster or start one.")
    num_workers: int | tuple[int, int] = Field(2, description=(
        "Training workers (one per GPU): N, or an elastic range [min, max] (Ray Train elastic training): "
        "the run starts with as many as the cluster can place, goes on with fewer after a node is lost and "
        "grows again when nodes join. The global batch stays train.batch_size x optim.accumulate_steps "
        "x max at any size (fewer workers accumulate more micro-batches)."))
    use_gpu: bool = Field(False, description=(
        "Train on GPUs, scaling.gpus_per_worker per worker; false: CPU workers."))
    cpus_per_worker: PositiveFloat = Field(1.0, description=(
        "Logical CPUs each training worker reserves; on CPU it also sets the worker's torch threads (its "
        "integer part, at least 1). Below 1 leaves room for Ray Data on small machines."))
    gpus_per_worker: float = Field(1.0, ge=0.0, description=(
        "GPUs each training worker reserves when scaling.use_gpu (a fraction shares a GPU)."))
    worker_resources: dict[str, PositiveFloat] = Field(default_factory=dict, description=(
        "Custom Ray resources each training worker needs besides CPU/GPU, e.g. {trainer: 1} to keep "
        "workers on nodes started with --resources='{\"trainer\": 1}' (one worker per such node)."))
    resize_check_s: PositiveFloat = Field(60.0, description=(
        "Elastic runs: seconds between checks for room to grow; each grow restarts the workers "
        "from the newest checkpoint, so keep it well above the time of one train.checkpoint_every."))
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field("PACK", description=(
        "Where the training workers go: PACK fills a node first (fast collectives); SPREAD puts them "
        "on different nodes when it can (one node lost costs fewer workers); STRICT_SPREAD requires "
        "one node per worker."))

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v):
        """N >= 1, or [min, max] with 1 <= min <= max."""
        bounds = list(v) if isinstance(v, (list, tuple)) else [v]
        if len(bounds) not in (1, 2) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
            raise ValueError("expected a number of workers N or an elastic range [min, max]")
        if bounds[0] < 1 or bounds[0] > bounds[-1]:
            raise ValueError("needs 1 <= min <= max" if len(bounds) == 2 else "needs at least 1 worker")
        return bounds[0] if len(bounds) == 1 else tuple(bounds)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """What one training worker asks Ray for: CPUs, GPUs when used, custom resources."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {}),
                **self.worker_resources}


class RunConfig(_Section):
    """The run's name, storage and reliability: resumes, restarts, stalls and stops."""

    name: str | None = Field(None, description=(
        "Run name; relaunching with the same name resumes from its latest checkpoint. Default: "
        "rayssl-<objective.mode>-<date>-<time>."))
    storage_path: str = Field("~/rayssl_results", description=(
        "Where checkpoints go (a local folder, or s3://bucket/prefix: needed on a cluster of several "
        "nodes) and, by default, the MLflow store. A full disk stops the run at its next checkpoint with "
        "one line (exit code 1): that checkpoint is removed, the older ones stay intact; free space and "
        "relaunch with the same run.name to resume."))
    max_failures: int = Field(0, ge=-1, description=(
        "Restarts after a lost worker (preemption, OOM, dead node), each from the newest intact "
        "checkpoint (at most train.checkpoint_every steps are recomputed); 0: none, -1: no limit."))
    stall_timeout: PositiveFloat = Field(180.0, description=(
        "Seconds a training worker waits for its next batch before the run is declared stalled: it prints "
        "what Ray cannot place (its pending resource demands) and fails (an elastic run with "
        "run.max_failures restarts at the size that fits). After the first steps the limit is 100 step "
        "times when that is shorter, never under 30 s."))
    stop_timeout: PositiveFloat = Field(30.0, description=(
        "Seconds a stopped job (SIGTERM: `ray job stop`, a deleted RayJob; SIGINT: Ctrl-C) has to finish "
        "its step, write its checkpoint and let Ray Train end before it exits anyway (exit code 143 / 130, "
        "MLflow status KILLED, tags rayssl.stopped and rayssl.stopped_step); a second signal exits at once; "
        "relaunch with the same run.name to resume. `ray job stop` must wait longer: "
        "RAY_JOB_STOP_WAIT_TIME_S (Ray's default 3 s) of at least this plus 10 s, e.g. submit with "
        "--runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"40\"}}'."))
    verbose: bool = Field(False, description=(
        "Show Ray's and Ray Data's logs on the console too; by default they go to Ray's log folder "
        "and the console shows rayssl's lines and one progress bar."))


class EvalConfig(_Section):
    """k-NN evaluation of the teacher during and after pretraining, and its feature protocol."""

    knn_k: PositiveInt = Field(20, description=(
        "k of the weighted k-NN the pretraining job runs (online, final, baselines; metric knn/teacher); "
        "jobs/evaluate.py takes its k values from --ks."))
    knn_temperature: PositiveFloat = Field(0.07, description=(
        "Temperature T of the weighted k-NN vote, exp(cosine / T) per neighbour (DINO's 0.07)."))
    knn_train_limit: PositiveInt | None = Field(None, description=(
        "Bank size of the k-NN: the first N labelled training images; default: all of them (ImageNet: "
        "100k-200k is plenty)."))
    baselines: bool = Field(True, description=(
        "Also score the floors of every k-NN (and linear probe) number with the same protocol: raw pixels "
        "and the network at its random initialisation (rows raw_pixels/*, random_init/*); false skips them."))
    precise_bn_images: int = Field(10_000, ge=0, description=(
        "Precise BatchNorm: before features are extracted, every network row (teacher, random init) gets "
        "its BatchNorm statistics recomputed on this many clean bank images (data.source, the evaluation "
        "preprocessing) instead of the running statistics of augmented training crops; 0 keeps those. "
        "Chosen with eval.center on the validation split (docs/benchmarks.md, 'Sixth round'). "
        "The images are held in memory while the statistics are computed: lower it for large images."))
    center: bool = Field(True, description=(
        "Center every k-NN row's features (raw pixels included) by subtracting the bank's mean before the "
        "L2 normalisation; non-negative pooled features otherwise crowd all cosines near 1. Formerly "
        "eval.centre (still read, with a deprecation notice, until the next release)."))
    every_epochs: float | None = Field(None, gt=0.0, description=(
        "Online k-NN of the teacher every this many epochs (metric knn/teacher, plotted over steps beside "
        "the loss: is quality still rising?); each point scores the first eval.online_train_limit bank "
        "images against the first eval.online_eval_limit evaluation images, the final point the full sets. "
        "Default: only at the end (configs/fashion_mnist.yaml: every epoch)."))
    online_train_limit: PositiveInt = Field(5_000, description=(
        "Bank size of the online k-NN points (eval.every_epochs); their precise BatchNorm uses these "
        "images too. Smaller is cheaper and noisier; the default's cost and how its points track the full "
        "protocol: docs/benchmarks.md, '[5/6] Quality over training'."))
    online_eval_limit: PositiveInt = Field(1_000, description=(
        "Evaluation images (queries) of the online k-NN points (eval.every_epochs)."))
    gallery_clusters: int = Field(32, ge=0, description=(
        "At the end of a run, log what the clusters hold to MLflow (plots/clusters/): "
        "gallery_top.png (this many most-used clusters of the evaluation split, each with its most "
        "confident images, share and, with labels, class histogram), gallery_tail.png (the "
        "least-used clusters still used: where partial collapse hides) and, with labels, "
        "cluster_class_map.png; 0 turns them off. jobs/evaluate.py --gallery draws the same for any "
        "checkpoint."))
    gallery_images: PositiveInt = Field(10_000, description=(
        "Without a k-NN (no labels, or no labelled data.eval_source) to draw them from, the end-of-run "
        "galleries come from a pass of their own over the first this-many images of data.eval_source, "
        "else of data.source."))


class MonitorConfig(_Section):
    """The collapse alarm on the normalised teacher's cluster statistics."""

    min_effective_clusters: float = Field(7.0, ge=1.0, description=(
        "Collapse alarm, partial or one-cluster collapse: effective clusters of the normalised teacher "
        "(norm/effective_clusters, exp H(K)) below this for monitor.patience logged steps warns and tags "
        "the MLflow run (rayssl.collapse). Collapsed objective.mode=none runs fall to a few clusters, "
        "center runs settle above the default and prior runs near K (calibration: docs/benchmarks.md, "
        "'[5/5] The collapse alarm, calibrated'); keep it well below objective.num_clusters and below the "
        "number of groups you expect in the data; 1 turns it off."))
    min_mutual_information: float = Field(0.05, ge=0.0, description=(
        "Collapse alarm, uniform collapse (every posterior flat, effective clusters near K): I(X;K) of "
        "the normalised teacher (norm/mutual_information, nats) below this for monitor.patience logged "
        "steps. Healthy calibration runs stay far above it (docs/benchmarks.md); 0 turns it off."))
    patience: PositiveInt = Field(10, description=(
        "Consecutive logged steps below a monitor threshold that raise the alarm; 10 at train.log_every=20 "
        "is 200 steps, less than the 234 of a Fashion-MNIST epoch."))
    stop_on_collapse: bool = Field(False, description=(
        "On the alarm, stop the run early (checkpoint kept, exit code 3) instead of only warning and "
        "tagging it."))


class TrackingConfig(_Section):
    """MLflow tracking of runs, metrics and the trained backbone."""

    enabled: bool = Field(True, description="Record the run in MLflow.")
    uri: str | None = Field(None, description=(
        "MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///<run.storage_path>/mlflow.db "
        "(~/rayssl_results/mlflow.db when run.storage_path is s3://). On a multi-node cluster use a server "
        "(rank 0 may run on any node)."))
    experiment: str = Field("rayssl", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; default run.name.")
    required: bool = Field(True, description=(
        "If the tracking server is unreachable at start: true = stop with an error, false = warn and "
        "train without tracking."))
    log_model: bool = Field(True, description="Log the final teacher backbone with mlflow.pytorch.log_model.")
    register_as: str | None = Field(None, description="Also register the logged backbone under this model name.")


class Config(_Section):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    monitor: MonitorConfig = MonitorConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _deprecated_keys(cls, data: Any) -> Any:
        """Old key names (``DEPRECATED``) in a mapping validated directly, e.g. the config stored
        in an older run's checkpoint, are read under their new names, with the notice."""
        try:
            return upgrade_keys(data)
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        """Rules across fields; the message starts with the field to change."""
        a, o = self.augment, self.optim
        if a.local_crops and a.local_crop_size > a.global_crop_size:
            raise ValueError(f"augment.local_crop_size: {a.local_crop_size} exceeds augment.global_crop_size "
                             f"{a.global_crop_size}")
        if o.min_lr > o.lr:
            raise ValueError(f"optim.min_lr: {o.min_lr} exceeds optim.lr {o.lr}")
        if self.monitor.min_effective_clusters >= self.objective.num_clusters:
            raise ValueError(f"monitor.min_effective_clusters: {self.monitor.min_effective_clusters:g} is not below "
                             f"objective.num_clusters {self.objective.num_clusters}; lower it (1 turns it off)")
        if self.data.deterministic and self.data.decode_on != "worker":
            raise ValueError("data.deterministic: needs data.decode_on=worker (Ray Data tasks crop with "
                             "their own random seeds)")
        return self

    @property
    def data_cpus(self) -> float:
        """CPUs per Ray Data task: ``data.cpus_per_task``, default ``scaling.cpus_per_worker`` below 1, else 1."""
        return self.data.cpus_per_task or min(1.0, self.scaling.cpus_per_worker)

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``{dotted.key: value}``, secrets masked (see ``redacted``)."""
        return _flatten(self.redacted())

    def redacted(self, mask: str | None = MASK) -> dict[str, Any]:
        """The config as plain JSON-able data with every secret replaced by ``mask``: secret
        fields (``data.secret_access_key``, ...) and passwords in URIs (``https://user:pw@host``).
        The one form of the config that reaches logs, MLflow and checkpoints."""
        return _mask(self.model_dump(mode="json", round_trip=True), self, mask)

_URI_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):([^/@\s]+)@")
_QUERY_SECRET = re.compile(r"([?&](?:key|[^=&\s]*(?:token|passw(?:or)?d|secret|signature|credential|"
                           r"api[-_]?key|access[-_]?key)[^=&\s]*)=)[^&\s]+", re.IGNORECASE)


def mask_uri(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``, and the values of query
    parameters named like a secret (``?token=``, ``X-Amz-Signature=``, ...) -> ``***``."""
    return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, _URI_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", text))


def _mask(data: dict, model: BaseModel, mask: str | None) -> dict:
    out = {}
    for key, value in data.items():
        field = getattr(model, key)
        if isinstance(field, BaseModel):
            out[key] = _mask(value, field, mask)
        elif isinstance(field, SecretStr):
            out[key] = mask
        else:
            out[key] = mask_uri(value) if isinstance(value, str) else value
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _known_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds, or None for a leaf field."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """``(dotted key, pydantic FieldInfo)`` of every leaf field of ``model``, in declaration order
    (the keys of ``_known_keys``)."""
    out: list[tuple[str, FieldInfo]] = []
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        out += config_fields(section, f"{prefix}{name}.") if section else [(f"{prefix}{name}", field)]
    return out


def _value_text(value: Any) -> str:
    """``value`` as it would be written in YAML or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, str) and (not value or value != value.strip()):
        return repr(value)
    return str(value)


def _type_text(annotation: Any, metadata: list | tuple = ()) -> str:
    """A field's type for people: ``float in [0, 1]``, ``data | worker``, ``int > 0 | null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0], [*args[1:], *metadata])
    if origin in (typing.Union, types.UnionType):
        kinds = [_type_text(a) for a in args if a is not type(None)]
        return " | ".join(kinds + (["null"] if type(None) in args else []))
    if origin is Literal:
        return " | ".join(_value_text(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    if origin is list:
        return "[" + (_type_text(args[0]) if args else "") + ", ...]"
    if origin is dict:
        return "{" + (f"{_type_text(args[0])}: {_type_text(args[1])}" if args else "") + "}"
    text = "secret" if annotation is SecretStr else getattr(annotation, "__name__", str(annotation))
    low = next(((f"{c.ge:g}", "[") for c in metadata if isinstance(c, annotated_types.Ge)),
               next(((f"{c.gt:g}", "(") for c in metadata if isinstance(c, annotated_types.Gt)), None))
    high = next(((f"{c.le:g}", "]") for c in metadata if isinstance(c, annotated_types.Le)),
                next(((f"{c.lt:g}", ")") for c in metadata if isinstance(c, annotated_types.Lt)), None))
    if low and high:
        text += f" in {low[1]}{low[0]}, {high[0]}{high[1]}"
    elif low:
        text += (" >= " if low[1] == "[" else " > ") + low[0]
    elif high:
        text += (" <= " if high[1] == "]" else " < ") + high[0]
    if any(isinstance(c, annotated_types.MinLen) and c.min_length == 1 for c in metadata):
        text += ", non-empty"
    return text


def help_text(model: type[BaseModel] = Config, prefix: str = "", sections: typing.Iterable[str] | None = None,
              width: int = 100) -> str:
    """Every dotted key of ``model`` with its type, default and description, grouped by section
    (a section's heading is its model's docstring): the ``--help`` epilog of the jobs, generated
    from the field descriptions so that it never falls behind the model. ``sections``: only these
    top-level sections; ``prefix``: put before every key (``sweep.`` for a sweep's settings)."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if sections is not None and name not in sections:
            continue
        if section:
            doc = (section.__doc__ or "").strip().splitlines()
            lines += ["" if lines else None, f"{prefix}{name}:" + (f" {doc[0]}" if doc else "")]
            lines += [help_text(section, f"{prefix}{name}.", width=width)]
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {prefix}{name}: {_type_text(field.annotation, field.metadata)} = {_value_text(default)}")
        if field.description:
            lines.append(textwrap.fill(" ".join(field.description.split()), width, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6, break_long_words=False, break_on_hyphens=False))
    return "\n".join(line for line in lines if line is not None)


def _is_secret(loc: tuple) -> bool:
    """Whether the field at ``loc`` (e.g. ``('data', 'secret_access_key')``) holds a ``SecretStr``."""
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return model is SecretStr or SecretStr in getattr(model, "__args__", ())


def _one_line(err: ValidationError, model: type[BaseModel] = Config, prefix: str = "") -> str:
    """The first error of ``err`` as ``<prefix><dotted.key>: what is wrong``; unknown keys get
    the closest key of ``model`` as a hint."""
    e = err.errors()[0]
    loc = prefix + ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
    if e["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc, _known_keys(model, prefix), n=1)
        return f"{loc}: unknown key" + (f" (did you mean {hint[0]}?)" if hint else "")
    msg = e["msg"].removeprefix("Value error, ")
    if loc and _is_secret(e["loc"]):  # never echo a secret's value
        return f"{loc}: {msg} (quote the value)" if e["type"] == "string_type" else f"{loc}: {msg}"
    return f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data[a][b] = value`` for ``key`` ``"a.b"``, creating missing sections on the way.

    Raises ``ConfigError`` (``"a.b: a is not a section"``) when a part on the way holds a value
    that is not a mapping.
    """
    *parents, leaf = key.split(".")
    node = data
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {k} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Build a validated Config from an optional YAML file (or a ``base`` mapping, e.g. a
    checkpoint's config) and dotted overrides.

    Raises ``ConfigError`` with one line naming the field on any invalid value or unknown key.
    A deprecated key (``DEPRECATED``), in the file, ``base`` or an override, is read under its
    new name with a one-line ``DeprecatedKeyWarning``; the old and the new name together are an error.
    """
    data: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data, deprecated = _upgrade(data)  # old key names in the file or base, moved to the new ones
    given: dict[str, str] = {}  # current name -> the name an override used for it
    for item in overrides:
        keys, value = parse_override(item)
        key = ".".join(keys)
        name = DEPRECATED.get(key, key)
        if given.setdefault(name, key) != key:
            raise ConfigError(f"{given[name]} and {key} are both set: keep only {name} "
                              f"({key if key in DEPRECATED else given[name]} is its deprecated name)")
        if key in DEPRECATED and key not in deprecated:
            deprecated.append(key)
        set_dotted(data, name, value)
    for old in deprecated:  # one notice per deprecated key, however often it was set
        _warn_deprecated(old)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
