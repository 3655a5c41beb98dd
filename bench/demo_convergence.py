"""Box AP of the demo's detector (stage 1 of `detr_jax/configs/demo.py`) against training steps.

Trains the demo's detection stage for `--steps` steps (lr drop at 90 % of them) on the synthetic
dataset of `detr-jax demo` (generated under `--data` if absent), evaluating box AP on its 64
held-out images every `--every` steps, and prints one row per evaluation.  The README's "what
more steps give" figures (5000 steps, every 1000) were measured with this procedure, by a scratch
script this file replaces.

    python bench/demo_convergence.py [--steps 5000] [--every 1000] [--data /tmp/demo_data] [--workdir DIR]
        [--set train.lr_decay=cosine --set model.hidden_dim=256 ...]

`--set SECTION.FIELD=VALUE` overrides one field of the detector's config (VALUE read as JSON
when it parses, else as a string), for comparing recipes on the same data and evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--data", default=str(pathlib.Path(tempfile.gettempdir()) / "detr_jax_demo_data"))
    parser.add_argument("--workdir", default=None, help="checkpoints and metrics.jsonl, a new folder (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. train.lr_decay=cosine (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.data.synthetic import ensure_synthetic
    from detr_jax.demo import DATASET, demo_stages
    from detr_jax.evaluation.runner import make_eval_fn
    from detr_jax.train import stage_configs, train

    (_, config), _ = demo_stages()
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, max_steps=args.steps, lr_drop_step=int(args.steps * 0.9), save_every=args.steps))
    config = apply_overrides(config, args.set)
    root = ensure_synthetic(args.data, **DATASET)
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="demo_convergence_"))
    model_config, _ = stage_configs(config)
    eval_fn = make_eval_fn(model_config, CocoPanoptic(root, "val2017"), config.data, batch_size=8)
    start = time.perf_counter()
    train(config, workdir, CocoPanoptic(root, "train2017"), resume=False, eval_fn=eval_fn, eval_every=args.every)
    decay = "cosine" if config.train.lr_decay == "cosine" else f"lr drop at {config.train.lr_drop_step}"
    print(f"{args.steps} steps ({decay}; overrides {args.set or 'none'}) in {time.perf_counter() - start:.0f} s; "
          f"workdir {workdir}\n\n| step | box AP | AP50 |\n|---:|---:|---:|")
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/bbox_AP" in row:
            print(f"| {row['step']} | {100 * row['eval/bbox_AP']:.1f} | {100 * row['eval/bbox_AP50']:.1f} |")


def apply_overrides(config, assignments):
    """`config` with each "SECTION.FIELD=VALUE" applied (VALUE parsed as JSON when it parses)."""
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        section, _, field = key.partition(".")
        if not text or not hasattr(config, section) or not hasattr(getattr(config, section), field):
            raise SystemExit(f"--set {assignment!r}: expected SECTION.FIELD=VALUE with a field of the config")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        value = tuple(value) if isinstance(value, list) else value
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{field: value})})
    return config


if __name__ == "__main__":
    main()
