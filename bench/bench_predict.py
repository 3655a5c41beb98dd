"""Prediction: throughput over a folder of mixed-size photos, and padding invariance on the fixtures.

    python bench/bench_predict.py speed [--images 12] [--checkpoint DIR | --config detr_r50_dc5_panoptic]
                                        [--short-side 800] [--max-size 1333] [--batch-size 1] [--threads N]
    python bench/bench_predict.py padding [--checkpoint DIR] [--short-side 320] [--max-size 533]

speed: the 4 fixture photos plus resized / cropped variants of them (written to a temp folder, so
the sizes and aspects vary and several buckets occur) through `Predictor.predict` -> images/s
(all of it, compilation included, and the steady state without the first call of each shape),
the number of compilations (distinct batch shapes) and their time, peak RSS.  Without
--checkpoint the model is `--config` randomly initialized (same compute as a trained one).

padding: each fixture photo (chelsea, coffee, astronaut, motorcycle_left) alone and unpadded, alone
in its padded bucket, and all four in one padded batch (the largest bucket): max |diff| of logits,
boxes and mask logits (on the image's own stride-4 grid) against the unpadded run, and the pixel
agreement of the panoptic maps.  Needs a panoptic checkpoint (e.g. the recipe R50-DC5 converted
with convert_weights.py).

Prints markdown tables and the command line.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import limit_threads, peak_rss_mb  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
PHOTOS = pathlib.Path(os.environ.get("DETR_REFERENCE_DIR", REPO.parent / "shared" / "fixtures" / "detr_reference")) \
    / "photos"
NAMES = ("chelsea", "coffee", "astronaut", "motorcycle_left")


def make_folder(folder: pathlib.Path, count: int) -> list:
    """`count` images: the 4 photos, then variants (scaled 0.6..1.9x, crops of varied aspect)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [Image.open(PHOTOS / f"{n}.png").convert("RGB") for n in NAMES]
    paths = []
    for k in range(count):
        photo = photos[k % len(photos)]
        if k >= len(photos):
            w, h = photo.size
            if k % 2:
                scale = float(rng.uniform(0.6, 1.9))
                photo = photo.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BILINEAR)
            else:
                cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                photo = photo.crop((x0, y0, x0 + cw, y0 + ch))
        path = folder / f"{k:03d}_{NAMES[k % len(NAMES)]}.jpg"
        photo.save(path, quality=92)
        paths.append(path)
    return paths


def load_model(args):
    import jax

    import detr_jax
    from detr_jax.runtime import DETRModel
    from detr_jax.config import load_config
    from detr_jax.models import init_variables

    if args.checkpoint:
        return detr_jax.load(args.checkpoint), args.checkpoint
    config = load_config(args.config).model
    return DETRModel(config, init_variables(config, jax.random.PRNGKey(0))), f"{args.config} (random init)"


def speed(args) -> None:
    from detr_jax.predict import Predictor

    model, name = load_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(pathlib.Path(tmp), args.images)
        from PIL import Image

        sizes = [Image.open(p).size for p in paths]
        predictor = Predictor(model, short_side=args.short_side, max_size=args.max_size, batch_size=args.batch_size)
        start = time.perf_counter()
        results = predictor.predict([str(p) for p in paths])
        total = time.perf_counter() - start
    assert all(r["error"] is None for r in results), [r["error"] for r in results if r["error"]]
    stats = predictor.shape_stats
    model_s = sum(s["total_s"] for s in stats.values())
    steady_calls = sum(s["calls"] - 1 for s in stats.values())
    steady_s = sum(s["total_s"] - s["first_s"] for s in stats.values())
    per_call = {shape: ((s["total_s"] - s["first_s"]) / (s["calls"] - 1) if s["calls"] > 1 else None)
                for shape, s in stats.items()}
    known = [v / shape[0] for shape, v in per_call.items() if v is not None]
    per_image = (sum(known) / len(known)) if known else None  # model seconds per image, steady state
    # per-pixel steady time (from shapes called more than once) predicts a first call's run time
    per_pixel = [v / (shape[0] * shape[1] * shape[2]) for shape, v in per_call.items() if v is not None]
    per_pixel = sum(per_pixel) / len(per_pixel) if per_pixel else 0.0
    compile_s = sum(s["first_s"] - (per_call[shape] if per_call[shape] is not None else
                                    per_pixel * shape[0] * shape[1] * shape[2]) for shape, s in stats.items())
    host_s = total - model_s
    n = len(results)
    print(f"\n`python bench/bench_predict.py speed {' '.join(sys.argv[2:])}`\n")
    print(f"model: {name}; {n} images ({min(min(s) for s in sizes)}..{max(max(s) for s in sizes)} px sides, "
          f"{len(set(sizes))} sizes) at {args.short_side}/{args.max_size}, batch {args.batch_size}, "
          f"{args.threads or os.cpu_count()} CPU threads\n")
    print("| images | wall s | images/s (all) | compilations | compile s (est.) | model s/image (steady) "
          "| host s (load, resize, post-process) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {total:.1f} | {n / total:.3f} | {predictor.num_compilations} | {compile_s:.1f} | "
          f"{per_image:.2f} | {host_s:.1f} | {peak_rss_mb():.0f} |" if per_image is not None else
          f"| {n} | {total:.1f} | {n / total:.3f} | {predictor.num_compilations} | {compile_s:.1f} | n/a | "
          f"{host_s:.1f} | {peak_rss_mb():.0f} |")
    print("\n| batch shape (B, H, W) | calls | first call s | later calls s (mean) |")
    print("|---|---|---|---|")
    for shape, s in stats.items():
        later = f"{per_call[shape]:.2f}" if per_call[shape] is not None else "-"
        print(f"| {shape} | {s['calls']} | {s['first_s']:.1f} | {later} |")
    if steady_calls:
        print(f"\nsteady state: {steady_calls} calls, {steady_s:.1f} s of model time")


def padding(args) -> None:
    import numpy as np

    from detr_jax.data.preprocess import bucket_shape, load_image, normalize, pad_batch, resize_for_eval
    from detr_jax.postprocess import mask_grid_size, postprocess_panoptic

    model, name = load_model(args)
    originals = [load_image(PHOTOS / f"{n}.png") for n in NAMES]
    resized = [resize_for_eval(im, args.short_side, args.max_size) for im in originals]
    sizes = np.array([r.shape[:2] for r in resized], np.int32)
    orig = np.array([o.shape[:2] for o in originals], np.int32)

    def run(indices, shape):
        values, mask = pad_batch([normalize(resized[i]) for i in indices], shape)
        out = model(values, mask)
        out = {k: np.asarray(out[k]) for k in ("pred_logits", "pred_boxes", "pred_masks")}
        pan = postprocess_panoptic(out["pred_logits"], out["pred_masks"], sizes[indices], orig[indices])
        return out, pan

    multiple = args.bucket_multiple
    alone, bucket = {}, {}
    for i in range(len(NAMES)):
        alone[i] = run([i], tuple(sizes[i]))
        bucket[i] = run([i], bucket_shape(*sizes[i], multiple))
    largest = tuple(max(bucket_shape(*s, multiple)[k] for s in sizes) for k in range(2))
    mixed_out, mixed_pan = run(list(range(len(NAMES))), largest)
    mixed = {i: ({k: v[i:i + 1] for k, v in mixed_out.items()}, [mixed_pan[i]]) for i in range(len(NAMES))}

    print(f"\n`python bench/bench_predict.py padding {' '.join(sys.argv[2:])}`\n")
    print(f"model: {name}; photos at {args.short_side}/{args.max_size}; buckets of {multiple}; mixed batch: all "
          f"4 padded to {largest}; padding_invariant=True; differences against the photo alone, unpadded\n")
    print("| photo | resized | case (shape) | max abs logits | max abs boxes | max abs masks | panoptic pixel agreement "
          "| segments equal |")
    print("|---|---|---|---|---|---|---|---|")
    for i, n in enumerate(NAMES):
        ref_out, ref_pan = alone[i]
        gh, gw = mask_grid_size(sizes[i])
        for case, (out, pan), shape in (("bucket", bucket[i], bucket_shape(*sizes[i], multiple)),
                                        ("mixed batch", mixed[i], largest)):
            dl = np.abs(out["pred_logits"][0] - ref_out["pred_logits"][0]).max()
            db = np.abs(out["pred_boxes"][0] - ref_out["pred_boxes"][0]).max()
            dm = np.abs(out["pred_masks"][0, :, :gh, :gw] - ref_out["pred_masks"][0]).max()
            agree = (pan[0]["id_map"] == ref_pan[0]["id_map"]).mean()
            same = pan[0]["segments_info"] == ref_pan[0]["segments_info"]
            print(f"| {n} | {sizes[i][0]}x{sizes[i][1]} | {case} {shape} | {dl:.2e} | {db:.2e} | {dm:.2e} | "
                  f"{100 * agree:.4f} % | {same} |")
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("speed", "padding"))
    parser.add_argument("--checkpoint", help="a detr-jax checkpoint folder (default: --config, random init)")
    parser.add_argument("--config", default="detr_r50_dc5_panoptic")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--short-side", type=int)
    parser.add_argument("--max-size", type=int)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--bucket-multiple", type=int, default=None, help="default: DataConfig's")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = parser.parse_args()
    limit_threads(args.threads)
    from detr_jax.config import DataConfig

    default_sides = (800, 1333) if args.mode == "speed" else (320, 533)
    args.short_side = args.short_side or default_sides[0]
    args.max_size = args.max_size or default_sides[1]
    args.bucket_multiple = args.bucket_multiple or DataConfig.bucket_multiple
    speed(args) if args.mode == "speed" else padding(args)


if __name__ == "__main__":
    main()
