"""``rayssl.eval.gallery``: which clusters and images a gallery shows, and figures a person can read.

The example (12 images, K = 6, cluster 5 empty), computed by hand:

    index      0    1    2    3    4    5     6    7    8    9     10   11
    cluster    2    0    1    0    3    0     2    4    0    1     2    0
    max_prob  .5   .9   .6   .3   .8   .95   .7   .4   .6   .65   .9   .6
    label      1    0    2    0    2    1     1    0    0    2     2    1

sizes: cluster 0: 5, 2: 3, 1: 2, 3: 1, 4: 1, 5: 0. Members by confidence: cluster 0: 5, 1, 8, 11
(a tie, by index), 3; cluster 2: 10, 6, 0; cluster 1: 9, 2. Class histograms: cluster 0 [3, 2, 0]
(majority 0, purity 3/5), cluster 2 [0, 2, 1] (1, 2/3), cluster 1 [0, 0, 2] (2, 1), cluster 3
[0, 0, 1], cluster 4 [1, 0, 0]. Overall purity (3 + 2 + 2 + 1 + 1) / 12 = 0.75.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score

from rayssl.eval.gallery import (MIN_THUMB_PX, _thumbnails, cluster_class_map, embedding_map, galleries, gallery_figure,
                                 select, shown_ids)

CLUSTERS = np.array([2, 0, 1, 0, 3, 0, 2, 4, 0, 1, 2, 0])
MAX_PROB = np.array([.5, .9, .6, .3, .8, .95, .7, .4, .6, .65, .9, .6])
LABELS = np.array([1, 0, 2, 0, 2, 1, 1, 0, 0, 2, 2, 1])
NAMES = ("shirt", "bag", "boot")


def images(n: int = 12, shape: tuple[int, ...] = (28, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def png(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_top_clusters_by_mass_and_their_most_confident_members() -> None:
    picks = select(CLUSTERS, MAX_PROB, top=3, images=4)
    assert [p.cluster for p in picks] == [0, 2, 1]
    assert [p.size for p in picks] == [5, 3, 2]
    assert [p.members.tolist() for p in picks] == [[5, 1, 8, 11], [10, 6, 0], [9, 2]]
    np.testing.assert_allclose(picks[0].confidence, [.95, .9, .6, .6])
    assert all(p.histogram is None and p.majority is None and p.purity is None for p in picks)


def test_share_histogram_majority_and_purity() -> None:
    picks = select(CLUSTERS, MAX_PROB, LABELS, top=5)
    assert [p.cluster for p in picks] == [0, 2, 1, 3, 4]
    assert [p.share for p in picks] == pytest.approx([5 / 12, 3 / 12, 2 / 12, 1 / 12, 1 / 12])
    assert [p.histogram.tolist() for p in picks] == [[3, 2, 0], [0, 2, 1], [0, 0, 2], [0, 0, 1], [1, 0, 0]]
    assert [p.majority for p in picks] == [0, 1, 2, 2, 0]
    assert [p.purity for p in picks] == pytest.approx([3 / 5, 2 / 3, 1, 1, 1])
    assert len(select(CLUSTERS, MAX_PROB, LABELS, num_classes=7)[0].histogram) == 7


def test_unlabelled_images_are_not_counted() -> None:
    labels = LABELS.copy()
    labels[[1, 3]] = -1  # two of cluster 0's class-0 images lose their label: [1, 2, 0], majority 1
    pick = select(CLUSTERS, MAX_PROB, labels, top=1)[0]
    assert (pick.size, pick.histogram.tolist(), pick.majority) == (5, [1, 2, 0], 1)
    assert pick.purity == pytest.approx(2 / 3)


def test_tail_is_the_least_used_alive_clusters() -> None:
    assert [p.cluster for p in select(CLUSTERS, MAX_PROB, top=2, tail=True)] == [3, 4]
    assert [p.cluster for p in select(CLUSTERS, MAX_PROB, top=10, tail=True)] == [3, 4, 1, 2, 0]  # never 5 (empty)
    assert select(CLUSTERS, MAX_PROB, top=2, tail=True)[0].members.tolist() == [4]


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="max-probabilities"):
        select(CLUSTERS, MAX_PROB[:-1])
    with pytest.raises(ValueError, match="labels"):
        select(CLUSTERS, MAX_PROB, LABELS[:-1])


def histograms(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "class histogram"]


def test_labelled_gallery_has_one_histogram_per_row_and_names_the_majority() -> None:
    picks = select(CLUSTERS, MAX_PROB, LABELS, top=3)
    fig = gallery_figure(images(), picks, class_names=NAMES)
    assert len(histograms(fig)) == 3
    assert [bar.get_height() for bar in histograms(fig)[0].patches] == [3, 2, 0]
    text = " ".join(t.get_text() for t in fig.texts)
    assert "cluster 0" in text and "41.7% of images (5)" in text and "shirt: 60% pure" in text
    assert "bag: 67% pure" in text and "boot: 100% pure" in text


def test_unlabelled_gallery_has_no_histogram_and_no_purity() -> None:
    fig = gallery_figure(images(), select(CLUSTERS, MAX_PROB, top=3))
    assert histograms(fig) == [] and [ax.get_label() for ax in fig.axes] == ["gallery"]
    assert "pure" not in " ".join(t.get_text() for t in fig.texts)
    png(fig)  # renders


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (32, 32, 3), (200, 160, 3)])
def test_thumbnails_are_rgb_and_at_least_min_px(shape) -> None:
    x = images(3, shape)
    thumbs = _thumbnails(x, np.array([2, 0]))
    assert thumbs.dtype == np.uint8 and thumbs.shape[0] == 2 and thumbs.shape[-1] == 3
    assert MIN_THUMB_PX <= min(thumbs.shape[1:3]) and max(thumbs.shape[1:3]) <= 2 * MIN_THUMB_PX
    if shape[:2] == (28, 28):  # 3 x 3 blocks of the pixel, every channel alike
        assert (thumbs[0, :3, :3] == x[2].reshape(28, 28)[0, 0]).all()


def test_gallery_png_shows_every_thumbnail_at_its_full_pixel_size() -> None:
    x = images()
    picks = select(CLUSTERS, MAX_PROB, LABELS, top=3, images=4)
    fig = gallery_figure(x, picks, class_names=NAMES)
    pixels = png(fig)
    assert pixels.shape[0] >= 3 * MIN_THUMB_PX and pixels.shape[1] >= 4 * MIN_THUMB_PX + 300
    box = next(ax for ax in fig.axes if ax.get_label() == "gallery").get_window_extent()
    assert box.width >= 4 * 84 and box.height >= 3 * 84  # 28 px images, 3 x 3 blocks
    # the first thumbnail on the PNG: the most confident member of cluster 0 (image 5), pixel for pixel
    top, left = pixels.shape[0] - round(box.y1) + 4, round(box.x0)  # 4: the gap above a row
    shown = pixels[top:top + 84, left:left + 84, 0].astype(int)
    expected = x[5].repeat(3, axis=0).repeat(3, axis=1).astype(int)
    assert np.abs(shown - expected).mean() < 2, np.abs(shown - expected).mean()
    assert np.abs(shown - x[1].repeat(3, axis=0).repeat(3, axis=1)).mean() > 20  # not just any image


def test_pages_by_id_draw_each_member_and_leave_out_a_missing_one() -> None:
    x, ids = images(), np.array([f"img{i}" for i in range(12)])
    picks = {part: select(CLUSTERS, MAX_PROB, LABELS, top=2, images=4, tail=part == "tail") for part in ("top", "tail")}
    wanted = shown_ids(picks, ids)
    assert sorted(wanted) == sorted({f"img{i}" for chosen in picks.values() for p in chosen for i in p.members})
    found = {key: x[int(key[3:])] for key in wanted if key != "img5"}  # image 5 (cluster 0's first) not found
    pages = galleries(picks, ids, found, num_clusters=5, class_names=NAMES)
    assert sorted(pages) == ["gallery_tail.png", "gallery_top.png"]
    assert "the 2 most-used of 5 clusters" in pages["gallery_top.png"].texts[0].get_text()
    shown = png(pages["gallery_top.png"])
    alone = png(gallery_figure(x, [replace(picks["top"][0], members=np.array([1, 8, 11])), picks["top"][1]], NAMES,
                               pages["gallery_top.png"].texts[0].get_text()))
    assert shown.shape == alone.shape and np.array_equal(shown, alone)  # image 5 left out, the rest in order


def map_title(clusters, labels, num_clusters: int) -> str:
    fig = cluster_class_map(clusters, labels, num_clusters)
    return next(ax for ax in fig.axes if ax.get_label() == "cluster x class").get_title()


def test_the_map_title_is_purity_and_nmi_of_the_labelled_images() -> None:
    assert "purity 0.750" in map_title(CLUSTERS, LABELS, 6)  # the docstring's hand count
    assert f"NMI {normalized_mutual_info_score(LABELS, CLUSTERS):.3f}" in map_title(CLUSTERS, LABELS, 6)
    rng = np.random.default_rng(1)
    clusters, labels = rng.integers(0, 7, 200), rng.integers(0, 4, 200)
    purity = sum(np.bincount(labels[clusters == k]).max() for k in np.unique(clusters)) / 200
    title = map_title(clusters, labels, 7)
    assert f"purity {purity:.3f}" in title
    assert f"NMI {normalized_mutual_info_score(labels, clusters):.3f}" in title
    # an image without a label (-1) is left out: the same numbers
    assert map_title(np.append(CLUSTERS, 4), np.append(LABELS, -1), 6) == map_title(CLUSTERS, LABELS, 6)
    with pytest.raises(ValueError, match="no labelled image"):
        cluster_class_map(CLUSTERS, np.full(12, -1), 6)


def test_cluster_class_map_rows_by_majority_class_then_size() -> None:
    fig = cluster_class_map(CLUSTERS, LABELS, 6, class_names=NAMES)
    ax = next(ax for ax in fig.axes if ax.get_label() == "cluster x class")
    # majority 0: clusters 0 (5), 4 (1); majority 1: cluster 2 (3); majority 2: clusters 1 (2), 3 (1)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 (5)", "4 (1)", "2 (3)", "1 (2)", "3 (1)"]
    cells = np.asarray(ax.images[0].get_array())
    assert cells.shape == (5, 3) and cells.argmax(axis=1).tolist() == [0, 0, 1, 2, 2]
    np.testing.assert_allclose(cells[0], [3 / 5, 2 / 5, 0])
    assert "purity 0.750" in ax.get_title() and "5 of 6 clusters used" in ax.get_title()
    assert f"NMI {normalized_mutual_info_score(LABELS, CLUSTERS):.3f}" in ax.get_title()
    counts = np.asarray(next(a for a in cluster_class_map(CLUSTERS, LABELS, 6, normalise=False).axes
                             if a.get_label() == "cluster x class").images[0].get_array())
    assert counts[0].tolist() == [3, 2, 0] and counts.sum() == 12
    assert png(fig).shape[0] >= 400


def blobs(n: int = 300, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = rng.standard_normal((3, dim)) * 5
    return centres[labels] + rng.standard_normal((n, dim)), labels


def points(fig) -> np.ndarray:
    ax = next(ax for ax in fig.axes if ax.get_label() == "embedding")
    return np.concatenate([c.get_offsets() for c in ax.collections])


def test_embedding_map_by_class_has_a_legend_of_names_and_separates_blobs() -> None:
    feats, labels = blobs()
    fig = embedding_map(feats, labels, NAMES, title="blobs")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(NAMES)
    xy = [np.asarray(c.get_offsets()) for c in ax.collections]
    assert [len(p) for p in xy] == [100, 100, 100]
    within = max(np.linalg.norm(p - p.mean(0), axis=1).mean() for p in xy)
    between = min(np.linalg.norm(xy[i].mean(0) - xy[j].mean(0)) for i in range(3) for j in range(i))
    assert between > 2 * within
    png(fig)


def test_embedding_map_by_cluster_pca_and_subsampled() -> None:
    feats, labels = blobs()
    fig = embedding_map(feats, labels * 7, tsne=False)
    assert fig.axes[0].get_legend() is None and points(fig).shape == (300, 2)
    assert points(embedding_map(feats, labels, max_points=120)).shape == (120, 2)
    with pytest.raises(ValueError, match="colours"):
        embedding_map(feats, labels[:-1])


def test_end_of_run_gallery_picks_from_the_teachers_clusters() -> None:
    """``RunGallery`` (the end of a run): the example's clusters and confidences come out of a
    head's softmax over two query batches; it picks the clusters by mass and each one's most
    confident images, by id, and draws both galleries and the map from one more pass."""
    import torch
    from torch import nn

    from rayssl.train.gallery import RunGallery

    k = 6
    logits = np.log(np.where(np.eye(k)[CLUSTERS] == 1, MAX_PROB[:, None], (1 - MAX_PROB[:, None]) / (k - 1)))
    ids, pixels = np.array([f"img{i}" for i in range(12)]), images(12, (28, 28, 1))
    batches = [{"id": ids[s], "image": pixels[s], "label": LABELS[s], "ok": np.ones(len(ids[s]), bool)}
               for s in (slice(0, 7), slice(7, 12))]
    gallery = RunGallery(nn.Identity(), temperature=1.0, clusters=3)
    for batch, s in zip(batches, (slice(0, 7), slice(7, 12))):
        gallery.seen(batch, [torch.from_numpy(logits[s]).float()])
    figures = gallery.figures(lambda: iter(batches), k, NAMES)
    assert set(figures) == {"gallery_top.png", "gallery_tail.png", "cluster_class_map.png"}
    assert gallery.chosen["top"] == [(0, ["img5", "img1", "img8", "img11", "img3"]), (2, ["img10", "img6", "img0"]),
                                     (1, ["img9", "img2"])]
    assert [c for c, _ in gallery.chosen["tail"]] == [3, 4, 1]
    assert png(figures["gallery_top.png"]).shape[0] > 3 * MIN_THUMB_PX


def test_end_of_run_gallery_needs_ids() -> None:
    import torch
    from torch import nn

    from rayssl.train.gallery import RunGallery

    with pytest.raises(ValueError, match="'id'"):
        RunGallery(nn.Identity(), 1.0, 3).seen({"image": images(2), "label": LABELS[:2], "ok": np.ones(2, bool)},
                                                [torch.zeros(2, 6)])
