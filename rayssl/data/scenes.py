"""Fashion-MNIST on photos ("scenes"): a labelled set where raw pixels are weak, built here.

The construction follows MNIST-M (Ganin and Lempitsky 2015, "Unsupervised domain adaptation by
backpropagation"): every Fashion-MNIST item is laid on a random crop of a real colour photograph.
Item ``i`` of a split keeps its label and its place: scenes row ``i`` of ``train`` (``test``) is
Fashion-MNIST row ``i`` of ``train`` (``test``); ``source`` names it (``...idx3-ubyte.gz#i``).
Per image, with every parameter drawn from ``numpy.random.default_rng([seed, split])``:

1. **Background.** A photo ``P`` of ``PHOTOS`` (uniform), scaled once so its shorter side is
   ``RECIPE.photo_side`` px; a square crop of side ``s = f * min(H, W)``, ``f ~ U(RECIPE.crop)``,
   at a uniform position, mirrored with p 1/2, area-resampled to ``SIZE`` x ``SIZE``:
   ``B[r, c] = mean of P over the crop's cell (r, c)`` (exact box integrals: bilinear reads of
   the summed-area table). Tinted: ``B <- clip(B[..., pi] * g, 0, 255)``, ``pi`` a uniform
   permutation of RGB, ``g ~ U(RECIPE.gain)^3``.
2. **Item.** The 28 x 28 item ``F`` (in [0, 1]) area-resampled to ``k x k`` px,
   ``k ~ U(RECIPE.item_size)``, at a uniform position inside the canvas: ``A`` (SIZE x SIZE,
   0 outside the item).
3. **Blend.** ``RECIPE.blend == "difference"`` (MNIST-M): ``X = |B - 255 A|`` per channel;
   ``"alpha"``: ``X = (1 - o A) B + o A c``, a colour ``c ~ U(0, 255)^3`` and opacity
   ``o ~ U(RECIPE.opacity)``. ``X`` is rounded to uint8 RGB.

``RECIPE`` is frozen: it is the construction whose raw pixels score far below Fashion-MNIST's
in the weighted 20-NN of the validation split (docs/benchmarks.md, "[2/6] The scenes set": every
construction tried, with its number). Same photos, Fashion-MNIST files and seed: the same bytes, every build (the
parameters of row ``i`` depend on the split's size too: a build always takes the whole split).
Everything is numpy, in chunks, no network and no Ray (docs/benchmarks.md has the build time).

``build`` writes one split as the Parquet shards + ``manifest.json`` of ``jobs/make_shards.py``
(same columns, PNG images), so every rayssl reader takes it; ``data.source: fashion-mnist-scenes``
builds both splits once under ``data.cache_dir`` (``rayssl.data.datasets``), and
``python jobs/make_shards.py fashion-mnist-scenes DST [--split test]`` builds one anywhere.
A photo that is missing (its package not installed) or not a readable image stops the build with
one line naming the file (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from PIL import Image

from rayssl.config import ConfigError
from rayssl.data import images, storage
from rayssl.data.manifest import MANIFEST, build_manifest, fingerprint, reuse_or_clear, write_json
from rayssl.data.shard_writer import COLUMNS, ROW_GROUP, row_id
from rayssl.data.sources import load_idx, scan
from rayssl.data.storage import S3Options

NAME = "fashion-mnist-scenes"  # data.source and jobs/make_shards.py's SRC keyword
SIZE = 32                      # output images: SIZE x SIZE RGB
SEED = 0
SHARDS = 8                     # per split, as the Fashion-MNIST shards
CHUNK = 1024                   # images composed at a time (memory only: the bytes do not depend on it)
SPLITS = {"train": 0, "test": 1}

# Real colour photographs shipped by installed packages: (package, file inside it).
PHOTOS: tuple[tuple[str, str], ...] = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/retina.jpg"),
)
_INSTALL = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "skimage": "scikit-image"}


@dataclass(frozen=True)
class Recipe:
    """The construction's parameters (module docstring). ``RECIPE`` is the frozen one."""

    photo_side: int = 256                       # photos scaled once to this shorter side
    crop: tuple[float, float] = (0.2, 1.0)      # crop side, fraction of the photo's shorter side
    gain: tuple[float, float] = (0.5, 1.5)      # per-channel tint gain
    permute: bool = True                        # random RGB channel permutation
    item_size: tuple[float, float] = (26.0, 32.0)  # item side in px on the SIZE canvas
    blend: str = "difference"                   # "difference" (MNIST-M) or "alpha"
    opacity: tuple[float, float] = (0.6, 1.0)   # "alpha" only


RECIPE = Recipe()
_PERMS = np.array([(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])


# ----------------------------------------------------------------------------- photos
def photo_paths() -> list[str]:
    """Paths of ``PHOTOS``; ``ConfigError`` (one line naming the file) when a package is missing."""
    paths = []
    for package, rel in PHOTOS:
        spec = importlib.util.find_spec(package)  # no import: locating the package is enough
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{NAME}: photo {package}/{rel}: {_INSTALL[package]} is not installed "
                              f"(pip install {_INSTALL[package]}, or pip install -e '.[scenes]')")
        paths.append(os.path.join(list(spec.submodule_search_locations)[0], rel))
    return paths


def load_photo(path: str | Path, side: int = RECIPE.photo_side) -> np.ndarray:
    """uint8 (H, W, 3) RGB of the photo at ``path``, scaled (box filter) so its shorter side is
    ``side`` px. ``ConfigError`` naming the file when it is missing, not an image or too small."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        reason = "not found" if isinstance(err, FileNotFoundError) else f"unreadable ({err.strerror or err})"
        raise ConfigError(f"{NAME}: photo {path}: {reason}") from None
    try:
        checked = images.check(data)  # a full decode: empty, truncated or non-image files fail here
    except images.BadImage as err:
        raise ConfigError(f"{NAME}: photo {path}: {err}") from None
    with Image.open(io.BytesIO(checked.data)) as im:
        im = images.standard(im).convert("RGB")
        w, h = im.size
        if min(w, h) < SIZE:
            raise ConfigError(f"{NAME}: photo {path}: {w} x {h} px, smaller than {SIZE} px")
        scale = side / min(w, h)
        im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BOX)
        return np.asarray(im, dtype=np.uint8).copy()


def load_photos(paths: Sequence[str | Path] | None = None, side: int = RECIPE.photo_side) -> list[np.ndarray]:
    """``load_photo`` of each of ``paths`` (default: ``photo_paths()``)."""
    return [load_photo(p, side) for p in (photo_paths() if paths is None else paths)]


# ----------------------------------------------------------------------------- composition
def _table(a: np.ndarray, channels_last: bool) -> np.ndarray:
    """Summed-area table of (N, H, W[, C]) as float64 (N, H+1, W+1[, C]), zeros in front."""
    pad = [(0, 0), (1, 0), (1, 0)] + ([(0, 0)] if channels_last else [])
    return np.pad(a.astype(np.float64).cumsum(1).cumsum(2), pad)


def _integral(table: np.ndarray, ys: np.ndarray, xs: np.ndarray, which: np.ndarray) -> np.ndarray:
    """The integral of the piecewise-constant image from (0, 0) to every (ys[n, i], xs[n, j]):
    ``table[which[n]]`` read bilinearly (exact for a box integral). (N, I, J[, C])."""
    h, w = table.shape[1] - 1, table.shape[2] - 1
    iy = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
    ix = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
    fy, fx = ys - iy, xs - ix
    n = which[:, None, None]
    y0, y1, x0, x1 = iy[:, :, None], iy[:, :, None] + 1, ix[:, None, :], ix[:, None, :] + 1
    extra = (None,) * (table.ndim - 3)
    fy, fx = fy[:, :, None][(...,) + extra], fx[:, None, :][(...,) + extra]
    return ((1 - fy) * ((1 - fx) * table[n, y0, x0] + fx * table[n, y0, x1])
            + fy * ((1 - fx) * table[n, y1, x0] + fx * table[n, y1, x1]))


def box_resample(table: np.ndarray, which: np.ndarray, top: np.ndarray, left: np.ndarray,
                 step_y: np.ndarray, step_x: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Output pixel (r, c) of image n = the mean of source ``which[n]`` over the box
    ``[top + r step_y, top + (r+1) step_y) x [left + c step_x, ...)`` (coordinates clipped to
    the source: outside it counts as 0). ``table`` from ``_table``; float64 (N, size, size[, C])."""
    k = np.arange(size + 1, dtype=np.float64)
    ys = np.clip(top[:, None] + k * step_y[:, None], 0, table.shape[1] - 1)
    xs = np.clip(left[:, None] + k * step_x[:, None], 0, table.shape[2] - 1)
    s = _integral(table, ys, xs, which)
    box = s[:, 1:, 1:] - s[:, :-1, 1:] - s[:, 1:, :-1] + s[:, :-1, :-1]
    area = (step_y * step_x).reshape((-1,) + (1,) * (box.ndim - 1))
    return box / area


def draw(n: int, shapes: Sequence[tuple[int, int]], seed: int, split: str,
         recipe: Recipe = RECIPE) -> dict[str, np.ndarray]:
    """Every random parameter of ``n`` images of ``split``, drawn in a fixed order (module
    docstring); ``shapes`` are the photos' (H, W)."""
    rng = np.random.default_rng([seed, SPLITS[split]])
    shapes = np.asarray(shapes, dtype=np.float64)
    photo = rng.integers(0, len(shapes), n)
    short = shapes[photo].min(1)
    side = rng.uniform(*recipe.crop, n) * short
    top = rng.uniform(0, 1, n) * (shapes[photo, 0] - side)
    left = rng.uniform(0, 1, n) * (shapes[photo, 1] - side)
    flip = rng.random(n) < 0.5
    perm = rng.integers(0, len(_PERMS), n) if recipe.permute else np.zeros(n, dtype=np.int64)
    gain = rng.uniform(*recipe.gain, (n, 3))
    k = rng.uniform(*recipe.item_size, n)
    item_top = rng.uniform(0, 1, n) * (SIZE - k)
    item_left = rng.uniform(0, 1, n) * (SIZE - k)
    colour = rng.uniform(0, 255, (n, 3))
    opacity = rng.uniform(*recipe.opacity, n)
    return {"photo": photo, "side": side, "top": top, "left": left, "flip": flip, "perm": perm,
            "gain": gain, "item_size": k, "item_top": item_top, "item_left": item_left,
            "colour": colour, "opacity": opacity}


def compose(items: np.ndarray, tables: np.ndarray, p: dict[str, np.ndarray], recipe: Recipe = RECIPE
            ) -> np.ndarray:
    """uint8 (N, SIZE, SIZE, 3) scenes of uint8 (N, 28, 28) ``items`` with the parameters ``p``
    (``draw``, the same N rows) on the photos' summed-area tables ``tables`` (``photo_tables``)."""
    n = len(items)
    step = p["side"] / SIZE
    bg = box_resample(tables, p["photo"], p["top"], p["left"], step, step)  # (N, S, S, 3)
    bg = np.where(p["flip"][:, None, None, None], bg[:, :, ::-1], bg)
    bg = np.take_along_axis(bg, _PERMS[p["perm"]][:, None, None, :], axis=3)
    bg = np.clip(bg * p["gain"][:, None, None, :], 0, 255)
    h, w = items.shape[1:]
    scale = h / p["item_size"]  # item px per canvas px
    alpha = box_resample(_table(items, channels_last=False), np.arange(n), -p["item_top"] * scale,
                         -p["item_left"] * scale, scale, scale * w / h)[..., None] / 255.0
    if recipe.blend == "difference":
        out = np.abs(bg - 255.0 * alpha)
    elif recipe.blend == "alpha":
        a = alpha * p["opacity"][:, None, None, None]
        out = (1 - a) * bg + a * p["colour"][:, None, None, :]
    else:
        raise ValueError(f"blend: {recipe.blend!r} is not 'difference' or 'alpha'")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def photo_tables(photos: Sequence[np.ndarray]) -> np.ndarray:
    """The photos' summed-area tables, zero-padded to one array (P, Hmax+1, Wmax+1, 3). A crop
    never reaches the padding (it lies inside its photo)."""
    hmax, wmax = max(p.shape[0] for p in photos), max(p.shape[1] for p in photos)
    out = np.zeros((len(photos), hmax + 1, wmax + 1, 3))
    for i, photo in enumerate(photos):
        t = _table(photo[None], channels_last=True)[0]
        out[i, :t.shape[0], :t.shape[1]] = t
    return out


def scenes(items: np.ndarray, photos: Sequence[np.ndarray], seed: int = SEED, split: str = "train",
           recipe: Recipe = RECIPE, chunk: int = CHUNK) -> np.ndarray:
    """uint8 (N, SIZE, SIZE, 3): the scenes of ``items`` (uint8 (N, 28, 28)), row for row."""
    tables = photo_tables(photos)
    p = draw(len(items), [ph.shape[:2] for ph in photos], seed, split, recipe)
    out = np.empty((len(items), SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(0, len(items), chunk):
        out[i:i + chunk] = compose(items[i:i + chunk], tables, {k: v[i:i + chunk] for k, v in p.items()}, recipe)
    return out


# ----------------------------------------------------------------------------- shards
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _shard_stats(index: int, path: str, ids: list[str], encoded: list[bytes], pixels: np.ndarray,
                 labels: np.ndarray, num_classes: int, nbytes: int) -> dict:
    """The stats ``rayssl.data.shard_writer.write_shard`` returns for a shard, from its rows."""
    h = hashlib.sha256()
    for rid, data in zip(ids, encoded):
        h.update(rid.encode())
        h.update(hashlib.sha256(data).digest())
    flat = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    return {"index": index, "path": path, "num_images": len(ids), "bytes": nbytes, "sha256": h.hexdigest(),
            "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
            "sums": flat.sum(0).tolist(), "sumsq": (flat ** 2).sum(0).tolist(), "pixels": len(flat),
            "gray": False, "sizes": [[SIZE, SIZE]], "skipped": [], "converted": []}


def _delete_stale(fs: pyarrow.fs.FileSystem, dest: str, keep: set[str]) -> None:
    """Delete ``shard-*.parquet`` files in ``dest`` other than ``keep`` (an earlier, larger build)."""
    for info in fs.get_file_info(pyarrow.fs.FileSelector(dest, allow_not_found=True)):
        name = posixpath.basename(info.path)
        if name.startswith("shard-") and name.endswith(".parquet") and name not in keep:
            fs.delete_file(info.path)


def _check_options(split: str, shards: int) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if shards < 1:
        raise ConfigError(f"min_shards: must be >= 1 (got {shards})")


def _write_shard(fs, dest: str, index: int, rows: range, pixels: np.ndarray, labels: np.ndarray, inputs,
                 name: str) -> dict:
    """Shard ``index``: the composed ``pixels`` of Fashion-MNIST ``rows`` as PNGs, with their
    labels and sources, written under ``dest``; its manifest entry."""
    encoded = [_png(x) for x in pixels]
    ids = [row_id(f"{NAME}/{name}#{i}") for i in rows]
    table = pa.table({"id": ids, "image": encoded, "label": labels,
                      "label_name": [inputs.classes[v] for v in labels],
                      "source": [f"{inputs.idx['images']}#{i}" for i in rows],
                      "width": [SIZE] * len(ids), "height": [SIZE] * len(ids)}, schema=COLUMNS)
    path = f"shard-{index:05d}.parquet"
    pq.write_table(table, f"{dest}/{path}", filesystem=fs, row_group_size=ROW_GROUP)
    return _shard_stats(index, path, ids, encoded, pixels, labels, len(inputs.classes),
                        fs.get_file_info(f"{dest}/{path}").size)


def build(fashion_mnist_dir: str, destination: str, split: str = "train", *, seed: int = SEED,
          photos: Sequence[str | Path] | None = None, shards: int = SHARDS, s3: S3Options | None = None,
          force: bool = False, progress: Callable[[str], None] = print) -> dict:
    """The scenes of the ``split`` Fashion-MNIST IDX files in ``fashion_mnist_dir`` as Parquet
    shards + ``manifest.json`` under ``destination`` (local or ``s3://``); the manifest.

    Rows in Fashion-MNIST order (row ``i`` is item ``i``, its label and class name kept;
    ``source`` is ``<images IDX file>#i``), ``shards`` shards of contiguous rows, PNG images.
    Does nothing when ``destination`` already holds this build (same IDX files, photos' pixels,
    ``RECIPE``, seed and shard count), unless ``force``. No Ray. ``ConfigError`` (one line
    naming the file or option) for a missing or bad photo, missing IDX files, a bad split.
    """
    _check_options(split, shards)
    s3 = s3 or S3Options()
    storage.check_readable(fashion_mnist_dir, s3)
    storage.check_writable(destination, s3)
    inputs = scan(fashion_mnist_dir, split, None, s3)
    if inputs.kind != "idx":
        raise ConfigError(f"{fashion_mnist_dir}: no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
    paths = [str(p) for p in (photo_paths() if photos is None else photos)]
    loaded = load_photos(paths)
    options = {"seed": seed, "shards": shards, "size": SIZE, "recipe": dataclasses.asdict(RECIPE),
               "photos": [posixpath.basename(p) for p in paths]}
    stamp = inputs.stamp + [(f"photo{i:03d}:{posixpath.basename(p)}", hashlib.sha256(a.tobytes()).hexdigest(),
                             list(a.shape)) for i, (p, a) in enumerate(zip(paths, loaded))]  # pixels, not mtimes
    fingerprint_inputs = dataclasses.replace(inputs, items=[], stamp=stamp)
    source_fingerprint = fingerprint(f"{NAME}:{fashion_mnist_dir}", fingerprint_inputs, {**options, "split": split})
    fs, dest = storage.resolve(destination, s3)
    try:
        if (manifest := reuse_or_clear(fs, dest, destination, source_fingerprint, force, progress)) is not None:
            return manifest
        fs.create_dir(dest, recursive=True)
        progress(f"[make_shards] {NAME}: {len(inputs.items)} {split} items of {fashion_mnist_dir} on "
                 f"{len(loaded)} photos -> {shards} shards in {destination}")
        items, labels = (load_idx(inputs.idx[k], s3) for k in ("images", "labels"))
        labels = labels.astype(np.int64)
        tables = photo_tables(loaded)
        params = draw(len(items), [a.shape[:2] for a in loaded], seed, split)
        name = posixpath.basename(inputs.idx["images"])
        bounds = np.linspace(0, len(items), min(shards, len(items)) + 1).round().astype(int)
        stats = []
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            pixels = np.concatenate([
                compose(items[i:min(i + CHUNK, stop)], tables,
                        {k: v[i:min(i + CHUNK, stop)] for k, v in params.items()})
                for i in range(start, stop, CHUNK)])
            stats.append(_write_shard(fs, dest, index, range(start, stop), pixels, labels[start:stop], inputs, name))
            progress(f"[make_shards] {index + 1}/{len(bounds) - 1} shards, {stop} images")
        manifest = build_manifest(f"{NAME}:{fashion_mnist_dir}", split, options, source_fingerprint,
                                  fingerprint_inputs, stats)
        write_json(fs, f"{dest}/{MANIFEST}", manifest)
        _delete_stale(fs, dest, {s["path"] for s in stats})
    except OSError as err:
        raise storage.explain(destination, err, s3) from None
    return manifest
