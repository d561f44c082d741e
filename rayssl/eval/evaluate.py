"""Evaluate a checkpoint: features by a Ray Data actor pool, then k-NN, linear probe, clusters.

k-NN and linear probe also score two floors with ``eval.baselines``: raw pixels and the
backbone at its random initialisation, with the same preprocessing and the same feature
protocol (``rayssl.eval.protocol``): each network's BatchNorm statistics recomputed on the
first ``eval.precise_bn_images`` clean bank images (by the driver, before extraction), and the
k-NN features centred by the bank mean (``eval.center``).

Extraction (``stream_features``) is ``read_parquet`` -> ``decode_stage`` (CPU tasks) -> ``map_batches(FeatureActor)``
on an actor pool (one GPU each when ``use_gpu``), so it scales to a cluster. The driver runs
the small cluster head on the gathered features (teacher posterior ``softmax(z / tau_t)``),
then the pure metrics of ``rayssl.eval.metrics``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from tqdm import tqdm

from rayssl.config import Config, ConfigError, mask_uri
from rayssl.data.datasets import decode_stage, read, sources
from rayssl.data.images import Limits
from rayssl.data.storage import S3Options
from rayssl.eval import metrics
from rayssl.eval.backbone import preprocessing, random_init, read_checkpoint, teacher_from_state
from rayssl.eval.protocol import bank_mean, precise_bn

KS = (10, 20, 100, 200)
BASELINES = ("raw_pixels", "random_init")  # the floors of every k-NN / linear number, with eval.baselines


class FeatureActor:
    """Ray Data actor: decoded uint8 images -> the teacher backbone's features (rows that decoded),
    with ``eval.baselines`` also ``raw_pixels`` (the resized, centre-cropped image in [0, 1],
    flattened) and ``random_init`` (the backbone at training's initialisation, same preprocessing).
    The preprocessing is the checkpoint's published one (``rayssl.eval.backbone.preprocessing``);
    ``bn`` holds each backbone's precise-BatchNorm buffers (``batchnorm_buffers``), if any."""

    def __init__(self, checkpoint: str, config: dict, s3: S3Options, bn: dict[str, dict] | None = None) -> None:
        cfg = Config.model_validate(config)
        teacher, _, meta = teacher_from_state(read_checkpoint(checkpoint, s3), cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbones = {name: net.backbone for name, net in backbones(cfg, teacher, meta).items()}
        for name, buffers in (bn or {}).items():
            if unexpected := self.backbones[name].load_state_dict(buffers, strict=False).unexpected_keys:
                raise ValueError(f"eval.precise_bn_images: {name} has no buffer {unexpected[0]}")
        self.backbones = {name: net.to(self.device).eval() for name, net in self.backbones.items()}
        self.raw_pixels = cfg.eval.baselines
        self.preprocess = preprocessing(cfg, meta)  # the one published with the checkpoint

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        ok = batch["ok"]
        images = torch.from_numpy(np.array(batch["image"][ok])).permute(0, 3, 1, 2).to(self.device)
        x = self.preprocess.pixels(images)
        normed = self.preprocess.normalize(x)
        out = {name: net(normed).float().cpu().numpy() for name, net in self.backbones.items()}
        if self.raw_pixels:
            out["raw_pixels"] = x.flatten(1).cpu().numpy()
        return {"id": batch["id"][ok], "label": batch["label"][ok], **out}


def backbones(cfg: Config, teacher, meta) -> dict:
    """The networks whose features are evaluated: ``feature`` (the teacher) and, with
    ``eval.baselines``, ``random_init``."""
    return {"feature": teacher, **({"random_init": random_init(cfg, meta)} if cfg.eval.baselines else {})}


def decoded(uri: str, manifest: dict, cfg: Config, limit: int | None) -> ray.data.Dataset:
    """The first ``limit`` rows of the shards at ``uri``, decoded (``decode_stage``; an image past
    ``data.max_image_pixels`` or ``data.max_item_bytes`` is not ok, as in training)."""
    d = cfg.data
    size = d.image_size or min(manifest.get("image_size") or [cfg.augment.global_crop_size])
    return (read(uri, manifest, d, ["id", "image", "label"], limit)
            .map_batches(decode_stage, batch_size=256, batch_format="numpy",
                         fn_kwargs={"channels": d.channels or manifest["channels"], "size": size,
                                    "limits": Limits.of(d)}))


def batchnorm_buffers(uri: str, manifest: dict, cfg: Config, nets: dict, preprocess) -> dict[str, dict]:
    """Precise BatchNorm (``rayssl.eval.protocol.precise_bn``) of each backbone in ``nets`` on the
    first ``eval.precise_bn_images`` bank images at ``uri``, on the driver: ``{name: buffers}``
    (running statistics only, small enough for the actors' constructor arguments)."""
    n = cfg.eval.precise_bn_images
    if not n:
        return {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def clean():
        for batch in decoded(uri, manifest, cfg, n).iter_batches(batch_size=256, batch_format="numpy"):
            ok = batch["ok"]
            if ok.any():
                images = torch.from_numpy(np.array(batch["image"][ok])).permute(0, 3, 1, 2).to(device)
                yield preprocess.normalize(preprocess.pixels(images))

    # every backbone in one pass over the images (a copy on the device; the originals stay)
    both = copy.deepcopy(torch.nn.ModuleDict({name: net.backbone for name, net in nets.items()})).to(device)
    both = precise_bn(both, clean(), lambda m, x: [backbone(x) for backbone in m.values()])
    out: dict[str, dict] = {name: {} for name in nets}
    for key, value in both.state_dict().items():
        name, rest = key.split(".", 1)
        if rest.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            out[name][rest] = value.cpu()
    return out


def stream_features(uri: str, manifest: dict, cfg: Config, checkpoint: str, limit: int | None,
                    actors: int, use_gpu: bool, bn: dict[str, dict]) -> dict[str, np.ndarray]:
    """``{"id", "feature" (N, D), "label"}`` of the first ``limit`` rows of the shards at ``uri``,
    and the ``BASELINES`` columns with ``eval.baselines``; ``bn`` from ``batchnorm_buffers``.
    A Ray Data pass over the shards through ``FeatureActor``s (the in-memory, in-process
    counterpart used by training's k-NN is ``rayssl.eval.online.features_of``)."""
    ds = (decoded(uri, manifest, cfg, limit)
          .map_batches(FeatureActor, batch_size=256, batch_format="numpy",
                       fn_constructor_kwargs={"checkpoint": checkpoint, "config": cfg.model_dump(),
                                              "s3": S3Options.for_runs(cfg.data), "bn": bn},
                       compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if use_gpu else 0))
    ds.context.execution_options.preserve_order = True  # the first ``limit`` rows, as in training
    parts, total = [], min(manifest["num_images"], limit or manifest["num_images"])
    print(f"[rayssl] features of {total} images of {mask_uri(uri)}", flush=True)
    with tqdm(total=total, unit="img", disable=None,
              desc=f"features of {uri.rstrip('/').rsplit('/', 1)[-1]}", leave=False) as bar:  # a terminal's only bar
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(part)
            bar.update(len(part["label"]))
    if not parts:
        raise ConfigError(f"{uri}: no decodable images to evaluate")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def assign(head: torch.nn.Module, feats: np.ndarray, temperature: float, chunk: int = 4096
           ) -> tuple[np.ndarray, np.ndarray, metrics.DiagnosticsAccumulator]:
    """Teacher cluster ``argmax``, its probability and the diagnostics of ``softmax(head(f) / T)``."""
    clusters, top, acc = [], [], metrics.DiagnosticsAccumulator()
    for i in range(0, len(feats), chunk):
        probs = torch.softmax(head(torch.from_numpy(feats[i:i + chunk])).float() / temperature, dim=1)
        acc.update(probs)
        p, k = probs.max(dim=1)
        clusters.append(k.numpy())
        top.append(p.numpy())
    return np.concatenate(clusters), np.concatenate(top), acc


def export(path: Path, split: str, data: dict, clusters: np.ndarray, max_prob: np.ndarray) -> None:
    """Embeddings as Parquet: ``id``, ``embedding`` (fixed-size list), ``cluster``, ``max_prob``, ``label``."""
    feats = data["feature"].astype(np.float32)
    table = pa.table({
        "id": pa.array(data["id"].astype(str)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1]),
        "cluster": pa.array(clusters.astype(np.int64)), "max_prob": pa.array(max_prob.astype(np.float32)),
        "label": pa.array(np.where(data["label"] < 0, None, data["label"]), pa.int64()),
        "split": pa.array([split] * len(feats))})
    pq.write_table(table, path)


GALLERY_FILES = ("gallery_top.png", "gallery_tail.png", "cluster_class_map.png", "embedding_map.png")


def member_images(uri: str, manifest: dict, cfg: Config, limit: int | None, ids) -> dict[str, np.ndarray]:
    """``{id: uint8 (H, W, C) image}`` of the rows among the first ``limit`` at ``uri`` whose id
    (as ``str``) is in ``ids`` and that decoded: one more pass over the shards, since
    ``FeatureActor`` keeps no image."""
    from rayssl.eval.gallery import images_by_id

    ds = decoded(uri, manifest, cfg, limit)
    ds.context.execution_options.preserve_order = True  # the same first ``limit`` rows as ``stream_features``
    return images_by_id(ds.iter_batches(batch_size=256, batch_format="numpy"), {str(i) for i in ids})


def write_gallery(out: Path, uri: str, manifest: dict, cfg: Config, eval_set: dict, clusters: np.ndarray,
                  max_prob: np.ndarray, num_clusters: int, top: int = 32) -> dict[str, list[int]]:
    """What the clusters hold (``rayssl.eval.gallery``), as PNGs under ``out``: ``gallery_top.png``
    and ``gallery_tail.png`` (the ``top`` most-used / least-used clusters of the evaluation split
    and their most confident images), with labels ``cluster_class_map.png``, and
    ``embedding_map.png`` (the features' t-SNE, coloured by class, or by cluster when no image has
    a label). Only the images shown are read again (``member_images``). Returns the cluster ids
    of both galleries, ``{"top": [...], "tail": [...]}``. Purity and NMI are already
    ``cluster/majority_accuracy`` and ``cluster/nmi`` (``metrics.clustering_metrics``)."""
    from rayssl.eval.gallery import cluster_class_map, embedding_map, galleries, select, shown_ids

    labels = eval_set["label"] if (eval_set["label"] >= 0).any() else None
    names = list(manifest.get("classes") or []) or None
    if labels is not None and names is not None and labels.max() >= len(names):
        names = None  # labels the manifest does not name: drawn as numbers
    num_classes = len(names) if names else None
    picks = {part: select(clusters, max_prob, labels, top=top, tail=part == "tail", num_classes=num_classes)
             for part in ("top", "tail")}
    keys = shown_ids(picks, eval_set["id"])
    images = member_images(uri, manifest, cfg, cfg.data.eval_limit, keys)
    if missing := [key for key in keys if key not in images]:
        raise RuntimeError(f"{uri}: {len(missing)} gallery images not found again (id {missing[0]})")
    for name, figure in galleries(picks, eval_set["id"], images, num_clusters, names).items():
        figure.savefig(out / name)
    feats = eval_set["feature"]
    if labels is None:
        colour, colour_names, by = clusters, None, "cluster"
    else:
        cluster_class_map(clusters, labels, num_clusters, names).savefig(out / "cluster_class_map.png")
        keep = labels >= 0  # images without a label have no class colour
        feats, colour, by = feats[keep], labels[keep], "class"
        colour_names = names or [str(c) for c in range(int(colour.max()) + 1)]
    shown = min(len(feats), 10_000)  # embedding_map's max_points
    embedding_map(feats, colour, colour_names, title=f"t-SNE of {shown} evaluation images' features, by {by}"
                  ).savefig(out / "embedding_map.png")
    return {part: [p.cluster for p in chosen] for part, chosen in picks.items()}


def probes(train: dict, eval_set: dict, column: str, cfg: Config, ks, num_classes: int) -> dict:
    """k-NN (``knn/top1_kK``, centred by the bank mean with ``eval.center``) and linear probe
    (``linear/*``; it standardises the features itself) of one feature ``column``: fitted on
    ``train``, scored on ``eval_set`` (the evaluation split)."""
    bank, queries = torch.from_numpy(train[column]).float(), torch.from_numpy(eval_set[column]).float()
    if cfg.eval.center:
        m = bank_mean(bank)
        bank, queries = bank - m, queries - m
    out = metrics.knn_accuracies(bank, train["label"], queries, eval_set["label"], ks=tuple(ks),
                                 temperature=cfg.eval.knn_temperature, num_classes=num_classes)
    return {**out, **metrics.linear_probe(train[column], train["label"], eval_set[column], eval_set["label"])}


def evaluate(checkpoint: str, cfg: Config | None = None, output: str | Path = "eval", *, ks=KS,
             do_export: bool = False, actors: int = 1, use_gpu: bool = False, gallery: bool = False,
             gallery_clusters: int = 32) -> dict:
    """All metrics of a checkpoint on ``data.source`` (bank / linear train) and ``data.eval_source``.

    ``cfg`` defaults to the checkpoint's config; its ``model``/``objective`` must match the
    weights (``ConfigError`` otherwise). With ``eval.baselines`` the same k-NN and linear probe
    also score each of ``BASELINES`` (keys ``raw_pixels/knn/top1_kK``, ``random_init/linear/top1``,
    ...). Writes ``results.json``, ``cluster_usage.png``, with ``do_export``
    ``embeddings-{train,eval}.parquet`` and with ``gallery`` the ``GALLERY_FILES`` (``write_gallery``,
    its ``gallery_clusters`` most-used and least-used clusters; their ids in ``results["gallery"]``)
    under ``output``.
    """
    state = read_checkpoint(checkpoint, S3Options.for_runs(cfg.data) if cfg else None)
    teacher, cfg, meta = teacher_from_state(state, cfg)
    train_uri, train_manifest, eval_uri, eval_manifest = sources(cfg.data)
    if eval_manifest is None or not eval_manifest["classes"] or not train_manifest["classes"]:
        raise ConfigError("data.eval_source: evaluation needs labelled data.source and data.eval_source shards")
    bank_limit = min((n for n in (cfg.data.train_limit, cfg.eval.knn_train_limit) if n), default=None)
    bn = batchnorm_buffers(train_uri, train_manifest, cfg, backbones(cfg, teacher, meta), preprocessing(cfg, meta))
    train = stream_features(train_uri, train_manifest, cfg, checkpoint, bank_limit, actors, use_gpu, bn)
    eval_set = stream_features(eval_uri, eval_manifest, cfg, checkpoint, cfg.data.eval_limit, actors, use_gpu, bn)
    num_classes, k = len(train_manifest["classes"]), cfg.objective.num_clusters

    results: dict = {"checkpoint": checkpoint, "step": state.get("step"), "num_train": len(train["label"]),
                     "num_eval": len(eval_set["label"])}
    results.update(probes(train, eval_set, "feature", cfg, ks, num_classes))
    for name in BASELINES if cfg.eval.baselines else ():
        results.update({f"{name}/{key}": v for key, v in probes(train, eval_set, name, cfg, ks, num_classes).items()})
    clusters, max_prob, diagnostics = assign(teacher.head, eval_set["feature"], cfg.objective.teacher_temperature)
    results.update(metrics.clustering_metrics(clusters, eval_set["label"], k))
    results.update(diagnostics.result())

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    usage = metrics.cluster_usage(clusters, k)
    metrics.usage_plot(usage, out / "cluster_usage.png",
                       f"teacher cluster usage, {len(clusters)} eval images, K = {k}")
    results["cluster_usage"] = usage.tolist()
    if do_export:
        train_clusters, train_prob, _ = assign(teacher.head, train["feature"], cfg.objective.teacher_temperature)
        export(out / "embeddings-train.parquet", "train", train, train_clusters, train_prob)
        export(out / "embeddings-eval.parquet", "eval", eval_set, clusters, max_prob)
    if gallery:
        results["gallery"] = write_gallery(out, eval_uri, eval_manifest, cfg, eval_set, clusters, max_prob, k,
                                           gallery_clusters)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
