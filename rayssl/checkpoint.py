"""Checkpoint files that are never half-read: ``checkpoint.pt`` plus a manifest written last.

A checkpoint folder holds ``checkpoint.pt`` (``torch.save`` of the training state) and
``checkpoint.json`` = ``{"step", "bytes", "sha256"}`` of that file. A folder is *intact* when
the manifest exists and the state file has exactly that size and hash; a crash while writing
or uploading (or a truncated copy) leaves a folder that is not intact, and resume falls back
to the newest intact one. Works on any pyarrow filesystem (local or ``s3://``); no Ray here.

The state is tensors and plain values only (dicts, lists, tuples, str, int, float, bool, None),
and every load is ``torch.load(weights_only=True)``: a state file that holds any other pickled
object (a class instance, a ``__reduce__`` payload) is refused with ``UnsafeCheckpoint``, never
run. The manifest proves a file whole, not who wrote it. A checkpoint of an older rayssl (numpy
scalars in its optimizer state) is refused too, with its upgrade in the line:
``python -m rayssl.checkpoint upgrade FOLDER`` rewrites it as tensors and plain values, reading it
with numpy's scalar types as the only addition to what ``weights_only`` allows.

An error that may pass by itself (``rayssl.data.storage.transient``: a refused connection, a 5xx)
is raised, never taken for a missing or damaged checkpoint, and so is a ``StorageOutage`` (a
filesystem that rides out outages gave up): a storage outage must not make an older checkpoint,
or none, look like the newest intact one. Callers ride it out (``rayssl.data.storage.ride_out``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import pickle
import posixpath
import re
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.fs
import torch

from rayssl.data.storage import StorageOutage, explain, resolve, transient, uri_of

CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "checkpoint.json"
PLAIN = (str, int, float, bool, type(None))  # with tensors, dicts, lists and tuples: what weights_only loads
LEGACY_TYPES = (np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType)  # an older rayssl's lr / weight decay


class CheckpointError(ValueError):
    """No intact checkpoint where one was expected; one line naming the folder."""


class UnsafeCheckpoint(CheckpointError):
    """A state file holding pickled objects, refused unread; one line naming the file."""


class DiskFull(CheckpointError):
    """A checkpoint its disk could not take (``disk_full``); one line naming the folder, the
    step, the checkpoint's size and the space left."""


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk cannot take more: no space (ENOSPC), the user's quota
    (EDQUOT) or a file-size limit (EFBIG, ``RLIMIT_FSIZE``)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(where: str, step: int, size: int, free: int | None) -> DiskFull:
    """The ``DiskFull`` line: ``where`` could not take the ``size``-byte checkpoint of ``step``
    (``free`` bytes left there, when known)."""
    left = f", {free / 2**20:.1f} MB free" if free is not None else ""
    return DiskFull(f"{where}: no space left on its disk for the checkpoint of step {step} "
                    f"({size / 2**20:.1f} MB{left})")


def _plain(value, where: str = "state"):
    """``value`` as ``weights_only`` loads it: tensors and plain values in dicts, lists and tuples,
    numpy scalars (a schedule's learning rate) as Python numbers; a ``TypeError`` naming
    ``where`` in it for anything else."""
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, np.generic) and type(value.item()) in PLAIN:
        return value.item()
    if isinstance(value, torch.Tensor) or type(value) in PLAIN:
        return value
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a checkpoint (tensors and plain values only)")


def _encode(state: dict) -> tuple[bytes, str]:
    """The state file's bytes (``_plain(state)``) and its manifest's text."""
    buffer = io.BytesIO()
    torch.save(_plain(state), buffer)
    raw = buffer.getvalue()
    return raw, json.dumps({"step": int(state.get("step", 0)), "bytes": len(raw),
                            "sha256": hashlib.sha256(raw).hexdigest()})


def save(state: dict, folder: str | Path) -> None:
    """Write ``state`` into ``folder``: the state file first, then its manifest."""
    folder = Path(folder)
    raw, manifest = _encode(state)
    (folder / CHECKPOINT_FILE).write_bytes(raw)
    (folder / MANIFEST_FILE).write_text(manifest)


def load(raw: bytes, where: str) -> dict:
    """The state in ``raw``, the bytes of the state file ``where``: tensors and plain values only
    (``torch.load(weights_only=True)``); ``UnsafeCheckpoint`` if it holds pickled objects."""
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _pickled(raw, str(err))
        if not names:
            raise
        raise _refusal(where, names) from None


def _pickled(raw: bytes, error: str) -> list[str]:
    """The classes and functions a state file names beyond what ``weights_only`` allows: all of
    them, read without running any; only the first, from torch's error, in a file that is not
    torch's zip format (which rayssl never wrote)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
    except (ValueError, RuntimeError):
        return re.findall(r"GLOBAL ([\w.]+)", error)[:1]


def _refusal(where: str, names: list[str]) -> UnsafeCheckpoint:
    """The line for a state file ``where`` that names ``names``: an older rayssl's (numpy scalars
    only) gets its upgrade command; anything else is refused outright."""
    if set(names) <= {f"{t.__module__}.{t.__name__}" for t in LEGACY_TYPES}:
        return UnsafeCheckpoint(f"{where}: written by an older rayssl (numpy scalars in its state), not loaded; "
                                f"upgrade it to tensors and plain values: python -m rayssl.checkpoint upgrade "
                                f"{posixpath.dirname(where) or '.'}")
    return UnsafeCheckpoint(f"{where}: refused, not loaded: it holds pickled objects ({', '.join(names)}); "
                            f"a rayssl checkpoint holds tensors and plain values only")


def _manifest(fs: pyarrow.fs.FileSystem, folder: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{folder}/{MANIFEST_FILE}") as f:
            manifest = json.loads(f.read())
        return manifest if {"step", "bytes", "sha256"} <= set(manifest) else None
    except (OSError, ValueError, TypeError) as err:
        if transient(err) or isinstance(err, StorageOutage):
            raise
        return None


def _intact_bytes(fs: pyarrow.fs.FileSystem, folder: str) -> bytes | None:
    """The state file of ``folder`` if it is intact (manifest present, size and SHA-256 match),
    else None (a transient storage error is raised)."""
    manifest = _manifest(fs, folder)
    if manifest is None:
        return None
    try:
        with fs.open_input_stream(f"{folder}/{CHECKPOINT_FILE}") as f:
            raw = f.read()
    except OSError as err:
        if transient(err):
            raise
        return None
    if len(raw) != manifest["bytes"] or hashlib.sha256(raw).hexdigest() != manifest["sha256"]:
        return None
    return raw


def load_intact(fs: pyarrow.fs.FileSystem, folder: str) -> dict | None:
    """The state in ``folder`` if it is intact, else None (a transient storage error is raised);
    ``UnsafeCheckpoint`` if its state file holds pickled objects (``load``)."""
    raw = _intact_bytes(fs, folder)
    return None if raw is None else load(raw, uri_of(fs, f"{folder}/{CHECKPOINT_FILE}"))


def candidates(fs: pyarrow.fs.FileSystem, run_path: str) -> list[str]:
    """The ``checkpoint_*`` folders of a Ray Train run folder, newest step first (by manifest,
    then by name, which Ray stamps with the time); folders without a manifest come last."""
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
    except OSError as err:
        if transient(err):
            raise
        return []
    folders = [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
               and posixpath.basename(i.path).startswith("checkpoint_")]
    steps = {f: (_manifest(fs, f) or {}).get("step", -1) for f in folders}
    return sorted(folders, key=lambda f: (steps[f], f), reverse=True)


def latest_intact(fs: pyarrow.fs.FileSystem, run_path: str,
                  skipped: list[str] | None = None) -> tuple[str, dict] | None:
    """``(folder, state)`` of the newest intact checkpoint of a run folder, or None if there is
    none; the folders passed over (not intact) are appended to ``skipped``."""
    for folder in candidates(fs, run_path):
        state = load_intact(fs, folder)
        if state is not None:
            return folder, state
        if skipped is not None:
            skipped.append(folder)
    return None


def upgrade(fs: pyarrow.fs.FileSystem, folder: str) -> str:
    """Rewrite the intact checkpoint in ``folder`` that an older rayssl wrote (numpy scalars in its
    state) as tensors and plain values, with its new manifest; what was done, in words. Read with
    ``weights_only`` and numpy's scalar types alone added, so any other pickled object is refused
    here too (``UnsafeCheckpoint``), never run; a folder that is not intact is left as it is."""
    where = uri_of(fs, folder)
    raw = _intact_bytes(fs, folder)
    if raw is None:
        return f"{where}: not intact (size or SHA-256 differ from its {MANIFEST_FILE}), left as it is"
    try:
        load(raw, f"{where}/{CHECKPOINT_FILE}")
        return f"{where}: already tensors and plain values, left as it is"
    except UnsafeCheckpoint:
        with torch.serialization.safe_globals(list(LEGACY_TYPES)):
            state = load(raw, f"{where}/{CHECKPOINT_FILE}")
    raw, manifest = _encode(state)
    with fs.open_output_stream(f"{folder}/{CHECKPOINT_FILE}") as f:
        f.write(raw)
    with fs.open_output_stream(f"{folder}/{MANIFEST_FILE}") as f:  # last, as save writes it
        f.write(manifest.encode())
    return f"{where}: upgraded (step {state.get('step', 0)})"


def main(argv: list[str] | None = None) -> int:
    """``python -m rayssl.checkpoint upgrade PATH``: a checkpoint folder, or every ``checkpoint_*``
    folder of a run folder, local or ``s3://`` (S3 settings from the AWS chain and
    ``AWS_ENDPOINT_URL``). One line per folder; exit code 2 and one line on an error."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rayssl.checkpoint", description=main.__doc__)
    parser.add_argument("command", choices=["upgrade"])
    parser.add_argument("path", help="a checkpoint_* folder or a run folder, local or s3://")
    args = parser.parse_args(argv)
    try:
        fs, path = resolve(args.path)
        single = fs.get_file_info(f"{path}/{MANIFEST_FILE}").type == pyarrow.fs.FileType.File
        folders = [path] if single else candidates(fs, path)
        if not folders:
            raise CheckpointError(f"{args.path}: no checkpoint folder in it")
        for folder in folders:
            print(upgrade(fs, folder))
    except OSError as err:
        parser.exit(2, f"error: {explain(args.path, err)}\n")
    except ValueError as err:  # CheckpointError, StorageError
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
