"""What the clusters hold: figures of a clustering for a person to look at (pure: numpy,
matplotlib, scikit-learn; no Ray, no MLflow).

- ``select``: the most-used clusters (or the tail: the least-used ones still alive), each with its
  most confident members, its share of the images and, with labels, its class histogram;
- ``gallery_figure``: one row per selected cluster, its top images as the user knows them;
  ``galleries``: the top and tail pages of ``select``'s picks from images found by id;
- ``cluster_class_map``: how clusters and classes meet, a heatmap titled with purity and NMI;
- ``embedding_map``: the features in 2-D (PCA, then t-SNE), coloured by class or by cluster.

The per-image inputs are what ``rayssl.eval.evaluate.assign`` returns: the teacher's argmax
cluster and its probability (of an (N, K) posterior ``probs``: ``probs.argmax(1)``, ``probs.max(1)``).
Labels below 0 mean "no label" (``rayssl.data.datasets.decode_stage``) and are never counted.
Figures are ``Figure`` objects on the Agg canvas, as in ``rayssl.plots``: ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
MIN_THUMB_PX = 64  # the smallest side of a gallery thumbnail on the PNG
MAX_THUMB_PX = 128  # larger images are subsampled to at most this


@dataclass(frozen=True)
class ClusterPick:
    """One selected cluster. ``members``: indices of the images whose argmax is ``cluster``, most
    confident first (``confidence``: their max-probabilities); ``size``: all its images, ``share``
    = size / N. With labels, ``histogram[c]`` = labelled images of class c in the cluster,
    ``majority`` its argmax (lowest class on ties) and ``purity`` = histogram[majority] /
    histogram.sum(); without (or no labelled member), None."""

    cluster: int
    size: int
    share: float
    members: np.ndarray
    confidence: np.ndarray
    histogram: np.ndarray | None = None
    majority: int | None = None
    purity: float | None = None


def _figure(width_px: float, height_px: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _labelled(clusters, labels) -> tuple[np.ndarray, np.ndarray]:
    """The (cluster, label) pairs of the images with a label (>= 0)."""
    clusters, labels = np.asarray(clusters).ravel().astype(np.int64), np.asarray(labels).ravel().astype(np.int64)
    if clusters.shape != labels.shape:
        raise ValueError(f"{clusters.size} cluster ids but {labels.size} labels")
    keep = labels >= 0
    return clusters[keep], labels[keep]


def select(clusters, max_prob, labels=None, *, top: int = 32, images: int = 12, tail: bool = False,
           num_classes: int | None = None) -> list[ClusterPick]:
    """The ``top`` most-used clusters by images assigned (largest first, then lowest id), or with
    ``tail`` the ``top`` least-used clusters that still hold an image (smallest first); each with
    its ``images`` most confident members (argmax = that cluster, by ``max_prob`` descending, then
    by index) and, with ``labels`` (N,), its class histogram (``num_classes`` bins: default
    1 + the largest label), majority class and purity."""
    clusters = np.asarray(clusters).ravel().astype(np.int64)
    max_prob = np.asarray(max_prob, dtype=np.float64).ravel()
    if clusters.shape != max_prob.shape:
        raise ValueError(f"{clusters.size} cluster ids but {max_prob.size} max-probabilities")
    if labels is not None:
        labels = np.asarray(labels).ravel().astype(np.int64)
        if labels.shape != clusters.shape:
            raise ValueError(f"{clusters.size} cluster ids but {labels.size} labels")
        num_classes = num_classes or int(labels.max(initial=-1)) + 1
    sizes = np.bincount(clusters)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    grouped = np.lexsort((-max_prob, clusters))  # by cluster, then most confident first (stable: index)
    alive = np.flatnonzero(sizes)
    chosen = alive[np.argsort(sizes[alive] if tail else -sizes[alive], kind="stable")][:top]
    picks = []
    for k in chosen:
        idx = grouped[starts[k]:starts[k + 1]]
        pick = ClusterPick(int(k), int(sizes[k]), float(sizes[k] / clusters.size), idx[:images], max_prob[idx[:images]])
        if labels is not None:
            member_labels = labels[idx]
            hist = np.bincount(member_labels[member_labels >= 0], minlength=num_classes)
            majority = int(hist.argmax()) if hist.sum() else None
            pick = replace(pick, histogram=hist, majority=majority,
                           purity=None if majority is None else float(hist[majority] / hist.sum()))
        picks.append(pick)
    return picks


def images_by_id(batches, wanted: set[str]) -> dict[str, np.ndarray]:
    """``{id: uint8 (H, W, C) image}`` of the decodable rows of ``batches`` (``id``, ``image``,
    ``ok``) whose id (as ``str``) is in ``wanted``."""
    found = {}
    for batch in batches:
        for i in np.flatnonzero(batch["ok"]):
            if (key := str(batch["id"][i])) in wanted:
                found[key] = np.array(batch["image"][i])
    return found


def _thumbnails(images, index: np.ndarray) -> np.ndarray:
    """uint8 RGB (n, h, w, 3) of ``images[index]`` (uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3);
    floats are read as [0, 1]): larger than ``MAX_THUMB_PX`` subsampled, then upscaled by pixel
    repetition (nearest) until the smaller side is at least ``MIN_THUMB_PX``."""
    x = np.asarray(images[np.asarray(index, dtype=np.int64)])
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {x.shape[1:]} per image")
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    step = -(-max(x.shape[1:3]) // MAX_THUMB_PX)
    x = x[:, ::step, ::step]
    scale = max(1, -(-MIN_THUMB_PX // min(x.shape[1:3])))
    return x.repeat(scale, axis=1).repeat(scale, axis=2)


def _row_text(pick: ClusterPick, class_names: Sequence[str] | None) -> str:
    lines = [f"cluster {pick.cluster}", f"{pick.share:.1%} of images ({pick.size})"]
    if pick.majority is not None:
        name = class_names[pick.majority] if class_names is not None else f"class {pick.majority}"
        lines.append(f"{name[:20]}: {pick.purity:.0%} pure")
    return "\n".join(lines)


def gallery_figure(images, picks: Sequence[ClusterPick], class_names: Sequence[str] | None = None,
                   title: str = "most-used clusters: most confident images") -> Figure:
    """One row per cluster of ``picks`` (``select``): at its start the cluster id, its share of the
    images and, with labels, its majority class and purity; then its members' images (``images``
    indexed by ``members``, as ``_thumbnails`` shows them, most confident first) at their pixel
    size on the PNG; with labels, the cluster's class histogram at its end (majority bar in orange).
    The figure is sized in pixels at ``DPI`` so that no thumbnail is resampled."""
    if not picks:
        raise ValueError("gallery_figure: no cluster to draw")
    thumbs = [_thumbnails(images, p.members) for p in picks]
    th, tw = max(t.shape[1] for t in thumbs), max(t.shape[2] for t in thumbs)
    gap, label_w, hist_w, margin, title_h = 4, 230, 180, 10, 44
    pitch, cols = max(th, 72) + 2 * gap, max(len(t) for t in thumbs)
    labelled = any(p.histogram is not None for p in picks)
    mosaic = np.full((len(picks) * pitch, cols * (tw + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(thumbs):
        for c, image in enumerate(row):
            y, x = r * pitch + gap, c * (tw + gap)
            mosaic[y:y + image.shape[0], x:x + image.shape[1]] = image
    width = margin + label_w + mosaic.shape[1] + (2 * margin + hist_w if labelled else 0) + margin
    height = title_h + mosaic.shape[0] + margin
    fig = _figure(width, height)
    ax = fig.add_axes(((margin + label_w) / width, margin / height, mosaic.shape[1] / width, mosaic.shape[0] / height),
                      label="gallery")
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.5, 1 - 8 / height, title, ha="center", va="top", fontsize=15)
    if labelled:
        fig.text(1 - (margin + hist_w / 2) / width, 1 - 26 / height, "classes (majority in orange)",
                 ha="center", va="top", fontsize=10)
    for r, pick in enumerate(picks):
        top = height - title_h - r * pitch  # pixels from the bottom
        fig.text(margin / width, (top - gap) / height, _row_text(pick, class_names), va="top", fontsize=12)
        if pick.histogram is not None:
            h = fig.add_axes((1 - (margin + hist_w) / width, (top - pitch + 3 * gap) / height, hist_w / width,
                              (pitch - 4 * gap) / height), label="class histogram")
            colours = ["C1" if c == pick.majority else "0.6" for c in range(pick.histogram.size)]
            h.bar(np.arange(pick.histogram.size), pick.histogram, width=0.8, color=colours)
            h.set(xlim=(-0.5, pick.histogram.size - 0.5), xticks=[], yticks=[])
    return fig


def shown_ids(picks: dict[str, Sequence[ClusterPick]], ids) -> list[str]:
    """The ids (``str``) of every member of ``picks`` (``{"top": [...], "tail": [...]}``), once each,
    ``ids[row]`` being the id of evaluation row ``row``: the images ``galleries`` draws."""
    rows = np.unique(np.concatenate([p.members for chosen in picks.values() for p in chosen]))
    return [str(i) for i in np.asarray(ids)[rows]]


def galleries(picks: dict[str, Sequence[ClusterPick]], ids, images: dict[str, np.ndarray], num_clusters: int,
              class_names: Sequence[str] | None = None) -> dict[str, Figure]:
    """``{"gallery_top.png": ..., "gallery_tail.png": ...}``: ``gallery_figure`` of each part of
    ``picks`` (``select(..., tail=False)`` and ``tail=True``), a member of evaluation row ``row``
    drawn from ``images[str(ids[row])]`` (``images_by_id``); members whose image is missing are left
    out of their row."""
    ids = np.asarray(ids).astype(str)
    rows = np.unique(np.concatenate([p.members for chosen in picks.values() for p in chosen]))
    rows = rows[np.isin(ids[rows], list(images))]
    where = np.full(len(ids), -1, np.int64)  # evaluation row -> row of ``stack``
    where[rows] = np.arange(len(rows))
    stack = np.stack([images[key] for key in ids[rows]])
    titles = {"top": f"the {len(picks['top'])} most-used of {num_clusters} clusters: their most confident images",
              "tail": f"the {len(picks['tail'])} least-used clusters still used: their most confident images"}
    return {f"gallery_{part}.png": gallery_figure(
                stack, [replace(p, members=where[p.members][where[p.members] >= 0]) for p in chosen],
                class_names, titles[part])
            for part, chosen in picks.items()}


def cluster_class_map(clusters, labels, num_clusters: int, class_names: Sequence[str] | None = None,
                      normalise: bool = True) -> Figure:
    """Heatmap of the used clusters (rows, labelled images only) against the classes (columns):
    each cell the share of the cluster's images in that class (``normalise``) or their count;
    rows ordered by majority class, then by size (largest first), then id, so a clean clustering
    draws a staircase. Rows are named ``id (size)`` when few enough to read. Title: purity and
    NMI of the labelled images (``cluster/majority_accuracy`` and ``cluster/nmi`` of
    ``rayssl.eval.metrics.clustering_metrics``) and the clusters used out of ``num_clusters``."""
    from rayssl.eval.metrics import clustering_metrics

    clusters, labels = _labelled(clusters, labels)
    if not labels.size:
        raise ValueError("cluster_class_map: no labelled image")
    agreement = clustering_metrics(clusters, labels, num_clusters)
    purity, nmi = agreement["cluster/majority_accuracy"], agreement["cluster/nmi"]
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    table = np.zeros((num_clusters, num_classes))
    np.add.at(table, (clusters, labels), 1)
    used = np.flatnonzero(table.sum(axis=1))
    sizes = table[used].sum(axis=1)
    rows = used[np.lexsort((-sizes, table[used].argmax(axis=1)))]
    cells = table[rows] / (table[rows].sum(axis=1, keepdims=True) if normalise else 1)
    fig = _figure(DPI * min(16, max(7, 3 + 0.5 * num_classes)), DPI * min(24, max(5, 1.5 + 0.16 * rows.size)),
                  layout="constrained")
    ax = fig.add_subplot(label="cluster x class")
    shown = ax.imshow(cells, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(shown, ax=ax, label="share of the cluster's images" if normalise else "images")
    named = class_names is not None
    ax.set_xticks(np.arange(num_classes), [str(c) for c in (class_names if named else range(num_classes))],
                  rotation=45 if named else 0, ha="right" if named else "center")
    if rows.size <= 80:
        ax.set_yticks(np.arange(rows.size), [f"{k} ({int(n)})" for k, n in zip(rows, table[rows].sum(axis=1))],
                      fontsize=7)
    else:
        ax.set_yticks([])
    ax.set(xlabel="class", ylabel="cluster (by majority class, then size)",
           title=f"clusters x classes: purity {purity:.3f}, NMI {nmi:.3f}, {rows.size} of {num_clusters} clusters used")
    return fig


def embedding_map(features, colour_by, names: Sequence[str] | None = None, *, tsne: bool = True,
                  max_points: int = 10_000, seed: int = 0, title: str = "") -> Figure:
    """The features (N, D) in 2-D, one dot per image: rows L2-normalised (the k-NN's geometry),
    PCA to at most 50 dimensions, then t-SNE (sklearn, ``init="pca"``, perplexity 30), or with
    ``tsne=False`` the first two principal components. Dots coloured by ``colour_by`` (N,) ints,
    class labels or cluster ids: with ``names`` (indexed by ``colour_by``) one colour per name and a
    legend of them; without, a cyclic map of 20 colours and no legend (clusters). Above
    ``max_points`` images, a random subset of that many (``seed``)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    ids = np.asarray(colour_by).ravel().astype(np.int64)
    if len(ids) != len(x):
        raise ValueError(f"{len(x)} feature rows but {len(ids)} colours")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, ids = x[keep], ids[keep]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = PCA(min(50 if tsne else 2, *x.shape), random_state=seed).fit_transform(x)
    if tsne:
        x = TSNE(2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed).fit_transform(x)
    fig = _figure(900, 800, layout="constrained")
    ax = fig.add_subplot(label="embedding")
    size = float(np.clip(30000 / len(x), 3, 25))  # dot area, pt^2
    if names is not None:
        cmap = "tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"
        palette = colormaps[cmap].resampled(max(len(names), 2))
        for c, name in enumerate(names):  # one scatter per name, for the legend
            if (mine := ids == c).any():
                ax.scatter(*x[mine].T, s=size, color=palette(c), label=str(name), linewidths=0)
        ax.legend(markerscale=max(1.0, 6 / size ** 0.5), fontsize=9, loc="center left", bbox_to_anchor=(1, 0.5))
    else:
        ax.scatter(*x.T, s=size, c=ids % 20, cmap="tab20", vmin=0, vmax=19, linewidths=0)
    ax.set(title=title or f"{'t-SNE' if tsne else 'PCA'} of {len(x)} images' features", xticks=[], yticks=[])
    return fig
