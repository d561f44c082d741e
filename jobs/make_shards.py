"""Convert an image folder, MNIST-family IDX files or a listing into Parquet shards + manifest.json.

    python jobs/make_shards.py ~/data/imagenet/train s3://my-bucket/imagenet/train --target-shard-mb 128
    python jobs/make_shards.py /usr/share/datasets/fashion-mnist ./shards/fmnist-test --split test
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/make_shards.py s3://raw/images s3://my-bucket/shards
    python jobs/make_shards.py fashion-mnist-scenes ./shards/scenes-train        # Fashion-MNIST on photos
    python jobs/make_shards.py fashion-mnist-scenes ./shards/scenes-test --split test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import ConfigError, DataConfig  # noqa: E402

DATA = DataConfig.model_fields  # the caps' defaults: those of data.max_image_pixels / data.max_item_bytes

ADVICE = """
advice:
  --target-shard-mb   64-256 MB suits S3 streaming (few requests, steady throughput); smaller
                      shards only for small data sets.
  --min-shards        keep more shards than total training workers x 2, so that the per-epoch
                      file-level shuffle mixes well and every worker reads several files.
  --reencode          by default the original encoding is kept (smallest, lossless for PNG);
                      --reencode jpeg shrinks huge PNG/TIFF/BMP photos (quality 95). Odd modes
                      (CMYK, 16-bit, palette, alpha) are always converted to 8-bit L/RGB PNG.
  SRC / DST           a local path or s3://bucket/prefix. Credentials come from the AWS chain
                      (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role);
                      AWS_ENDPOINT_URL (or --endpoint-url) for MinIO / Ceph. On a multi-node Ray
                      cluster use s3:// for both: each shard is read and written by one Ray task.
  Rerunning with the same source and options does nothing; --force rebuilds. Bad files are
  skipped and listed with their reason in manifest.json, never fatal.
  --max-image-pixels  inputs are untrusted: an image with more pixels (read from its header, before
  --max-item-bytes    decoding: a decompression bomb) or a file with more bytes (read up to one byte
                      past the cap) is skipped like a corrupt one. Keep them a few times your
                      largest real image; training decodes with data.max_image_pixels and
                      data.max_item_bytes, so raise those alike.
  --allow-outside-root  a listing's rows must name files inside the listing's folder (its bucket
                      and prefix on S3): a row that leaves it ('..', an absolute path or s3:// URI
                      elsewhere, another bucket) is skipped with one line naming the listing and
                      its line. Allow it for a listing you trust.
  fashion-mnist-scenes  SRC keyword: Fashion-MNIST items on random crops of real photos, 32 px RGB
                      (rayssl/data/scenes.py; the set of data.source=fashion-mnist-scenes), one
                      --split of the IDX files in --fashion-mnist-dir, --min-shards shards, no Ray;
                      the same bytes for the same --seed. A missing or unreadable photo stops it
                      with one line naming the file.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build Parquet image shards + manifest.json for rayssl (data.source).",
        epilog=ADVICE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SRC",
                        help="image folder (class = top-level sub-folder), IDX folder, .parquet/.csv listing, "
                             "or fashion-mnist-scenes")
    parser.add_argument("destination", metavar="DST", help="output folder: local path or s3://bucket/prefix")
    parser.add_argument("--split", default="train", choices=("train", "test"),
                        help="IDX sources: train or test (t10k) files (default: train)")
    parser.add_argument("--target-shard-mb", type=float, default=64.0,
                        help="input megabytes per shard (default: 64)")
    parser.add_argument("--min-shards", type=int, default=8, help="at least this many shards (default: 8)")
    parser.add_argument("--reencode", choices=("png", "jpeg", "webp"), help="re-encode every image")
    parser.add_argument("--class-names", help="comma-separated names for integer labels (IDX, listings)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--region", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    parser.add_argument("--max-image-pixels", type=int, default=DATA["max_image_pixels"].default,
                        help="skip images with more pixels, read from the header (default: %(default)s)")
    parser.add_argument("--max-item-bytes", type=int, default=DATA["max_item_bytes"].default,
                        help="skip files larger than this, read at most one byte past it (default: %(default)s)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="listings: keep rows that name files outside the listing's folder")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist",
                        help="fashion-mnist-scenes: the Fashion-MNIST IDX files (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="fashion-mnist-scenes: the construction's seed (default: 0)")
    args = parser.parse_args(argv)
    if args.source == "fashion-mnist-scenes":
        return _scenes(parser, args)

    from rayssl.data.images import Limits
    from rayssl.data.shards import check_locations, make_shards
    from rayssl.data.storage import S3Options

    try:
        s3 = S3Options(args.endpoint_url, args.region)  # keys: the AWS chain, never the command line
        check_locations(args.source, args.destination, s3)  # before Ray starts
        from rayssl.train.launch import init_ray

        m = make_shards(args.source, args.destination, split=args.split, target_shard_mb=args.target_shard_mb,
                        min_shards=args.min_shards, reencode=args.reencode,
                        class_names=args.class_names.split(",") if args.class_names else None,
                        s3=s3, force=args.force, start_ray=lambda: init_ray(args.address),  # only to write shards
                        limits=Limits(args.max_image_pixels, args.max_item_bytes),
                        allow_outside_root=args.allow_outside_root)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{m['num_images']} images, {m['num_skipped']} skipped, {m['num_converted']} converted, "
          f"{len(m['shards'])} shards, {m['total_bytes'] / 2**20:.1f} MB -> {args.destination}")
    return 0


def _scenes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``SRC = fashion-mnist-scenes``: build one split of the scenes set (rayssl/data/scenes.py), no Ray."""
    if args.reencode or args.class_names:
        parser.error("--reencode and --class-names do not apply to fashion-mnist-scenes")
    from rayssl.data import scenes
    from rayssl.data.storage import S3Options

    try:
        m = scenes.build(args.fashion_mnist_dir, args.destination, args.split, seed=args.seed,
                         shards=args.min_shards, s3=S3Options(args.endpoint_url, args.region), force=args.force)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{m['num_images']} images, {len(m['shards'])} shards, {m['total_bytes'] / 2**20:.1f} MB "
          f"-> {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
