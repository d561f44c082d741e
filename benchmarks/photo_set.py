"""A realistic photo set made here: JPEGs of about 500 x 375 px at quality 90, with labels.

    python benchmarks/photo_set.py /tmp/photos --images 3000          # folder + local shards
    python benchmarks/photo_set.py /tmp/photos --shards s3://bucket/p  # also to S3 (AWS_ENDPOINT_URL)

Made from the real photographs packages ship: scikit-image's ``data`` photos when scikit-image
is installed, scikit-learn's ``load_sample_images`` (2) and matplotlib's ``grace_hopper.jpg``.
Every JPEG is a random crop (10-100 % of the source's shorter side), rescaled to 500 x 375
(or 375 x 500, one in four), flipped half the time; its class is its source photo. Like a real
crawl it also holds bad inputs: ``--bad N`` truncated JPEGs, CMYK JPEGs and 16-bit RGB PNGs
each (``bad_inputs``). The folder is sharded with ``jobs/make_shards.py`` (which skips the
truncated files and converts the others, listing both in the manifest). ``raw_bad_shard``
adds the same bad inputs to shards as they are, unconverted, as if another tool wrote them:
what training must survive.

Nothing is committed: the folder and shards are rebuilt in a minute or two when missing.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZE = (500, 375)
QUALITY = 90


def sources() -> dict[str, np.ndarray]:
    """Real RGB photographs (uint8 (H, W, 3)) shipped by installed packages, by name."""
    from sklearn.datasets import load_sample_images

    photos = dict(zip(("china", "flower"), load_sample_images().images))
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    try:
        import skimage.data
    except ImportError:
        return photos
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        photos[name] = getattr(skimage.data, name)()
    return photos


def variant(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` at ``SIZE`` (or its transpose), rescaled and maybe flipped."""
    w, h = SIZE if rng.random() < 0.75 else SIZE[::-1]
    ph, pw = photo.shape[:2]
    side = min(ph, pw * h / w) * np.sqrt(rng.uniform(0.1, 1.0))  # crop height at the output's aspect
    ch, cw = max(8, int(side)), max(8, int(side * w / h))
    y, x = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    im = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.BICUBIC)
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def jpeg(im: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY, **options)
    return buf.getvalue()


def png16(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of uint16 (H, W, 3) (Pillow writes none)."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def bad_inputs(photo: np.ndarray, count: int, seed: int = 1) -> dict[str, bytes]:
    """``count`` each of truncated JPEGs, CMYK JPEGs and 16-bit RGB PNGs, by file name. The
    truncated ones cannot be decoded; the others are valid images that must decode to RGB."""
    rng, out = np.random.default_rng(seed), {}
    for i in range(count):
        im = variant(photo, rng)
        whole = jpeg(im)
        out[f"truncated-{i}.jpg"] = whole[:len(whole) // 3]
        out[f"cmyk-{i}.jpg"] = jpeg(im.convert("CMYK"))
        out[f"rgb16-{i}.png"] = png16(np.asarray(im).astype(np.uint16) * 257)
    return out


def make_folder(folder: Path, images: int, bad: int, seed: int = 0) -> Path:
    """Write ``images`` JPEGs (``class/NNNNN.jpg``) plus the bad inputs under ``folder``; kept
    when ``folder/done.json`` records the same request."""
    request = {"images": images, "bad": bad, "seed": seed}
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()) == request:
        return folder
    rng, photos = np.random.default_rng(seed), sources()
    names = sorted(photos)
    for i in range(images):
        name = names[i % len(names)]
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{i:05d}.jpg").write_bytes(jpeg(variant(photos[name], rng)))
    for name, data in bad_inputs(photos[names[0]], bad).items():
        (folder / names[0] / name).write_bytes(data)
    done.write_text(json.dumps(request))
    return folder


def make_shards(folder: Path, destination: str, min_shards: int = 8) -> dict:
    """Shard ``folder`` with ``jobs/make_shards.py`` (its own Ray); the manifest."""
    subprocess.run([sys.executable, str(ROOT / "jobs/make_shards.py"), str(folder), destination,
                    "--min-shards", str(min_shards)], check=True)
    sys.path.insert(0, str(ROOT))
    from rayssl.data.shards import load_manifest

    return load_manifest(destination)


def raw_bad_shard(uri: str, bad: dict[str, bytes]) -> None:
    """Append a shard holding ``bad`` byte for byte (no check, no conversion) to the shards at
    ``uri`` and to its manifest, as if a tool other than make_shards had written it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayssl.data import storage
    from rayssl.data.shard_writer import COLUMNS
    from rayssl.data.manifest import MANIFEST

    fs, root = storage.resolve(uri)
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        manifest = json.loads(f.read())
    if any(s["path"] == "shard-raw-bad.parquet" for s in manifest["shards"]):
        return
    n = len(bad)
    table = pa.table({"id": list(bad), "image": list(bad.values()), "label": [0] * n,
                      "label_name": [manifest["classes"][0]] * n, "source": list(bad),
                      "width": [0] * n, "height": [0] * n}, schema=COLUMNS)
    pq.write_table(table, f"{root}/shard-raw-bad.parquet", filesystem=fs)
    manifest["shards"].append({"path": "shard-raw-bad.parquet", "num_images": n, "bytes": 0, "sha256": ""})
    manifest["num_images"] += n
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps(manifest).encode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="where the JPEG folder goes (kept; reused when it matches)")
    p.add_argument("--images", type=int, default=3000, help="good JPEGs (default 3000, about 145 MB)")
    p.add_argument("--bad", type=int, default=3, help="truncated, CMYK and 16-bit inputs, each (default 3)")
    p.add_argument("--shards", action="append", default=[],
                   help="shard destination (local path or s3://); repeatable. Default: FOLDER-shards")
    args = p.parse_args()
    make_folder(args.folder, args.images, args.bad)
    for destination in args.shards or [f"{args.folder}-shards"]:
        m = make_shards(args.folder, destination)
        print(f"{destination}: {m['num_images']} images, {m['num_skipped']} skipped, "
              f"{m['num_converted']} converted")


if __name__ == "__main__":
    main()
