"""detr-jax against a PyTorch DETR with the original's arithmetic, side by side on the CPU.

Same weights (the fixture recipe, `../shared/fixtures/detr_reference`, or DETR_REFERENCE_DIR),
same inputs, same number of threads.  Every (case, framework) runs in its own subprocess (this
script calling itself with `--only FRAMEWORK --case NAME`) so that peak RSS and the matmul peak
are measured per framework; the parent collects their JSON, prints a markdown table and writes
all of it to `--out`.

    python bench/compare_torch.py --repeats 5 --threads 2 \
        --cases panoptic_b1,panoptic_b4,detection_b1,detection_b4,pipeline,train_step
    python bench/compare_torch.py --cases panoptic_photo --frameworks jax,torch --repeats 5 --rounds 3

Cases:
  panoptic_bN   R50-DC5 panoptic (DETRsegm, 250 classes), N images of 800x1066, no padding
  detection_bN  R50 detection (91 classes: the recipe without the mask head, class_embed resized)
  panoptic_photo  R50-DC5 panoptic from a photo file to the post-processed panoptic result: a
                600x800 photo (coffee, resized once) loaded and resized to 800x1066, normalized,
                the model, PostProcessPanoptic (threshold 0.85) to the PNG and segments_info the
                original returns.  Both sides use detr_jax's pre-processing (PIL resize, numpy
                normalize: the original's transforms, tests/test_preprocess.py); jax: the mask head
                on the queries over the threshold only (`mask_threshold`) and detr_jax's
                post-processing, torch: the original model (all 100 queries) and the original's
                PostProcessPanoptic in torch (torch_detr.postprocess_panoptic, checked against the
                original's fixtures in tests/test_torch_reference.py)
  pipeline      detr_jax pre-processing of the photo folder and post-processing (boxes, panoptic)
                of the original's outputs at inference size (forward_large.npz); JAX side only
  train_step    hook for bench/bench_train_step.py (`run_benchmark()`), when it exists
Frameworks: `jax` (jitted, `padding_invariant` as --padding-invariant, default True: the
library default), `torch` (eager, no_grad, bench/torch_detr.py), `torch_compile`
(torch.compile of the same module; failures are recorded, not fatal).

`--rounds N` runs the whole sequence N times (jax, torch, jax, torch, ...) and prints each round's
table and the jax/torch ratio of every round: the PyTorch side's median for the photo case drifted
from 12.2 to 17.8 s between runs minutes apart (2026-12-02, 6948420), more than within one run, and a pair
run back to back shares the machine's state.

Per case and framework: median / min / max of `--repeats` runs after the first call (the first
call is reported apart: compilation for JAX and torch.compile, one-off set-up for eager torch),
peak RSS, XLA's FLOP count of the jitted program as executed (`common.executed_gflops`: the
attention's query-block loop counted at its trip count) and the
achieved fraction of the float32 matmul peak (best of jnp.dot and torch.mm, 2048^3, measured in
the same run).  Threads: see bench/common.py (CPU affinity; XLA has no thread-count flag).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

FIXTURES = pathlib.Path(os.environ.get("DETR_REFERENCE_DIR", str(REPO.parent / "shared" / "fixtures" / "detr_reference")))
SEED = 20
HEIGHT, WIDTH = 800, 1066
DETECTION_CLASSES = 91
FRAMEWORKS = ("jax", "torch", "torch_compile")
TRAIN_STEP_CASE = "b2_512x683"      # bench_train_step.py's name for batch 2 of 512x683


@dataclass(frozen=True)
class ModelCase:
    panoptic: bool
    batch: int
    height: int = HEIGHT
    width: int = WIDTH


MODEL_CASES = {f"{kind}_b{b}": ModelCase(kind == "panoptic", b) for kind in ("panoptic", "detection") for b in (1, 4)}
OTHER_CASES = {"panoptic_photo": ("jax", "torch"), "pipeline": ("jax",), "train_step": ("jax",)}
PHOTO_HW = (600, 800)          # panoptic_photo: resized to 800x1066 by the eval resize (800 / 1333)
ALL_CASES = list(MODEL_CASES) + list(OTHER_CASES)


# ---------------------------------------------------------------------------------------------
# Weights and inputs
# ---------------------------------------------------------------------------------------------
def recipe_state_dict() -> Dict[str, "object"]:
    """The 490 recipe tensors (numpy, original DETRsegm keys) from the fixture's make_checkpoint.py."""
    spec = importlib.util.spec_from_file_location("detr_recipe", FIXTURES / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_state_dict(SEED)


def detection_state_dict(sd, num_classes: int = DETECTION_CLASSES):
    """The recipe as a detection-only R50 checkpoint: `detr.` stripped, mask head dropped,
    class_embed redrawn for num_classes + 1 logits."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {k[len("detr."):]: v for k, v in sd.items() if k.startswith("detr.")}
    out["class_embed.weight"] = (rng.standard_normal((num_classes + 1, 256)) * 0.05).astype(np.float32)
    out["class_embed.bias"] = np.zeros(num_classes + 1, np.float32)
    return out


def inputs(batch: int, height: int, width: int):
    """(images [B,H,W,3] normalized float32, valid [B,H,W] all True): the photos resized to
    exactly height x width (PIL bilinear), cycled to fill the batch."""
    import numpy as np
    from PIL import Image

    from detr_jax.data.preprocess import normalize

    photos = sorted((FIXTURES / "photos").glob("*.png"))
    images = [normalize(np.asarray(Image.open(photos[i % len(photos)]).convert("RGB").resize((width, height),
                                                                                          Image.BILINEAR)))
              for i in range(batch)]
    return np.stack(images).astype(np.float32), np.ones((batch, height, width), bool)


# ---------------------------------------------------------------------------------------------
# One framework on one case (runs in a child process)
# ---------------------------------------------------------------------------------------------
def run_jax(case: ModelCase, repeats: int, padding_invariant: bool, mask_queries: Optional[int] = None
            ) -> Dict[str, object]:
    import jax

    from detr_jax import convert
    from detr_jax.runtime import DETRModel

    sd = recipe_state_dict() if case.panoptic else detection_state_dict(recipe_state_dict())
    config = convert.infer_config(convert.canonical_state_dict(sd), {"name": "dc5" if case.panoptic else ""})
    model = DETRModel(config, jax.device_put(convert.convert_state_dict(sd, config)))
    del sd                      # the weights live on in the model only (the torch side drops its state dict too)
    images, valid = inputs(case.batch, case.height, case.width)
    images, valid = jax.device_put(images), jax.device_put(valid)
    mask_queries = mask_queries if config.masks else None
    timing = common.time_calls(lambda: jax.block_until_ready(
        model(images, valid, padding_invariant=padding_invariant, mask_queries=mask_queries)), repeats)
    timing["compile_s"] = timing["first_s"] - timing["median_s"]
    timing["first_call_s"] = timing["first_s"]
    timing["flops"] = 1e9 * common.model_gflops(model.module, model.variables, images, valid,   # the batch at once
                                                mask_queries=mask_queries, padding_invariant=padding_invariant)
    timing["config"] = f"{config.backbone}{'-DC5' if config.dilation else ''} " \
                       f"{'panoptic' if config.masks else 'detection'}, padding_invariant={padding_invariant}, " \
                       f"mask_queries={mask_queries or 'all'}"
    return timing


def run_torch(case: ModelCase, repeats: int, compile_model: bool) -> Dict[str, object]:
    import numpy as np
    import torch

    import torch_detr

    sd = recipe_state_dict()
    if case.panoptic:
        model = torch_detr.build_detr("resnet50", dilation=True, masks=True, num_classes=250)
    else:
        sd = detection_state_dict(sd)
        model = torch_detr.build_detr("resnet50", num_classes=DETECTION_CLASSES)
    model = torch_detr.load_state_dict(model.eval(), sd)
    del sd                      # the weights live on in the model only
    images, valid = inputs(case.batch, case.height, case.width)
    images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))   # NCHW
    padding = torch.from_numpy(~valid)                                                # True on padding
    if compile_model:
        model = torch.compile(model)

    def call():
        with torch.no_grad():
            return model(images, padding)

    timing = common.time_calls(call, repeats)
    timing["first_call_s"] = timing["first_s"]
    return timing


def run_panoptic_photo(framework: str, repeats: int) -> Dict[str, object]:
    """Photo file -> panoptic result, R50-DC5 panoptic (see the module docstring)."""
    import base64
    import io
    import statistics
    import time

    import numpy as np
    from PIL import Image

    from detr_jax import postprocess
    from detr_jax.data.preprocess import load_image, normalize, resize_for_eval

    sd = recipe_state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        photo = pathlib.Path(tmp) / "coffee_600x800.png"
        Image.open(FIXTURES / "photos" / "coffee.png").convert("RGB").resize(PHOTO_HW[::-1], Image.BILINEAR).save(photo)
        if framework == "jax":
            import jax

            from detr_jax import convert
            from detr_jax.runtime import DETRModel

            config = convert.infer_config(convert.canonical_state_dict(sd), {"name": "dc5"})
            model = DETRModel(config, jax.device_put(convert.convert_state_dict(sd, config)))

            def forward(x, valid):
                out = model(x, valid, mask_threshold=postprocess.PANOPTIC_THRESHOLD)
                return np.asarray(out["pred_logits"]), np.asarray(out["pred_masks"])

            def post(logits, masks, size):
                result = postprocess.postprocess_panoptic(logits, masks, np.array([size]), np.array([PHOTO_HW]))[0]
                with io.BytesIO() as png:   # the PNG the original returns
                    Image.fromarray(postprocess.panoptic_to_png(result["id_map"])).save(png, format="PNG")
                    result["png_string"] = png.getvalue()
                return result
        else:
            import torch

            import torch_detr

            model = torch_detr.load_state_dict(
                torch_detr.build_detr("resnet50", dilation=True, masks=True, num_classes=250).eval(), sd)
            is_thing = {i: postprocess.default_is_thing(i) for i in range(250)}   # the map the original evaluates with

            def forward(x, valid):
                with torch.no_grad():
                    out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                                torch.from_numpy(~valid))
                return out["pred_logits"], out["pred_masks"]

            def post(logits, masks, size):
                with torch.no_grad():
                    return torch_detr.postprocess_panoptic(logits, masks, [size], [PHOTO_HW], is_thing)[0]

        del sd                  # both sides: the weights live on in the model only
        stages: Dict[str, List[float]] = {"preprocess_s": [], "model_s": [], "postprocess_s": []}
        results, inputs = [], []

        def call():
            t0 = time.perf_counter()
            image = resize_for_eval(load_image(photo), 800, 1333)
            x, valid = normalize(image)[None], np.ones((1, *image.shape[:2]), bool)
            inputs[:] = [x, valid]
            t1 = time.perf_counter()
            logits, masks = forward(x, valid)
            t2 = time.perf_counter()
            results.append(post(logits, masks, image.shape[:2]))
            t3 = time.perf_counter()
            for key, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                stages[key].append(value)

        timing = common.time_calls(call, repeats)
        x, valid = inputs
        if framework == "jax":   # XLA's FLOP count of the two programs (model and per-image mask head; per-query part)
            from detr_jax.runtime import queries_over_threshold

            out = model(x, valid, mask_threshold=postprocess.PANOPTIC_THRESHOLD)   # the timed programs, no new one
            indices = queries_over_threshold(np.asarray(out["pred_logits"]), postprocess.PANOPTIC_THRESHOLD)
            timing["flops"] = 1e9 * common.model_gflops(model.module, model.variables, x, valid,
                                                        mask_queries=int(indices.shape[1]))
            timing["mask_queries"] = int(indices.shape[1])
    timing.update({k: statistics.median(v[1:]) for k, v in stages.items()})
    timing["first_call_s"] = timing["first_s"]
    timing["input_hw"] = list(x.shape[1:3])
    last = results[-1]
    timing["segments"] = [(int(s["category_id"]), bool(s["isthing"]), int(s["area"])) for s in last["segments_info"]]
    id_map = postprocess.png_to_ids(np.asarray(Image.open(io.BytesIO(last["png_string"])).convert("RGB")))
    timing["id_map_uint8_b64"] = base64.b64encode(id_map.astype(np.uint8).tobytes()).decode()
    return timing


def run_pipeline(repeats: int) -> Dict[str, object]:
    """Pre-processing of the photo folder (load, resize 800/1333, normalize, pad) and post-processing
    of the original's outputs for a 800x1185 photo (boxes + panoptic, all 100 queries)."""
    import numpy as np

    from detr_jax import postprocess
    from detr_jax.data.preprocess import preprocess_images

    photos = sorted((FIXTURES / "photos").glob("*.png"))
    pre = common.time_calls(lambda: preprocess_images(photos, 800, 1333), repeats)
    with np.load(FIXTURES / "forward_large.npz") as ref:
        logits, boxes = ref["pred_logits"], ref["pred_boxes"]
        masks = np.repeat(ref["pred_masks"].astype(np.float32), 2, axis=1)    # every 2nd query stored
        sizes, orig = ref["image_sizes"], ref["orig_sizes"]

    def post():
        postprocess.postprocess_boxes(logits, boxes, orig)
        postprocess.postprocess_panoptic(logits, masks, sizes, orig)

    timing = common.time_calls(post, repeats)
    timing.update({"first_call_s": timing["first_s"], "images": len(photos),
                   "preprocess": pre, "note": f"median_s = post-processing of 1 image; preprocess of "
                                              f"{len(photos)} photos in 'preprocess'"})
    return timing


def run_train_step(repeats: int) -> Dict[str, object]:
    """Hook for the JAX train step (batch 2 of 512x683), bench/bench_train_step.py's own code:
    its `run_benchmark(repeats=...)` if it has one, else its command line (output kept)."""
    path = BENCH / "bench_train_step.py"
    if not path.exists():
        return {"todo": "bench/bench_train_step.py (train step, batch 2 of 512x683) does not exist yet"}
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "run_benchmark"):
        result = module.run_benchmark(repeats=repeats)
        return result if isinstance(result, dict) else {"result": result}
    proc = subprocess.run([sys.executable, str(path), "--cases", TRAIN_STEP_CASE, "--repeats", str(repeats)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": f"bench_train_step.py exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return {"todo": "no run_benchmark() in bench_train_step.py; its table is in 'output'",
            "output": proc.stdout[-3000:]}


def child(framework: str, case: str, repeats: int, threads: int, padding_invariant: bool,
          size: str, mask_queries: Optional[int] = None) -> Dict[str, object]:
    n = common.limit_threads(threads)
    result: Dict[str, object] = {"framework": framework, "case": case, "threads": n}
    try:
        if framework.startswith("torch"):
            common.torch_threads(n)
        result["matmul_gflops"] = common.matmul_peak_gflops("torch" if framework.startswith("torch") else "jax")
        if case in MODEL_CASES:
            height, width = (int(v) for v in size.split("x"))
            model_case = dataclasses.replace(MODEL_CASES[case], height=height, width=width)
            result["size"] = size
            if framework == "jax":
                result.update(run_jax(model_case, repeats, padding_invariant, mask_queries))
            else:
                result.update(run_torch(model_case, repeats, framework == "torch_compile"))
        elif case == "panoptic_photo":
            result.update(run_panoptic_photo(framework, repeats))
        elif case == "pipeline":
            result.update(run_pipeline(repeats))
        else:
            result.update(run_train_step(repeats))
    except Exception as error:  # recorded in the table, e.g. torch.compile without a compiler
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    result["peak_rss_mb"] = common.peak_rss_mb()
    result["machine"] = common.machine()
    return result


# ---------------------------------------------------------------------------------------------
# Parent: spawn, collect, tabulate
# ---------------------------------------------------------------------------------------------
def spawn(framework: str, case: str, args) -> Dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--only", framework, "--case", case,
                   "--repeats", str(args.repeats), "--threads", str(args.threads or 0), "--json-out", str(out),
                   "--padding-invariant", str(args.padding_invariant).lower(), "--size", args.size]
        if args.mask_queries:
            command += ["--mask-queries", str(args.mask_queries)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {"framework": framework, "case": case, "error": f"timed out after {args.timeout} s"}
        if proc.returncode != 0 or not out.exists():
            return {"framework": framework, "case": case,
                    "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
        return json.loads(out.read_text())


def paired_ratios(results: List[Dict[str, object]]):
    """(case, torch framework, [jax median / torch median of each round that has both])."""
    by = {(r["case"], r["framework"], r.get("round", 0)): r for r in results if r.get("median_s")}
    pairs: Dict[tuple, List[float]] = {}
    for (case, fw, round_index), r in sorted(by.items(), key=lambda item: item[0][2]):
        jax_r = by.get((case, "jax", round_index))
        if fw != "jax" and jax_r is not None:
            pairs.setdefault((case, fw), []).append(jax_r["median_s"] / r["median_s"])
    return [(case, fw, ratios) for (case, fw), ratios in pairs.items()]


def fmt(value, spec: str = ".0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(results: List[Dict[str, object]], peak_gflops: float) -> str:
    by = {(r["case"], r["framework"]): r for r in results}
    header = ("| case | torch | jax median ms | torch median ms | jax/torch | spread ms jax; torch | first call s "
              "jax; torch | peak RSS MB jax; torch | GFLOPs | % of peak jax; torch |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    cases = list(dict.fromkeys(r["case"] for r in results))
    for case in cases:
        jax_r = by.get((case, "jax"), {})
        for fw in ("torch", "torch_compile"):
            if (case, fw) not in by and fw == "torch_compile":
                continue
            t = by.get((case, fw), {})
            jm, tm = jax_r.get("median_s"), t.get("median_s")
            flops = jax_r.get("flops")
            pct = lambda r: (100 * flops / r["median_s"] / 1e9 / peak_gflops  # noqa: E731
                             if flops and r.get("median_s") and peak_gflops else None)
            spread = lambda r: (f"{1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f}"  # noqa: E731
                                if r.get("min_s") is not None else (r.get("error") or r.get("todo") or "-")[:60])
            lines.append(
                f"| {case} | {'eager' if fw == 'torch' else 'compile'} | {fmt(jm and 1e3 * jm)} | {fmt(tm and 1e3 * tm)} "
                f"| {fmt(jm / tm if jm and tm else None, '.2f')} | {spread(jax_r)}; {spread(t)} "
                f"| {fmt(jax_r.get('first_call_s'), '.1f')}; {fmt(t.get('first_call_s'), '.1f')} "
                f"| {fmt(jax_r.get('peak_rss_mb'))}; {fmt(t.get('peak_rss_mb'))} "
                f"| {fmt(flops and flops / 1e9)} | {fmt(pct(jax_r), '.1f')}; {fmt(pct(t), '.1f')} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="panoptic_b1,panoptic_b4,detection_b1,detection_b4,pipeline,train_step",
                        help=f"comma-separated, from {ALL_CASES}")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated, from {FRAMEWORKS}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every (case, framework) this many times, the frameworks alternating, and report "
                             "the jax/torch ratio of each round (machine drift between runs cancels in a pair)")
    parser.add_argument("--threads", type=int, default=0, help="CPUs for each framework (0: all usable)")
    parser.add_argument("--padding-invariant", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="detr-jax mode (true: the library default; false: the original's arithmetic)")
    parser.add_argument("--size", default=f"{HEIGHT}x{WIDTH}", help="HxW of the model cases' inputs")
    parser.add_argument("--mask-queries", type=int, help="detr-jax: mask head on the K best queries (as the "
                        "Predictor; same post-processed results as the full head)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per (case, framework) subprocess")
    parser.add_argument("--out", default="compare_torch.json", help="JSON file for all results")
    parser.add_argument("--only", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.only:
        result = child(args.only, args.case, args.repeats, args.threads, args.padding_invariant, args.size,
                       args.mask_queries)
        pathlib.Path(args.json_out).write_text(json.dumps(result, indent=1))
        return 0

    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {ALL_CASES}")
    frameworks = [f for f in args.frameworks.split(",") if f]
    info = common.machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load {info['load_avg_1m']:.1f}; "
          f"jax {info['jax']}, flax {info['flax']}, torch {info['torch']}; threads {args.threads or 'all'}; "
          f"repeats {args.repeats}; model inputs {args.size}", flush=True)
    results = []
    for round_index in range(args.rounds):
        for case in cases:
            for fw in OTHER_CASES.get(case, frameworks):
                result = dict(spawn(fw, case, args), round=round_index)
                results.append(result)
                status = result.get("error") or result.get("todo") or \
                    f"median {1e3 * result['median_s']:.0f} ms, first {result['first_call_s']:.1f} s"
                print(f"  {case:14s} {fw:14s} {status.splitlines()[0] if status else ''}"
                      + (f"  (round {round_index + 1})" if args.rounds > 1 else ""), flush=True)
    peaks = [r["matmul_gflops"] for r in results if r.get("matmul_gflops")]
    peak = max(peaks) if peaks else None
    print(f"\nfloat32 matmul peak ({common.MATMUL_N}^3): "
          + ", ".join(f"{r['case']}/{r['framework']} {r['matmul_gflops']:.0f}" for r in results if r.get("matmul_gflops"))
          + f" GFLOP/s; % of peak below uses the best, {fmt(peak)} GFLOP/s\n")
    model_results = [r for r in results if r["case"] in MODEL_CASES or r["case"] == "panoptic_photo"]
    for round_index in range(args.rounds):
        in_round = [r for r in model_results if r["round"] == round_index]
        if in_round:
            print(("" if round_index == 0 else "\n") + (f"round {round_index + 1}:\n" if args.rounds > 1 else "")
                  + table(in_round, peak))
    if args.rounds > 1:
        print()
        for case, fw, ratios in paired_ratios(model_results):
            print(f"{case}, jax/{fw} per round: {', '.join(f'{q:.3f}' for q in ratios)}; median {statistics.median(ratios):.3f}")
    photo = {r["framework"]: r for r in results if r["case"] == "panoptic_photo" and "median_s" in r}
    for fw, r in photo.items():
        print(f"\npanoptic_photo {fw}: preprocess {1e3 * r['preprocess_s']:.0f} ms, model {1e3 * r['model_s']:.0f} ms, "
              f"post-process {1e3 * r['postprocess_s']:.0f} ms (medians); {len(r['segments'])} segments")
    if len(photo) == 2:
        import base64

        import numpy as np
        maps = [np.frombuffer(base64.b64decode(r.pop("id_map_uint8_b64")), np.uint8) for r in photo.values()]
        segments = [[s[:2] for s in r["segments"]] for r in photo.values()]
        areas = [np.array([s[2] for s in r["segments"]]) for r in photo.values()]
        print(f"panoptic_photo, jax vs torch: segment lists (category, isthing) "
              f"{'identical' if segments[0] == segments[1] else 'DIFFERENT'}; pixels with the same segment id "
              f"{100 * float((maps[0] == maps[1]).mean()):.3f} %"
              + (f"; areas differ by at most {int(np.abs(areas[0] - areas[1]).max())} pixels"
                 if segments[0] == segments[1] else ""))
    for r in results:
        if r["case"] == "pipeline":
            if "median_s" in r:
                print(f"\npipeline (detr_jax, JAX side only): preprocess {r['images']} photos median "
                      f"{1e3 * r['preprocess']['median_s']:.0f} ms; post-process (boxes + panoptic) of one 800x1185 "
                      f"image median {1e3 * r['median_s']:.0f} ms (spread {1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f})")
            else:
                print(f"\npipeline: {r.get('error')}")
        if r["case"] == "train_step":
            print(f"\ntrain_step (JAX only): {r.get('todo') or r.get('error') or ''}\n{r.get('output', '')}")
    pathlib.Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "matmul_peak_gflops": peak,
                                                  "results": results}, indent=1))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
