"""The `detr-jax` command: parses arguments and calls library functions, nothing more.

    detr-jax convert SRC OUT [--config NAME]       PyTorch checkpoint -> detr-jax checkpoint
    detr-jax predict CHECKPOINT IMAGES... --out DIR
    detr-jax train --config NAME --data DIR --workdir DIR [--eval-every N]
    detr-jax train --config NAME --tfds coco/2017_panoptic --workdir DIR
    detr-jax eval CHECKPOINT --data DIR --split val2017
    detr-jax eval CHECKPOINT --tfds coco/2017_panoptic --split validation
    detr-jax demo [--workdir DIR]
    detr-jax export CHECKPOINT OUT --format stablehlo|onnx --height H --width W [--batch N|dynamic]

Each subcommand registers itself with `add_<name>_command(subparsers)`.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional


def add_convert_command(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a PyTorch DETR checkpoint (same as convert_weights.py)",
                              add_help=False)
    p.set_defaults(run=lambda args, rest: __import__("detr_jax.convert", fromlist=["main"]).main(rest))


def add_predict_command(subparsers) -> None:
    from detr_jax.config import DataConfig

    p = subparsers.add_parser(
        "predict", help="detect / segment objects in photos and write JSON, PNGs and COCO result files",
        description="For each image: OUT/STEM.json (boxes xyxy in pixels, scores, labels, label_names; "
                    "segments_info for panoptic models), OUT/STEM_panoptic.png (panoptic models: segment id = "
                    "R + 256 G + 256^2 B, the ids of segments_info) and OUT/STEM_vis.png; for all images "
                    "OUT/detections.json (COCO results), OUT/images.json (the image ids: int(stem) when every "
                    "file stem is a number, as COCO's file names, else 1, 2, ... in input order) and "
                    "OUT/panoptic.json (COCO panoptic predictions; the PNGs are in OUT).  Unreadable images are "
                    "reported on stderr and leave no file; the exit code is then 1.")
    p.add_argument("checkpoint", help="a detr-jax checkpoint folder (see `detr-jax convert`)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--threshold", type=float, default=None,
                   help="report detections whose score exceeds this (default: detr_jax.predict.DETECTION_THRESHOLD)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--short-side", type=int, default=DataConfig.short_side)
    p.add_argument("--max-size", type=int, default=DataConfig.max_size)
    p.add_argument("--no-vis", action="store_true", help="do not draw STEM_vis.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(p)
    p.set_defaults(run=lambda args, rest: run_predict(args))


def add_runtime_arguments(p) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's, "
                                                                     "float32); parameters stay float32")
    p.add_argument("--policy", choices=("auto", "cpu", "accelerator"), default="auto",
                   help="how the model runs (detr_jax.runtime): auto picks by the JAX backend")


def run_predict(args) -> int:
    from detr_jax.predict import DETECTION_THRESHOLD, Predictor, list_images
    from detr_jax.results_io import predict_to_folder

    paths = list_images(args.images)
    if not paths:
        print("detr-jax predict: no images found in " + " ".join(args.images), file=sys.stderr)
        return 2
    from detr_jax.runtime import load

    predictor = Predictor(load(args.checkpoint, policy=args.policy, dtype=args.dtype), short_side=args.short_side,
                          max_size=args.max_size,
                          batch_size=args.batch_size,
                          threshold=DETECTION_THRESHOLD if args.threshold is None else args.threshold)
    summary = predict_to_folder(predictor, paths, args.out, progress=not args.no_progress, vis=not args.no_vis)
    failed = summary["failed"]
    print(f"detr-jax predict: {summary['written']} of {len(paths)} images written to {args.out} in "
          f"{summary['seconds']:.1f} s ({summary['compilations']} compiled shapes)"
          + (f"; {len(failed)} failed:" if failed else ""), file=sys.stderr)
    for path, reason in failed:
        print(f"  {path}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def add_train_command(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune on COCO-format data (checkpoints and resume in --workdir)",
        description="Data: --data COCO_ROOT [--split train2017] (panoptic annotations for panoptic configs), "
                    "--images DIR --annotations JSON [--panoptic-dir DIR], or --tfds coco/2017[_panoptic] "
                    "[--split train] [--tfds-data-dir DIR] (TensorFlow Datasets, pip install 'detr-jax[tfds]').  "
                    "--eval-every N evaluates box AP, segm AP and PQ on --eval-split every N steps and at the "
                    "end (metrics.jsonl rows eval/...).  The panoptic recipe: "
                    "--stage detection, then --stage masks --init-from WORKDIR1/model.  Multi-host: "
                    "--coordinator HOST:PORT --num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS, "
                    "JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every host.")
    p.add_argument("--config", required=True, help="NAME of a config in detr_jax/configs/ (e.g. detr_r50), or a path to your own config file")
    p.add_argument("--data", help="COCO root: SPLIT/ images and annotations/")
    p.add_argument("--split", default="train2017")
    p.add_argument("--images", help="image folder (with --annotations)")
    p.add_argument("--annotations", help="COCO detection or panoptic json")
    p.add_argument("--panoptic-dir", help="folder of the panoptic PNGs (panoptic --annotations)")
    add_tfds_arguments(p)
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, the final model/")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the latest checkpoint in --workdir that restores (default; damaged "
                        "newer ones are reported and moved to WORKDIR/checkpoints_damaged)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch over all devices and hosts")
    p.add_argument("--stage", choices=("all", "detection", "masks"), help="default: the config's (all)")
    p.add_argument("--init-from", help="a detr-jax checkpoint folder to start from (class head "
                                       "re-initialized if the number of classes differs)")
    p.add_argument("--num-classes", help="override the config's; 'auto' = the dataset's")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 compute, float32 parameters, optimizer state and losses (default: the config's)")
    p.add_argument("--query-groups", type=int, metavar="K",
                   help="train K parallel query groups, each matched one-to-one (Group DETR; training only: the "
                        "model keeps its queries; default: the config's, 1 = off)")
    p.add_argument("--denoising-groups", type=int, metavar="N",
                   help="decode N noised copies of the ground truth as denoising queries (DN-DETR; training only; "
                        "default: the config's, 0 = off)")
    p.add_argument("--encoder-supervision", type=float, metavar="W",
                   help="add W times a dense one-to-many detection loss on the encoder's tokens (after Co-DETR; "
                        "training only: its head is not exported; default: the config's, 0 = off)")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0, or 'auto' where JAX detects "
                                          "the cluster (SLURM, Cloud TPU pods)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--eval-every", type=int, help="evaluate every N steps and at the end (process 0)")
    p.add_argument("--eval-split", help="the split evaluated (default val2017; with --tfds: validation)")
    p.add_argument("--eval-max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args, rest: run_train(args))


def add_tfds_arguments(p) -> None:
    p.add_argument("--tfds", metavar="NAME", help="a TensorFlow Datasets COCO dataset (coco/2017, coco/2017_panoptic) "
                                                  "instead of --data / --images; --split takes TFDS split names")
    p.add_argument("--tfds-data-dir", metavar="DIR", help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")


def run_train(args) -> int:
    from detr_jax import train

    optional = dict(tfds=args.tfds, tfds_data_dir=args.tfds_data_dir, eval_every=args.eval_every,
                    eval_split=args.eval_split, eval_max_images=args.eval_max_images)
    train.run(args.config, args.workdir, num_classes=args.num_classes, batch_size=args.batch_size,
              max_steps=args.max_steps, stage=args.stage, mixed_precision=args.mixed_precision,
              query_groups=args.query_groups, denoising_groups=args.denoising_groups,
              encoder_supervision=args.encoder_supervision, init_from=args.init_from, resume=args.resume,
              coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
              data=args.data, split=args.split, images=args.images, annotations=args.annotations,
              panoptic_dir=args.panoptic_dir, progress=not args.no_progress,
              **{k: v for k, v in optional.items() if v is not None})
    return 0


def add_eval_command(subparsers) -> None:
    from detr_jax.config import DataConfig

    p = subparsers.add_parser(
        "eval", help="box AP, mask AP and PQ of a checkpoint on a COCO or COCO-panoptic folder",
        description="Runs the model over the images (every query a detection, as the original's evaluation), "
                    "prints the results table and writes all numbers to a JSON file.  Ground truth: --data DIR "
                    "--split SPLIT (DIR/SPLIT/ images, DIR/annotations/instances_SPLIT.json and/or "
                    "panoptic_SPLIT.json with its PNG folder), the explicit paths, or --tfds NAME --split "
                    "validation (TensorFlow Datasets' coco/2017 or coco/2017_panoptic; --max-images takes "
                    "the first N records).  An image that fails (unreadable, its ground truth damaged or of "
                    "another size) is reported on stderr and left out; the exit code is 1 only when no image "
                    "could be evaluated.")
    p.add_argument("checkpoint", help="a detr-jax checkpoint folder")
    p.add_argument("--data", help="a COCO root folder")
    p.add_argument("--split", default="val2017")
    p.add_argument("--images", help="the images folder (instead of --data)")
    p.add_argument("--annotations", help="instances JSON (box / mask AP ground truth)")
    p.add_argument("--panoptic-json", help="panoptic JSON (PQ ground truth)")
    p.add_argument("--panoptic-dir", help="its PNG folder (default: the JSON path without .json)")
    add_tfds_arguments(p)
    p.add_argument("--max-images", type=int, default=None,
                   help="only the first N images (by image id; TFDS: in record order)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--short-side", type=int, default=DataConfig.short_side)
    p.add_argument("--max-size", type=int, default=DataConfig.max_size)
    p.add_argument("--out", help="results JSON (default: CHECKPOINT/eval_SPLIT.json, or ./eval_SPLIT.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args, rest: run_eval(args))


def run_eval(args) -> int:
    from detr_jax.evaluation.runner import default_output, evaluate_model, load_dataset, write_json
    from detr_jax.evaluation.coco import format_results

    dataset = load_dataset(args.data, args.split, images=args.images, annotations=args.annotations,
                           panoptic_json=args.panoptic_json, panoptic_dir=args.panoptic_dir, tfds=args.tfds,
                           tfds_data_dir=args.tfds_data_dir)
    results = evaluate_model(args.checkpoint, dataset, batch_size=args.batch_size, max_images=args.max_images,
                             short_side=args.short_side, max_size=args.max_size, progress=not args.no_progress)
    print(format_results(results))
    name = args.split if args.data else "custom"
    if args.tfds:
        name = re.sub(r"[^\w.-]+", "_", f"{args.tfds}_{dataset.split}")   # eval_coco_2017_panoptic_validation.json
    out = args.out or default_output(args.checkpoint, name)
    write_json(dict(results, checkpoint=str(args.checkpoint)), out)
    failed = results["failed_images"]
    print(f"{results['num_images']} images evaluated in {results['seconds']:.1f} s; results written to {out}"
          + (f"; {len(failed)} images failed and are left out:" if failed else ""), file=sys.stderr)
    for image_id, reason in failed.items():
        print(f"  image {image_id}: {reason}", file=sys.stderr)
    if results["num_images"] == 0:
        print("detr-jax eval: no image could be evaluated", file=sys.stderr)
        return 1
    return 0


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate synthetic data, train a small panoptic DETR, evaluate, draw",
                              description="The embedded default job (see detr_jax/demo.py); resumes if interrupted.")
    p.add_argument("--workdir", default="demo", help="data, checkpoints, metrics and pictures go here")
    p.add_argument("--max-steps", type=int, help="train steps of each of the two stages (default: detr_jax/configs/demo.py)")
    p.add_argument("--schedule", default="default",
                   help='"default" (about 14 minutes on 2 cores) or "long" (about an hour: box AP 53.3, PQ 53.4 '
                        'in one run; SCHEDULES in detr_jax/configs/demo.py)')
    p.add_argument("--no-progress", action="store_true")

    def run(args, rest) -> int:
        import logging

        from detr_jax.demo import run_demo

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        run_demo(args.workdir, max_steps=args.max_steps, progress=not args.no_progress, schedule=args.schedule)
        return 0

    p.set_defaults(run=run)


def add_export_command(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint to StableHLO or ONNX for serving",
        description="Writes OUT/model.stablehlo (with OUT/serve_stablehlo.py, a loader that needs JAX alone) or "
                    "OUT/model.onnx, and OUT/contract.json: input/output names, shapes and dtypes, the pixel "
                    "mask's polarity (True = valid pixel) and the normalization.  Inputs are images padded to "
                    "--height x --width, multiples of the model's output stride (32; 16 for DC5).")
    p.add_argument("checkpoint", help="a detr-jax checkpoint folder")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--format", required=True, help="stablehlo or onnx")
    p.add_argument("--height", type=int, required=True, help="padded input height")
    p.add_argument("--width", type=int, required=True, help="padded input width")
    p.add_argument("--batch", default="1", help="images per call, or 'dynamic' (StableHLO only); default 1")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--postprocess", default="none",
                   help="none: logits and normalized boxes; boxes: scores, labels and boxes in pixels "
                        "(an extra input orig_sizes)")
    p.add_argument("--mask-queries", type=int, default=None,
                   help="panoptic models: masks of the K best queries only (default: every query's)")
    p.set_defaults(run=lambda args, rest: run_export(args))


def run_export(args) -> int:
    from detr_jax.export import ExportSpec, export_checkpoint

    if args.batch != "dynamic" and not args.batch.isdigit():
        raise SystemExit(f"detr-jax export: --batch takes a number or 'dynamic', not {args.batch!r}")
    spec = ExportSpec(height=args.height, width=args.width, batch=None if args.batch == "dynamic" else int(args.batch),
                      dtype=args.dtype, postprocess=args.postprocess, mask_queries=args.mask_queries)
    try:
        path = export_checkpoint(args.checkpoint, args.out, format=args.format, spec=spec)
    except ValueError as error:
        print(f"detr-jax export: {error}", file=sys.stderr)
        return 2
    print(f"detr-jax export: wrote {path} and its contract.json", file=sys.stderr)
    return 0


COMMANDS = [add_convert_command, add_predict_command, add_train_command, add_eval_command, add_demo_command,
            add_export_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-jax", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command != "convert":
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.run(args, rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
