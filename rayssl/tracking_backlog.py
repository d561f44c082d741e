"""The MLflow backlog: what world rank 0 could not deliver yet, kept in order, delivered later.

How it works:

- Every write of ``rayssl.tracking.RunLogger`` (a step's metrics, a param, a tag, an artifact, the
  training curves, the model, the final status) is an *entry*: a small JSON-able dict appended
  to a ``Backlog``. A file is written at once to a local spool folder (a figure as PNG, a dict as
  JSON, the model's weights as ``torch.save`` of tensors only) and the entry names it, so no
  object is held. A metric entry keeps its step and the time it was logged.
- ``deliver`` sends one entry. ``RunLogger`` delivers from the head, in order: while MLflow
  answers the backlog is empty after every call; when a delivery fails, the entry stays at the
  head, later ones queue behind it and the head is retried at most every few seconds, beside
  training, until MLflow answers. An entry no retry can deliver (MLflow answered with a 4xx: a
  param that changed value, a deleted run; or its file is gone) is dropped, with one line.
- The backlog is bounded: ``max_points`` metric values and ``max_bytes`` of artifact files;
  past either, newer metrics and artifacts are dropped and counted. Params, tags, the curves,
  the model and the status are few and always kept.
- If MLflow still does not answer when the run ends, ``Backlog.keep`` writes the backlog to the
  run folder (local or ``s3://``, beside the checkpoints):

      tracking_backlog/<stamp>.jsonl       a header line naming the run, then one entry a line
      tracking_backlog/<stamp>/...         the entries' files
      tracking_backlog/<stamp>.delivered   {"lines": n}: how much ``sync`` delivered

  Nothing in it is pickled, since it is read back from storage: the model is rebuilt from its
  config (``rayssl.models.build_backbone``) and its weights are loaded with ``weights_only=True``.
- ``sync`` (``jobs/sync_tracking.py``) replays the backlogs of a run folder into their MLflow run,
  in order, the recorded status last. It skips metric points whose step the run already has
  and records its progress in ``<stamp>.delivered``, so running it again delivers nothing twice.

Values reach entries already redacted (``Config.redacted``, ``mask_uri``); the tracking URI is
recorded with its password masked.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

import rayssl
from rayssl.config import ConfigError, mask_uri
from rayssl.data import storage
from rayssl.mlflow_client import mlflow_client, quick_http

DIR = "tracking_backlog"
MODEL_NAME = "backbone"
MAX_POINTS = 200_000  # metric values held in memory (~20 MB)
MAX_BYTES = 2 * 1024**3  # artifact files in the spool folder
BOUNDED = ("metrics", "artifact")  # the kinds that count against the bounds
LABELS = {"metrics": "metric points", "param": "params", "tag": "tags", "artifact": "artifacts",
          "curves": "training curves", "model": "model"}  # what sync says it delivered


@dataclass(frozen=True)
class RunFolder:
    """A run's folder (where its checkpoints are): a pyarrow filesystem (None: local), the path
    on it, and the folder as the user writes it (``s3://...``) for messages and commands."""

    filesystem: Any
    path: str
    uri: str

    @classmethod
    def of(cls, uri: str, options: storage.S3Options | None = None) -> RunFolder:
        fs, path = storage.resolve(uri, options)
        return cls(fs, path, uri.rstrip("/"))

    @property
    def fs(self) -> pyarrow.fs.FileSystem:
        return self.filesystem or pyarrow.fs.LocalFileSystem()

    @property
    def backlog(self) -> str:
        return f"{self.path}/{DIR}"


@dataclass(frozen=True)
class Target:
    """The MLflow run entries go to."""

    client: Any  # MlflowClient
    uri: str
    run_id: str


def weight(entry: dict) -> int:
    """Points of an entry: its metric values, else 1."""
    return len(entry["values"]) if entry["kind"] == "metrics" else 1


class Backlog:
    """Entries not delivered yet, oldest first, with their files in a spool folder (thread-safe;
    one thread delivers at a time)."""

    def __init__(self, max_points: int = MAX_POINTS, max_bytes: int = MAX_BYTES) -> None:
        self.max_points, self.max_bytes = max_points, max_bytes
        self.entries: deque[dict] = deque()
        self.points = self.bytes = self.dropped = self.numbered = 0
        self.lock = threading.Lock()
        self.spool: Path | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def write(self, name: str, write: Callable[[Path], Any]) -> str:
        """A new spooled file called ``name`` in MLflow, written by ``write(path)``; its path
        relative to the spool folder (nothing is left of it if ``write`` raises)."""
        with self.lock:
            self.spool = self.spool or Path(tempfile.mkdtemp(prefix="rayssl-mlflow-"))
            self.numbered += 1
            relative = f"{self.numbered:06d}/{name}"
        path = self.spool / relative
        path.parent.mkdir()
        try:
            write(path)
        except BaseException:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise
        return relative

    def add(self, entry: dict) -> bool:
        """Append ``entry`` (its file written already); False, its file removed and its points
        counted as dropped, when a bound would be passed."""
        if "file" in entry:
            entry["bytes"] = (self.spool / entry["file"]).stat().st_size
        points, size = weight(entry), entry.get("bytes", 0)
        with self.lock:
            fits = self.points + points <= self.max_points and self.bytes + size <= self.max_bytes
            if fits or entry["kind"] not in BOUNDED:
                self.entries.append(entry)
                self.points, self.bytes = self.points + points, self.bytes + size
                return True
            self.dropped += points
        self._remove_file(entry)
        return False

    def head(self) -> dict | None:
        return self.entries[0] if self.entries else None

    def pop(self) -> None:
        """Remove the head (delivered, or undeliverable) and its file."""
        with self.lock:
            entry = self.entries.popleft()
            self.points, self.bytes = self.points - weight(entry), self.bytes - entry.get("bytes", 0)
        self._remove_file(entry)

    def _remove_file(self, entry: dict) -> None:
        if "file" in entry:
            shutil.rmtree((self.spool / entry["file"]).parent, ignore_errors=True)

    def summary(self) -> str:
        has_model = any(e["kind"] == "model" for e in self.entries)
        return f"{self.points} points" + (" and the model" if has_model else "")

    def keep(self, place: RunFolder, header: dict) -> str:
        """Write the entries to ``place``'s ``tracking_backlog/``, their files first and the
        JSON-lines file last (a reader never sees half a backlog); the folder as the user writes it."""
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1e6) % 10**6:06d}"
        fs, root, entries = place.fs, place.backlog, list(self.entries)
        fs.create_dir(root, recursive=True)
        if any("file" in e for e in entries):
            pyarrow.fs.copy_files(str(self.spool), f"{root}/{stamp}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
        lines = [{"kind": "run", **header, "written": stamp, "dropped": self.dropped}, *entries]
        with fs.open_output_stream(f"{root}/{stamp}.jsonl") as out:
            out.write("".join(json.dumps(line) + "\n" for line in lines).encode())
        return f"{place.uri}/{DIR}"

    def close(self) -> None:
        """Remove the spool folder (once the entries are delivered or kept)."""
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)


def keep_text(place: RunFolder, run_id: str, uri: str, name: str, text: str) -> str:
    """``text`` as the artifact ``name``, kept in a backlog of its own in ``place`` (``report.md``
    when MLflow does not answer after training); the folder."""
    backlog = Backlog()
    try:
        relative = backlog.write(name, lambda path: path.write_text(text))
        backlog.add({"kind": "artifact", "file": relative, "path": ""})
        return backlog.keep(place, {"run_id": run_id, "uri": mask_uri(uri)})
    finally:
        backlog.close()


# ---------------------------------------------------------------------- delivery
class BrokenEntry(ValueError):
    """An entry no MLflow can take: its file is gone, its model cannot be rebuilt, an unknown kind."""


def deliver(target: Target, entry: dict, base: Path | None) -> None:
    """Send one entry to MLflow (raising what MLflow raises, or ``BrokenEntry``); its file is under ``base``."""
    client, run_id, kind = target.client, target.run_id, entry["kind"]
    if "file" in entry and not (base / entry["file"]).is_file():
        raise BrokenEntry(f"{entry['file']}: the file is gone")
    if kind == "metrics":
        from mlflow.entities import Metric

        client.log_batch(run_id, metrics=[Metric(k, v, entry["timestamp"], entry["step"])
                                          for k, v in entry["values"].items()])
    elif kind == "param":
        client.log_param(run_id, entry["key"], entry["value"])
    elif kind == "tag":
        client.set_tag(run_id, entry["key"], entry["value"])
    elif kind == "artifact":
        client.log_artifact(run_id, str(base / entry["file"]), entry["path"] or None)
    elif kind == "curves":
        _curves(target, entry["title"])
    elif kind == "model":
        _model(target, entry, base / entry["file"])
    elif kind == "status":
        client.set_terminated(run_id, status=entry["status"])
    else:
        raise BrokenEntry(f"unknown entry kind {kind!r}")


def undeliverable(err: BaseException) -> bool:
    """Whether a retry cannot help: a ``BrokenEntry``, or MLflow answered with a refusal (a 4xx
    other than authentication, timeout and rate limits: a param that changed value, a deleted
    run). Anything else is taken for MLflow (or its artifact store) not answering."""
    from mlflow.exceptions import MlflowException

    status = err.get_http_status_code() if isinstance(err, MlflowException) else 500
    return isinstance(err, BrokenEntry) or (400 <= status < 500 and status not in (401, 403, 408, 429))


def _curves(target: Target, title: str) -> None:
    """``plots/training_curves.png`` from the run's whole metric history (every launch)."""
    from rayssl.plots import CURVES, curves_figure

    history = {name: [(m.step, m.value) for m in target.client.get_metric_history(target.run_id, name)]
               for _, names in CURVES for name in names}
    target.client.log_figure(target.run_id, curves_figure(history, title), "plots/training_curves.png")


def _model(target: Target, entry: dict, weights: Path) -> None:
    """The backbone rebuilt from its config and weights, via ``mlflow.pytorch.log_model`` (rayssl's
    code bundled, so ``mlflow.pytorch.load_model`` needs no rayssl install), optionally registered."""
    import mlflow
    import mlflow.pytorch
    import torch
    import torchvision

    from rayssl.models import build_backbone

    m, meta = entry["model"], entry["metadata"]
    try:
        saved = torch.load(weights, map_location="cpu", weights_only=True)
        backbone, _ = build_backbone(m["backbone"], meta["channels"], meta["image_size"], m["small_stem"], m["width"])
        backbone.load_state_dict(saved["state_dict"])
    except Exception as err:  # noqa: BLE001 - local: no retry would change it
        raise BrokenEntry(f"the model cannot be rebuilt ({one_line(err)})") from err
    backbone.requires_grad_(False).eval()
    mlflow.set_tracking_uri(target.uri)
    with mlflow.start_run(run_id=target.run_id):
        info = mlflow.pytorch.log_model(
            backbone, name=MODEL_NAME, input_example=saved["example"].numpy(), metadata=meta,
            code_paths=[str(Path(rayssl.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}"],
            registered_model_name=entry["register_as"])
        mlflow.set_tag("rayssl.model_uri", info.model_uri)


# ---------------------------------------------------------------------- kept backlogs
def pending(place: RunFolder) -> list[str]:
    """The backlogs (``<stamp>.jsonl``) of a run folder not wholly delivered, oldest first
    (none when the folder cannot be read)."""
    fs = place.fs
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(place.backlog, allow_not_found=True))
        names = sorted(i.path for i in infos if i.path.endswith(".jsonl"))
        return [path for path in names if _delivered(fs, path) < len(_read(fs, path))]
    except (OSError, ValueError):
        return []


def _read(fs: pyarrow.fs.FileSystem, path: str) -> list[dict]:
    with fs.open_input_stream(path) as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def _delivered(fs: pyarrow.fs.FileSystem, path: str) -> int:
    try:
        with fs.open_input_stream(path.removesuffix(".jsonl") + ".delivered") as f:
            return int(json.loads(f.read())["lines"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _mark(fs: pyarrow.fs.FileSystem, path: str, lines: int) -> None:
    with fs.open_output_stream(path.removesuffix(".jsonl") + ".delivered") as out:
        out.write(json.dumps({"lines": lines, "at": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())


def sync(folder: str, uri: str | None = None) -> list[str]:
    """Replay the backlogs kept in ``folder`` (a run folder or its ``tracking_backlog/``, local
    or ``s3://``) into their MLflow run, oldest first, each ending with its recorded status; one
    line per backlog saying what it delivered. ``uri`` (else ``MLFLOW_TRACKING_URI``, else the
    recorded one) is the MLflow store. A missing folder, an unreachable store or one that stops
    answering raises ``ConfigError`` (one line; what was delivered stays marked)."""
    folder = folder.rstrip("/")
    place = RunFolder.of(folder.removesuffix(f"/{DIR}") if posixpath.basename(folder) == DIR else folder)
    try:
        found = place.fs.get_file_info(place.backlog).type == pyarrow.fs.FileType.Directory
    except OSError as err:
        raise storage.explain(place.uri, err) from None
    if not found:
        raise ConfigError(f"{folder}: no {DIR}/ folder here (MLflow took everything, or this is not a run folder)")
    backlogs = pending(place)
    if not backlogs:
        return [f"nothing to deliver: every backlog in {place.uri}/{DIR} was delivered already"]
    return [_replay(place.fs, path, uri) for path in backlogs]


def _replay(fs: pyarrow.fs.FileSystem, path: str, uri: str | None) -> str:
    """Deliver one kept backlog from where an earlier sync stopped; what it delivered."""
    lines = _read(fs, path)
    header, start = lines[0], max(_delivered(fs, path), 1)
    if header.get("kind") != "run":
        raise ConfigError(f"{path}: not a rayssl tracking backlog")
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or header["uri"]
    if "***" in uri:
        raise ConfigError(f"{mask_uri(uri)}: the recorded tracking URI has its password masked; pass --tracking-uri")
    with quick_http(), tempfile.TemporaryDirectory(prefix="rayssl-sync-") as tmp:
        try:
            target = Target(mlflow_client(uri, create=False), uri, header["run_id"])
            target.client.get_run(target.run_id)
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds: connection, auth, bad URI
            raise ConfigError(f"cannot use MLflow at {mask_uri(uri)} ({one_line(err)}); nothing delivered, "
                              "the backlog stays: run this again when it answers") from None
        if any("file" in e for e in lines[start:]):
            pyarrow.fs.copy_files(path.removesuffix(".jsonl"), tmp, source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
        done = _deliver_lines(target, lines, start, Path(tmp), lambda n: _mark(fs, path, n))
    return f"delivered to MLflow run {target.run_id} at {mask_uri(uri)}: {done}"


def _deliver_lines(target: Target, lines: list[dict], start: int, base: Path, mark) -> str:
    """Entries ``lines[start:]`` in order, without the metric points the run already has;
    ``mark(n)`` after the model (the one entry that a repeat would log twice) and at the end."""
    keys = {k for e in lines[start:] if e["kind"] == "metrics" for k in e["values"]}
    present = {k: {m.step for m in target.client.get_metric_history(target.run_id, k)} for k in keys}
    counts: Counter = Counter()
    for n, entry in enumerate(lines[start:], start):
        if entry["kind"] == "metrics":
            values = {k: v for k, v in entry["values"].items() if entry["step"] not in present[k]}
            counts["metric points already in the run"] += len(entry["values"]) - len(values)
            entry = {**entry, "values": values}
            if not values:
                continue
        try:
            deliver(target, entry, base)
        except Exception as err:  # noqa: BLE001 - said in one line; the rest stays for the next sync
            if not undeliverable(err):
                mark(n)
                raise ConfigError(f"MLflow stopped answering after {n - 1} of {len(lines) - 1} entries "
                                  f"({one_line(err)}); run this again to deliver the rest") from None
            counts[f"undeliverable ({one_line(err)})"] += 1
            continue
        if entry["kind"] != "status":
            counts[LABELS[entry["kind"]]] += weight(entry)
        if entry["kind"] == "model":
            mark(n + 1)
    mark(len(lines))
    status = next((e["status"] for e in reversed(lines) if e["kind"] == "status"), None)
    said = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    return (said or "nothing new") + (f"; status {status}" if status else "")


def one_line(err: BaseException) -> str:
    """``Type: first line`` of an error, secrets masked."""
    text = str(err).splitlines()[0][:160] if str(err) else ""
    return f"{type(err).__name__}: {mask_uri(text)}" if text else type(err).__name__
