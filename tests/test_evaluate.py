"""Evaluation of a real tiny run's checkpoint (conftest's shared ``tiny_run``): extraction by Ray
Data actors, metrics, export, ``rayssl.load_backbone``, online k-NN during training, and clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import rayssl
from rayssl import report
from rayssl.config import ConfigError, load_config
from rayssl.data.fashion_mnist import load_fashion_mnist
from rayssl.eval import metrics
from rayssl.eval.backbone import read_checkpoint
from rayssl.eval.evaluate import BASELINES, FeatureActor, evaluate
from rayssl.models import build_encoder

ROOT = Path(__file__).resolve().parents[1]


def artifacts(client, run_id: str, folder: str | None = None) -> set[str]:
    """Every artifact file of a run, by its path."""
    found = set()
    for item in client.list_artifacts(run_id, folder):
        found |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_online_knn_reported_every_epoch(tiny_run) -> None:
    _, result = tiny_run
    online = {m["step"]: m["knn/teacher"] for m in result["history"] if "knn/teacher" in m}
    assert list(online) == [6]  # epoch 1; the end of training reports it in the results
    assert 0.1 < online[6] <= 1 and 0.1 < result["knn/teacher"] <= 1


def test_the_job_evaluates_exports_and_logs_to_the_runs_store(tiny_run, tmp_path) -> None:
    """``jobs/evaluate.py --export --gallery eval.baselines=true`` on the run's checkpoint: the
    metrics, plots, gallery and exports; the run is in the default sqlite:///<run.storage_path>/mlflow.db
    (no tracking settings) and the job adds its numbers and files to that run."""
    import ray
    from mlflow.tracking import MlflowClient

    run, result = tiny_run
    uri = f"sqlite:///{run.parent / 'mlflow.db'}"
    client = MlflowClient(uri)
    logged_run = client.get_run(result["mlflow_run_id"])
    assert logged_run.info.status == "FINISHED" and logged_run.info.run_name == run.name
    assert [m.step for m in client.get_metric_history(logged_run.info.run_id, "loss")] == list(range(3, 13, 3))
    assert [m.step for m in client.get_metric_history(logged_run.info.run_id, "knn/teacher")] == [6, 12]
    # what the clusters hold, drawn at the end of training from both workers' shares of the evaluation split
    drawn = {a.path for a in client.list_artifacts(logged_run.info.run_id, "plots/clusters")}
    assert drawn == {f"plots/clusters/{f}" for f in ("gallery_top.png", "gallery_tail.png", "cluster_class_map.png")}
    # every figure report.md links is an artifact of the run
    text = report.render(result, read_checkpoint(str(run))["config"], 100.0, str(run), "MLflow run")
    links = set(re.findall(r"\]\(([^)]+\.png)\)", text))
    assert len(links) == 8 and links <= artifacts(client, logged_run.info.run_id)

    out = tmp_path / "eval"
    # a process of its own, as a user runs it, joining the session's cluster;
    # eval.precise_bn_images=0: the exported features are then the published backbone's (below)
    job = subprocess.run([sys.executable, str(ROOT / "jobs/evaluate.py"), "--checkpoint", str(run), "--output",
                          str(out), "--ks", "5,20", "--export", "--gallery", "--gallery-clusters", "8",
                          "eval.baselines=true", "eval.precise_bn_images=0"], capture_output=True, text=True,
                         env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert f"logged to MLflow run {logged_run.info.run_id}" in job.stdout
    # the training job's console: rayssl's lines; Ray Data's progress logs stay in Ray's log folder
    assert "[rayssl] features of 1024 images" in job.stdout
    assert not [line for line in (job.stdout + job.stderr).splitlines()
                if "logging_progress" in line or "streaming_executor" in line]
    saved = json.loads((out / "results.json").read_text())
    history = client.get_metric_history(logged_run.info.run_id, "knn/top1_k20")
    assert [(m.step, m.value) for m in history] == [(12, pytest.approx(saved["knn/top1_k20"]))]
    files = {a.path for a in client.list_artifacts(logged_run.info.run_id, "evaluation")}
    assert files == {"evaluation/results.json", "evaluation/cluster_usage.png", *(f"evaluation/{name}" for name in
                     ("gallery_top.png", "gallery_tail.png", "cluster_class_map.png", "embedding_map.png"))}

    assert saved["step"] == 12 and saved["num_train"] == 1024 and saved["num_eval"] == 256
    for key in ("knn/top1_k5", "knn/top1_k20", "linear/top1", "cluster/nmi", "cluster/ari",
                "cluster/hungarian_accuracy", "cluster/mutual_information", "cluster/effective_clusters"):
        assert key in saved
    assert 0.3 < saved["knn/top1_k20"] <= 1 and 0.3 < saved["linear/top1"] <= 1  # 10 classes: chance 0.1
    assert saved["cluster/used_clusters"] + saved["cluster/empty_clusters"] == 32
    assert saved["cluster/mutual_information"] == pytest.approx(
        saved["cluster/marginal_entropy"] - saved["cluster/conditional_entropy"], abs=1e-5)
    assert saved["cluster/effective_clusters"] == pytest.approx(np.exp(saved["cluster/marginal_entropy"]), rel=1e-4)
    assert sum(saved["cluster_usage"]) == 256 and (out / "cluster_usage.png").stat().st_size > 1000

    table = pq.read_table(out / "embeddings-eval.parquet")
    assert table.num_rows == 256 and len(set(table["id"].to_pylist())) == 256
    clusters = np.array(table["cluster"].to_pylist())
    assert clusters.min() >= 0 and clusters.max() < 32
    _, labels = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test", 256)
    assert sorted(table["label"].to_pylist()) == sorted(labels.tolist())
    assert pq.read_table(out / "embeddings-train.parquet").num_rows == 1024
    _check_gallery(out, saved, table)

    # rayssl.load_backbone gives a plain module whose features match the export for the same image
    backbone, preprocess = rayssl.load_backbone(str(run))
    row = pq.read_table(out / "embeddings-eval.parquet").slice(0, 1).to_pylist()[0]
    images, _ = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test", 256)
    index = _row_index(row["id"])
    with torch.no_grad():
        feats = backbone(preprocess(Image.fromarray(images[index]))[None])
    assert isinstance(backbone, torch.nn.Module) and feats.shape == (1, len(row["embedding"]))
    assert torch.allclose(feats[0], torch.tensor(row["embedding"]), atol=1e-4)

    # the baselines get the teacher's probes: raw pixels equal the metrics computed directly on
    # the shards' images (the exported rows, in their order; the k-NN centred by the bank mean),
    # random init differs from the teacher
    cfg = load_config(None, ["eval.baselines=true"], base=read_checkpoint(str(run))["config"])
    bank, bank_labels = _raw_pixels(out / "embeddings-train.parquet", "train", "train-images-idx3-ubyte.gz")
    eval_pixels, eval_labels = _raw_pixels(out / "embeddings-eval.parquet", "test", "t10k-images-idx3-ubyte.gz")
    assert cfg.eval.center
    m = bank.mean(0)
    direct = {**metrics.knn_accuracies(bank - m, bank_labels, eval_pixels - m, eval_labels, ks=(5, 20),
                                       num_classes=10, temperature=cfg.eval.knn_temperature),
              **metrics.linear_probe(bank, bank_labels, eval_pixels, eval_labels)}
    assert {key: saved[f"raw_pixels/{key}"] for key in direct} == pytest.approx(direct)
    assert 0.5 < direct["knn/top1_k20"] < 1  # raw-pixel k-NN on Fashion-MNIST: about 0.75
    for key in ("knn/top1_k5", "knn/top1_k20", "linear/top1", "linear/val_top1"):
        assert 0.1 < saved[f"random_init/{key}"] <= 1
    assert [saved[f"random_init/knn/top1_k{k}"] for k in (5, 20)] != [saved[f"knn/top1_k{k}"] for k in (5, 20)]
    assert {f"{name}/linear/top1" for name in BASELINES} <= set(saved)


def _check_gallery(out: Path, saved: dict, table) -> None:
    """``--gallery --gallery-clusters 8``: valid PNGs of a readable size; the galleries show the (up
    to) 8 most-used (largest first) and least-used clusters of the exported assignments, and the top
    gallery's first image is the most confident member of the largest cluster, at 3x its pixels."""
    sizes = {name: Image.open(out / name).size for name in
             ("gallery_top.png", "gallery_tail.png", "cluster_class_map.png", "embedding_map.png")}
    assert all(Image.open(out / name).format == "PNG" for name in sizes)
    assert sizes["gallery_top.png"][0] >= 1000 and sizes["gallery_top.png"][1] >= 44 + 84 * len(saved["gallery"]["top"])
    assert all(w >= 500 and h >= 100 for w, h in sizes.values())  # the tiny run's eval argmax may use 1 cluster
    clusters, prob = np.array(table["cluster"].to_pylist()), np.array(table["max_prob"].to_pylist())
    counts = np.bincount(clusters, minlength=32)
    used = np.flatnonzero(counts)
    assert saved["gallery"]["top"] == sorted(used, key=lambda k: (-counts[k], k))[:8]
    assert saved["gallery"]["tail"] == sorted(used, key=lambda k: (counts[k], k))[:8]
    top = saved["gallery"]["top"][0]
    mine = np.flatnonzero(clusters == top)
    first = mine[np.lexsort((mine, -prob[mine]))[0]]  # most confident, then the first row
    images, _ = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test", 256)
    expected = images[_row_index(table["id"][int(first)].as_py())].astype(int)
    png = np.asarray(Image.open(out / "gallery_top.png").convert("L")).astype(int)
    shown = png[48 + 1:48 + 84:3, 240 + 1:240 + 84:3]  # title 44 px + gap 4, margin 10 + label 230 px
    assert shown.shape == (28, 28) and np.abs(shown - expected).max() <= 2


def test_evaluate_returns_what_it_saves_and_no_baselines_unless_asked(tiny_run, tmp_path) -> None:
    """``evaluate()`` with the run's own config (``eval.baselines=false``): the returned metrics
    are the ones written to results.json, and no baseline is scored."""
    run, _ = tiny_run
    results = evaluate(str(run), output=tmp_path, ks=(20,))
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("knn/top1_k20", "linear/top1", "cluster/nmi", "cluster/mutual_information"):
        assert saved[key] == pytest.approx(results[key])
    assert not [key for key in saved if key.startswith(BASELINES)]


def _row_index(row_id: str) -> int:
    """Index in the IDX test file of the exported row ``row_id`` (ids hash ``<file>#<index>``)."""
    from rayssl.data.shards import row_id as make_id

    return next(i for i in range(256) if make_id(f"t10k-images-idx3-ubyte.gz#{i}") == row_id)


def _raw_pixels(table_path: Path, split: str, file: str) -> tuple[torch.Tensor, np.ndarray]:
    """Pixels in [0, 1] (N, 784) and labels of the exported rows, in their order, from the IDX files."""
    from rayssl.data.shards import row_id as make_id

    images, labels = load_fashion_mnist("/usr/share/datasets/fashion-mnist", split)
    index = {make_id(f"{file}#{i}"): i for i in range(len(images))}
    rows = [index[i] for i in pq.read_table(table_path)["id"].to_pylist()]
    return torch.from_numpy(images[rows]).flatten(1).float() / 255, labels[rows]


def test_feature_actor_baseline_columns(tiny_run) -> None:
    """random_init is the backbone as training initialises it (seeded, then built), in eval mode,
    on the teacher's normalised input; raw_pixels the image in [0, 1]; neither without eval.baselines."""
    run, _ = tiny_run
    state = read_checkpoint(str(run))
    cfg = load_config(None, ["eval.baselines=true"], base=state["config"])
    images, labels = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test", 8)
    batch = {"id": np.arange(8), "image": images[..., None], "label": labels, "ok": np.ones(8, bool)}
    out = FeatureActor(str(run), cfg.model_dump(), None)(batch)
    torch.manual_seed(cfg.train.seed)
    backbone = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters).backbone.eval()
    mean, std = state["meta"]["mean"][0], state["meta"]["std"][0]
    x = torch.tensor(images).float()[:, None] / 255
    with torch.no_grad():
        expected = backbone((x - mean) / std)
    assert torch.allclose(torch.from_numpy(out["random_init"]), expected, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(out["feature"]), expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(torch.from_numpy(out["raw_pixels"]), x.flatten(1))
    plain = FeatureActor(str(run), state["config"], None)(batch)
    assert set(plain) == {"id", "label", "feature"} and np.array_equal(plain["feature"], out["feature"])


def test_mismatched_config_and_bad_checkpoint_fail_clearly(tiny_run, tmp_path) -> None:
    run, _ = tiny_run
    cfg = load_config(None, ["model.width=16"], base=read_checkpoint(str(run))["config"])
    with pytest.raises(ConfigError, match=r"^model: the checkpoint's weights do not fit this config"):
        evaluate(str(run), cfg, output=tmp_path)
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"not a rayssl checkpoint"):
        read_checkpoint(str(bad))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/evaluate.py"), "--checkpoint", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "nope: not found" in proc.stderr


@pytest.mark.parametrize("channels", [1, 3])
def test_feature_actor_sees_what_the_published_preprocessing_gives(tmp_path, channels: int) -> None:
    """No Ray: for the same image, the evaluator's features (and raw pixels) equal the published
    backbone on the published preprocessing, here with a non-square image to resize and crop."""
    from rayssl.data.meta import DataMeta

    cfg = load_config(None, ["model.width=8", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
                             "objective.num_clusters=32", "eval.baselines=true"])
    mean, std = (0.3, 0.4, 0.5)[:channels], (0.35, 0.3, 0.25)[:channels]
    meta = DataMeta(4, 4, channels, 40, ("a", "b"), mean, std)
    torch.manual_seed(1)
    teacher = build_encoder(cfg.model, channels, cfg.augment.global_crop_size, cfg.objective.num_clusters)
    path = tmp_path / "checkpoint.pt"
    torch.save({"teacher": teacher.state_dict(), "config": cfg.redacted(mask=None), "meta": meta.to_dict(),
                "step": 0}, path)
    images = np.random.default_rng(0).integers(0, 256, (4, 40, 34, channels), dtype=np.uint8)
    batch = {"id": np.arange(4), "image": images, "label": np.zeros(4, np.int64), "ok": np.ones(4, bool)}
    out = FeatureActor(str(path), cfg.model_dump(), None)(batch)

    backbone, preprocess = rayssl.load_backbone(str(path))
    pictures = [Image.fromarray(im[..., 0] if channels == 1 else im) for im in images]
    with torch.no_grad():
        expected = backbone(torch.stack([preprocess(p) for p in pictures]))
    assert out["feature"].shape == (4, expected.shape[1])
    torch.testing.assert_close(torch.from_numpy(out["feature"]), expected, rtol=0, atol=1e-5)
    pixels = torch.stack([preprocess.pixels(p) for p in pictures])
    assert pixels.shape == (4, channels, 28, 28)  # shorter side 34 -> 28, centre crop of the 40
    torch.testing.assert_close(torch.from_numpy(out["raw_pixels"]), pixels.flatten(1), rtol=0, atol=0)


def test_write_gallery_without_labels_colours_by_cluster(tmp_path, monkeypatch) -> None:
    """No Ray: an evaluation split without labels (all -1) gives both galleries and the embedding
    map (by cluster), no cluster x class map; the images shown are fetched by id, the picks'
    members renumbered to index them."""
    from rayssl.eval import evaluate as module

    rng = np.random.default_rng(0)
    n, k = 90, 8
    clusters = np.repeat(np.arange(6), [30, 20, 15, 12, 10, 3])
    ids = np.array([f"row{i}" for i in range(n)], dtype=object)
    images = {f"row{i}": np.full((16, 16, 1), 2 * i, np.uint8) for i in range(n)}  # row i is grey 2i
    asked = []
    monkeypatch.setattr(module, "member_images", lambda *args: asked.append(args[-1]) or images)
    eval_set = {"id": ids, "label": np.full(n, -1), "feature": rng.normal(size=(n, 8)).astype(np.float32)}
    cfg = load_config(None, [])
    drawn = []
    from rayssl.eval import gallery

    real = gallery.gallery_figure
    monkeypatch.setattr(gallery, "gallery_figure", lambda stack, picks, *a: drawn.append((stack, picks)) or
                        real(stack, picks, *a))
    picked = module.write_gallery(tmp_path, "uri", {"classes": []}, cfg, eval_set, clusters,
                                  rng.uniform(0.2, 1, n), k, top=4)
    assert picked == {"top": [0, 1, 2, 3], "tail": [5, 4, 3, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedding_map.png", "gallery_tail.png", "gallery_top.png"]
    for stack, picks in drawn:
        for pick in picks:
            assert pick.histogram is None
            rows = [int(v) // 2 for v in stack[pick.members, 0, 0, 0]]  # the grey level names the row
            assert (clusters[rows] == pick.cluster).all()
    assert len(asked) == 1 and len(asked[0]) == len(set(asked[0]))
