"""Checkpoint files that are never half-read: ``checkpoint.pt`` plus a manifest written last.

A checkpoint folder holds ``checkpoint.pt`` (``torch.save`` of the training state) and
``checkpoint.json`` = ``{"step", "bytes", "sha256"}`` of that file. A folder is *intact* when
the manifest exists and the state file has exactly that size and hash; a crash while writing
or uploading (or a truncated copy) leaves a folder that is not intact, and resume falls back
to the newest intact one. Works on any pyarrow filesystem (local or ``s3://``); no Ray here.

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
import posixpath
from pathlib import Path

import pyarrow.fs
import torch

from rayssl.data.storage import StorageOutage, transient

CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "checkpoint.json"


class CheckpointError(ValueError):
    """No intact checkpoint where one was expected; one line naming the folder."""


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


def save(state: dict, folder: str | Path) -> None:
    """Write ``state`` into ``folder``: the state file first, then its manifest."""
    folder = Path(folder)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    raw = buffer.getvalue()
    (folder / CHECKPOINT_FILE).write_bytes(raw)
    (folder / MANIFEST_FILE).write_text(json.dumps(
        {"step": int(state.get("step", 0)), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}))


def _manifest(fs: pyarrow.fs.FileSystem, folder: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{folder}/{MANIFEST_FILE}") as f:
            manifest = json.loads(f.read())
        return manifest if {"step", "bytes", "sha256"} <= set(manifest) else None
    except (OSError, ValueError, TypeError) as err:
        if transient(err) or isinstance(err, StorageOutage):
            raise
        return None


def load_intact(fs: pyarrow.fs.FileSystem, folder: str) -> dict | None:
    """The state in ``folder`` if it is intact (manifest present, size and SHA-256 match), else None
    (a transient storage error is raised)."""
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
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)


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
