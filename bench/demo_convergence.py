"""Convergence of the demo's two stages, side by side: box AP and PQ against steps and wall time.

Trains `detr-jax demo`'s recipe (`detr_jax/configs/demo.py`, both stages) on its synthetic dataset
(generated under `--data` if absent) once per variant and seed, evaluating the 64 held-out images
every `--every` detector steps (box AP) and every `--mask-every` mask steps (box AP, segm AP, PQ).
Variants differ only in the detector stage's training-only accelerators:

    plain       none (DETR's own training)
    denoising   query denoising, `--denoising-groups` groups
    groups      `--query-groups` parallel query groups
    encoder     the encoder's dense supervision, weight `--encoder-supervision`
    A+B         several of them, e.g. groups+encoder; "both" is denoising+groups
    demo        the demo config as it is

    python bench/demo_convergence.py --variants plain,denoising,groups,both --seeds 0,1 --out bench_out/convergence
        [--schedule default] [--every 250] [--mask-every 100] [--set train.lr=1e-3] [--mask-set train.lr=1e-3]

Every run writes `OUT/runs/VARIANT_seedS.json` as it finishes (a rerun skips the runs already
there, so one command can be split over several calls); then `OUT/convergence.json` holds them
all, `OUT/convergence.png` draws box AP and PQ against steps and against wall time plus the mask
stage's dice loss (one color per variant, seeds solid / dashed / dotted), and a markdown table of
the final figures is printed.  Wall time is the training loop's (compilation included, the
periodic evaluations excluded), measured on whatever machine runs this: run it on a quiet one.

`--set SECTION.FIELD=VALUE` overrides one field of the detector stage's config, `--mask-set` one of
the mask stage's (VALUE read as JSON when it parses, else as a string): for comparing recipes on
the same data and evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

ACCELERATORS = ("denoising", "groups", "encoder")
VARIANTS = ("plain", "denoising", "groups", "encoder", "both", "groups+encoder", "denoising+groups+encoder", "demo")


def accelerators_of(variant: str) -> set:
    """The accelerators a variant name turns on ("plain": none; "both": denoising and groups)."""
    if variant == "plain":
        return set()
    names = set(("denoising+groups" if variant == "both" else variant).split("+"))
    unknown = names - set(ACCELERATORS)
    if unknown:
        raise SystemExit(f"unknown accelerators {sorted(unknown)} in variant {variant!r}; known: {ACCELERATORS}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="plain,denoising,groups,both")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="bench_out/convergence")
    parser.add_argument("--schedule", default="default", help="the demo schedule (default, long)")
    parser.add_argument("--every", type=int, default=250, help="detector steps between evaluations")
    parser.add_argument("--mask-every", type=int, default=100, help="mask steps between evaluations")
    parser.add_argument("--query-groups", type=int, default=None, help="K of the groups variants (default: the demo's, else 4)")
    parser.add_argument("--denoising-groups", type=int, default=None, help="of the denoising variants (default: the demo's, else 5)")
    parser.add_argument("--encoder-supervision", type=float, default=None,
                        help="the weight of the encoder variants (default: the demo's, else 1)")
    parser.add_argument("--stages", default="detection,masks", help="'detection' alone skips the mask stage")
    parser.add_argument("--detector", default=None,
                        help="a trained detector (a stage-1 model/ folder): the mask stage starts from it, no stage 1")
    parser.add_argument("--data", default=str(pathlib.Path(tempfile.gettempdir()) / "detr_jax_demo_data"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--mask-set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--tag", default="", help="a suffix of the run names (another recipe in the same OUT)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant != "demo":
            accelerators_of(variant)
    out = pathlib.Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for variant in variants:
        for seed in (int(s) for s in args.seeds.split(",")):
            path = out / "runs" / f"{variant}{args.tag}_seed{seed}.json"
            if path.exists():
                print(f"{path.name}: done before, kept")
                continue
            record = run_one(variant, seed, args, out / "work" / path.stem)
            path.write_text(json.dumps(record, indent=1))
            print(summary_line(record), flush=True)
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    (out / "convergence.json").write_text(json.dumps(records, indent=1))
    draw(records, out / "convergence.png")
    print(markdown_table(records))
    print(f"\nrecords: {out / 'convergence.json'}\nplot: {out / 'convergence.png'}")


def stage_configs_of(variant: str, seed: int, args) -> List[tuple]:
    """[(stage name, config)] of the demo's recipe with `variant`'s accelerators on the detector."""
    from detr_jax.demo import demo_stages

    stages = []
    for name, config in demo_stages(schedule=args.schedule):
        train = dataclasses.replace(config.train, seed=seed, save_every=config.train.max_steps)
        if name == "detection" and variant != "demo":
            on = accelerators_of(variant)
            groups = args.query_groups or (config.train.query_groups if config.train.query_groups > 1 else 4)
            dn = args.denoising_groups or (config.train.denoising.groups or 5)
            encoder = args.encoder_supervision or (config.train.encoder_supervision or 1.0)
            train = dataclasses.replace(
                train, query_groups=groups if "groups" in on else 1, encoder_supervision=encoder if "encoder" in on else 0.0,
                denoising=dataclasses.replace(train.denoising, groups=dn if "denoising" in on else 0))
        config = dataclasses.replace(config, train=train)
        config = apply_overrides(config, args.set if name == "detection" else args.mask_set)
        stages.append((name, config))
    return stages


class TimedEval:
    """The train loop's eval_fn, timed: each row has the loop's wall time so far without the
    evaluations (`train_seconds`, from `start()`) and the metrics."""

    def __init__(self, eval_fn):
        self.eval_fn, self.rows, self.eval_seconds, self.begin = eval_fn, [], 0.0, time.perf_counter()

    def start(self) -> None:
        self.begin, self.eval_seconds = time.perf_counter(), 0.0

    def __call__(self, variables, step: int):
        now = time.perf_counter()
        metrics = self.eval_fn(variables, step)
        self.rows.append(dict(step=step, train_seconds=now - self.begin - self.eval_seconds, **metrics))
        self.eval_seconds += time.perf_counter() - now
        return metrics


def run_one(variant: str, seed: int, args, workdir: pathlib.Path) -> Dict[str, Any]:
    """Train the stages of one variant and seed from scratch in `workdir`; the record."""
    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.data.synthetic import ensure_synthetic
    from detr_jax.demo import DATASET
    from detr_jax.evaluation.runner import make_eval_fn
    from detr_jax.train import stage_configs, train

    root = ensure_synthetic(args.data, **DATASET)
    train_set, val_set = CocoPanoptic(root, "train2017"), CocoPanoptic(root, "val2017")
    shutil.rmtree(workdir, ignore_errors=True)
    wanted = args.stages.split(",")
    record: Dict[str, Any] = dict(variant=variant, seed=seed, tag=args.tag, set=args.set, mask_set=args.mask_set,
                                  schedule=args.schedule, detector=args.detector, date=time.strftime("%Y-%m-%d"))
    init_from: Optional[pathlib.Path] = pathlib.Path(args.detector) if args.detector else None
    for name, config in stage_configs_of(variant, seed, args):
        if name not in wanted or (name == "detection" and args.detector):
            continue
        model_config, _ = stage_configs(config)
        timed = TimedEval(make_eval_fn(model_config, val_set, config.data, batch_size=8))
        every = args.every if name == "detection" else args.mask_every
        timed.start()
        train(config, workdir / name, train_set, resume=False, init_from=init_from, eval_fn=timed,
              eval_every=every, progress=not args.no_progress)
        record[name] = timed.rows
        record[f"{name}_seconds"] = timed.rows[-1]["train_seconds"]
        record[f"{name}_train"] = dict(query_groups=config.train.query_groups,
                                       denoising_groups=config.train.denoising.groups,
                                       encoder_supervision=config.train.encoder_supervision,
                                       steps=config.train.max_steps, batch_size=config.train.batch_size)
        losses = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        record[f"{name}_losses"] = [{k: row[k] for k in ("step", "loss", "loss_dice", "loss_mask", "loss_bbox")
                                     if k in row} for row in losses if "loss" in row]
        init_from = workdir / name / "model"
    return record


def apply_overrides(config, assignments):
    """`config` with each "SECTION.FIELD=VALUE" applied (VALUE parsed as JSON when it parses); a
    field of a nested config as SECTION.FIELD.SUB=VALUE (e.g. train.denoising.groups=1)."""
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        names = key.split(".")
        if not text or len(names) < 2:
            raise SystemExit(f"--set {assignment!r}: expected SECTION.FIELD=VALUE with a field of the config")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        value = tuple(value) if isinstance(value, list) else value

        def replace(obj, path):
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, path[0]):
                raise SystemExit(f"--set {assignment!r}: expected SECTION.FIELD=VALUE with a field of the config")
            inner = value if len(path) == 1 else replace(getattr(obj, path[0]), path[1:])
            return dataclasses.replace(obj, **{path[0]: inner})

        config = replace(config, names)
    return config


def final(record: Dict[str, Any], stage: str, key: str) -> Optional[float]:
    rows = record.get(stage) or []
    return 100 * rows[-1][key] if rows and key in rows[-1] else None


def summary_line(record: Dict[str, Any]) -> str:
    parts = [f"{record['variant']}{record.get('tag', '')} seed {record['seed']}:"]
    for stage, key, label in (("detection", "bbox_AP", "box AP"), ("masks", "bbox_AP", "box AP after masks"),
                              ("masks", "PQ", "PQ")):
        value = final(record, stage, key)
        if value is not None:
            parts.append(f"{label} {value:.1f}")
    seconds = record.get("detection_seconds", 0.0) + record.get("masks_seconds", 0.0)
    parts.append(f"training {seconds:.0f} s")
    return " ".join(parts)


def markdown_table(records: List[Dict[str, Any]]) -> str:
    """Final figures per run, and the mean over the seeds of each variant."""
    lines = ["| variant | seed | box AP (detector) | box AP | segm AP | PQ | detector s | masks s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value: Optional[float], digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["variant"] + record.get("tag", ""), []).append(record)
    for name, runs in groups.items():
        rows = []
        for r in runs:
            row = (final(r, "detection", "bbox_AP"), final(r, "masks", "bbox_AP"), final(r, "masks", "segm_AP"),
                   final(r, "masks", "PQ"), r.get("detection_seconds"), r.get("masks_seconds"))
            rows.append(row)
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(fmt(v, 1 if i < 4 else 0) for i, v in enumerate(row)) + " |")
        if len(runs) > 1:
            means = [statistics.mean(col) if all(v is not None for v in col) else None for col in zip(*rows)]
            lines.append(f"| **{name}** | mean | " + " | ".join(fmt(v, 1 if i < 4 else 0) for i, v in enumerate(means)) + " |")
    return "\n".join(lines)


def draw(records: List[Dict[str, Any]], path: pathlib.Path) -> None:
    """convergence.png: box AP (detector stage) and PQ (mask stage) against steps and wall time,
    and the mask stage's dice loss against its steps."""
    from line_chart import Panel, Series, draw_panels

    names = sorted({r["variant"] + r.get("tag", "") for r in records},
                   key=lambda n: (VARIANTS.index(n) if n in VARIANTS else len(VARIANTS), n))
    color = {name: i for i, name in enumerate(names)}
    panels = {key: Panel(*key_titles) for key, key_titles in (
        ("ap_steps", ("box AP, detector stage", "detector steps", "box AP")),
        ("ap_time", ("box AP, detector stage", "training minutes", "box AP")),
        ("pq_steps", ("PQ, mask stage", "mask steps", "PQ")),
        ("pq_time", ("PQ against the whole run's time", "training minutes (both stages)", "PQ")
         if any(r.get("detection") for r in records) else
         ("PQ against the mask stage's time", "mask stage minutes", "PQ")),
        ("dice", ("dice loss, mask stage", "mask steps", "dice loss")))}
    for r in records:
        name = r["variant"] + r.get("tag", "")
        style = dict(color=color[name], dashed=r["seed"] % 2 == 1)
        det, masks = r.get("detection") or [], r.get("masks") or []
        if det:
            panels["ap_steps"].series.append(Series(name, [d["step"] for d in det], [100 * d["bbox_AP"] for d in det], **style))
            panels["ap_time"].series.append(Series(name, [d["train_seconds"] / 60 for d in det],
                                                   [100 * d["bbox_AP"] for d in det], **style))
        if masks:
            offset = r.get("detection_seconds", 0.0)
            panels["pq_steps"].series.append(Series(name, [m["step"] for m in masks], [100 * m["PQ"] for m in masks], **style))
            panels["pq_time"].series.append(Series(name, [(offset + m["train_seconds"]) / 60 for m in masks],
                                                   [100 * m["PQ"] for m in masks], **style))
        dice = [row for row in r.get("masks_losses", []) if "loss_dice" in row]
        if dice:
            panels["dice"].series.append(Series(name, [d["step"] for d in dice], [d["loss_dice"] for d in dice], **style))
    draw_panels([p for p in panels.values() if p.series], path, columns=2)


if __name__ == "__main__":
    main()
