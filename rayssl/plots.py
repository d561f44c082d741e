"""Figures of a run (matplotlib ``Figure`` objects, no pyplot state): cluster usage, the
cluster prior and the training curves. ``rayssl.tracking`` logs them to MLflow."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (panel title, metric names drawn in it): the training curves of every run
CURVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("I(X;K) [nats]", ("norm/mutual_information", "raw/mutual_information")),
    ("H(K) [nats]", ("norm/marginal_entropy", "raw/marginal_entropy")),
    ("H(K|X) [nats]", ("norm/conditional_entropy", "raw/conditional_entropy")),
    ("effective clusters", ("norm/effective_clusters", "raw/effective_clusters")),
)


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _epoch_figure() -> Figure:
    """A figure drawn every epoch, beside training: fixed margins (a constrained layout costs a
    second draw) and one artist per histogram, so that both epoch figures, logged, cost
    0.22-0.41 CPU-s instead of 0.46-0.65 (``benchmarks/epoch_plots.py``, K=256)."""
    fig = _figure(6, 3.5, layout=None)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.15)
    return fig


def usage_figure(counts: np.ndarray, title: str) -> Figure:
    """Cluster sizes sorted in decreasing order (bars, log y)."""
    ordered = np.sort(np.asarray(counts).ravel())[::-1]
    fig = _epoch_figure()
    ax = fig.add_subplot()
    ax.stairs(np.maximum(ordered, 0.5), np.arange(ordered.size + 1) - 0.5, fill=True, baseline=0.5)
    ax.set_yscale("log")
    ax.set(title=title, xlabel="cluster (sorted by size)", ylabel="samples")
    return fig


def prior_figure(prior: np.ndarray, title: str) -> Figure:
    """Histogram of ``K * pi_k`` (1 = uniform) on a log axis: collapse shows as mass far from 1."""
    scaled = np.asarray(prior, dtype=np.float64).ravel() * prior.size
    lo = max(float(scaled[scaled > 0].min(initial=1.0)), 1e-4)
    hi = max(float(scaled.max(initial=1.0)), 2.0)
    fig = _epoch_figure()
    ax = fig.add_subplot()
    ax.stairs(*np.histogram(np.clip(scaled, lo, None), bins=np.geomspace(min(lo, 0.5), hi * 1.01, 40)), fill=True)
    ax.axvline(1.0, color="k", linestyle="--", linewidth=1, label="uniform")
    ax.set_xscale("log")
    ax.set(title=title, xlabel="K x pi_k (teacher prior, before normalisation)", ylabel="clusters")
    ax.legend()
    return fig


def curves_figure(history: Mapping[str, Sequence[tuple[int, float]]], title: str) -> Figure:
    """The panels of ``CURVES`` from ``{metric: [(step, value), ...]}``; ``raw/`` dashed."""
    fig = _figure(12, 6)
    cols = 3
    for i, (label, names) in enumerate(CURVES):
        ax = fig.add_subplot(math.ceil(len(CURVES) / cols), cols, i + 1)
        for name in names:
            points = sorted(history.get(name, ()))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, linestyle="--" if name.startswith("raw/") else "-", label=name)
        ax.set(title=label, xlabel="step")
        if len(ax.lines) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig
