"""A run's checkpoint outside training: read it (local or ``s3://``), rebuild its teacher.

The checkpoint folders themselves (writing, the manifest, finding the newest intact one) are
``rayssl.checkpoint``; this module turns one into a network: the trained backbone, or the same
architecture at its random initialisation, and the preprocessing it was trained with.
``load_backbone`` is the public way out of rayssl: a plain torch module and the torchvision
v2 preprocessing that matches what it saw in training.
"""

from __future__ import annotations

import pyarrow.fs
import torch
from torch import nn

from rayssl import checkpoint as checkpoints
from rayssl.checkpoint import CHECKPOINT_FILE, CheckpointError, UnsafeCheckpoint
from rayssl.config import Config, ConfigError
from rayssl.data import storage
from rayssl.data.meta import DataMeta
from rayssl.models import Encoder, initial_encoder
from rayssl.transforms import EvalPreprocess


def _read(fs: pyarrow.fs.FileSystem, path: str, uri: str) -> dict:
    """The state at ``path``: a ``checkpoint.pt`` file as it is, or the newest intact checkpoint
    of a checkpoint folder or a run folder (see ``rayssl.checkpoint``); tensors and plain values
    only (``UnsafeCheckpoint`` for a state file holding pickled objects)."""
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise storage.StorageError(f"{uri}: not found")
    if info.type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            return checkpoints.load(raw, uri)
        except UnsafeCheckpoint:
            raise
        except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
            raise ConfigError(f"{uri}: not a rayssl checkpoint ({type(err).__name__})") from None
    if fs.get_file_info(f"{path}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File:
        state = checkpoints.load_intact(fs, path)
        if state is None:
            raise CheckpointError(f"{uri}: checkpoint is incomplete or corrupt (size or SHA-256 "
                                  f"differ from its {checkpoints.MANIFEST_FILE})")
        return state
    found = checkpoints.latest_intact(fs, path)
    if found is None:
        raise CheckpointError(f"{uri}: no intact checkpoint_* folder in it")
    return found[1]


def read_checkpoint(uri: str, s3: storage.S3Options | None = None) -> dict:
    """The state saved by training, from a ``checkpoint.pt``, a checkpoint folder or a run folder
    (its newest intact checkpoint). Raises ``StorageError`` / ``ConfigError`` /
    ``CheckpointError`` (one line naming ``uri``), ``UnsafeCheckpoint`` (naming the state file)
    for one that holds pickled objects: never loaded."""
    fs, path = storage.resolve(uri, s3)
    try:
        state = _read(fs, path, uri)
    except OSError as err:
        raise storage.explain(uri, err, s3) from None
    missing = {"teacher", "config", "meta"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ConfigError(f"{uri}: not a rayssl checkpoint (missing {', '.join(sorted(missing))})")
    return state


def random_init(cfg: Config, meta: DataMeta) -> Encoder:
    """The encoder at training's initialisation (``rayssl.models.initial_encoder``), eval mode, CPU;
    the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return initial_encoder(cfg, meta.channels).eval()


def teacher_from_state(state: dict, cfg: Config | None = None) -> tuple[Encoder, Config, DataMeta]:
    """The teacher encoder (eval mode, CPU), the config and the data description of a checkpoint.

    ``cfg`` (default: the checkpoint's own) must describe the same model; otherwise the
    ``ConfigError`` names the first mismatching weight.
    """
    cfg = cfg or Config.model_validate(state["config"])
    meta = DataMeta(**state["meta"])
    teacher = random_init(cfg, meta)
    try:
        teacher.load_state_dict(state["teacher"])
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ConfigError(f"model: the checkpoint's weights do not fit this config ({detail[:160]})") from None
    return teacher, cfg, meta


def preprocessing(cfg: Config, meta: DataMeta) -> EvalPreprocess:
    """PIL image or uint8 tensor -> normalised float tensor, as training and ``rayssl.eval.evaluate``
    see the teacher's input: shorter side resized to ``augment.global_crop_size``, centre crop,
    dataset mean / std (``rayssl.transforms.EvalPreprocess``, a torchvision v2 ``Compose``)."""
    return EvalPreprocess(cfg.augment.global_crop_size, meta.channels, meta.mean, meta.std)


def load_backbone(checkpoint: str, endpoint_url: str | None = None, region: str | None = None
                  ) -> tuple[nn.Module, EvalPreprocess]:
    """``(backbone, preprocess)``: the teacher's backbone as a plain torch module in eval mode
    (``backbone(preprocess(img)[None])`` -> (1, D) features) and its preprocessing. S3 credentials
    come from the AWS chain."""
    s3 = storage.S3Options(endpoint_url, region)
    teacher, cfg, meta = teacher_from_state(read_checkpoint(checkpoint, s3))
    return teacher.backbone, preprocessing(cfg, meta)
