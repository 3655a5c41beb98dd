"""The ONNX export in onnxruntime against our jitted model, side by side on the CPU, same weights
and inputs, in one process.

    python bench/bench_export.py --model detection --threads 2 --repeats 5 --rounds 2

Weights: the fixture recipe (`../shared/fixtures/detr_reference` or DETR_REFERENCE_DIR) as in
bench/compare_torch.py: `detection` = R50 (91 classes), `panoptic` = R50-DC5 panoptic (250).
Input: one photo resized to 800x1066 (compare_torch.inputs), padded at the right to the export
size (a multiple of the output stride: 800x1088 for R50, 800x1072 for DC5) with `pixel_mask`
False on the padding; both sides get the same arrays.
JAX: `detr_jax.runtime.DETRModel` (the library's CPU policy, every query's masks), timed after
its first call (compilation).  ONNX: `detr-jax export --format onnx` of the same model (batch 1),
an onnxruntime CPU session with `--threads` intra-op threads, timed after its first run.  Rounds
alternate the two (jax, onnx, jax, onnx, ...): the median of each side's runs and the ratio
onnx/jax are printed with the largest output differences.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import common  # noqa: E402

HEIGHT, WIDTH = 800, 1066


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("detection", "panoptic"), default="detection")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    threads = common.limit_threads(args.threads)

    import time

    import jax
    import numpy as np
    import onnxruntime

    import compare_torch
    from detr_jax import convert
    from detr_jax.export import ExportSpec, export_model
    from detr_jax.export.program import output_stride
    from detr_jax.runtime import DETRModel

    panoptic = args.model == "panoptic"
    sd = compare_torch.recipe_state_dict()
    sd = sd if panoptic else compare_torch.detection_state_dict(sd)
    config = convert.infer_config(convert.canonical_state_dict(sd), {"name": "dc5" if panoptic else ""})
    variables = convert.convert_state_dict(sd, config)
    del sd
    stride = output_stride(config)
    padded = (HEIGHT, -(-WIDTH // stride) * stride)
    images, _ = compare_torch.inputs(1, HEIGHT, WIDTH)
    pixel_values = np.zeros((1, *padded, 3), np.float32)
    pixel_values[:, :HEIGHT, :WIDTH] = images
    pixel_mask = np.zeros((1, *padded), bool)
    pixel_mask[:, :HEIGHT, :WIDTH] = True

    model = DETRModel(config, jax.device_put(variables))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_model(config, variables, folder, format="onnx", spec=ExportSpec(*padded, batch=1))
        export_s = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        start = time.perf_counter()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session_s = time.perf_counter() - start
    feeds = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    run_jax = lambda: jax.block_until_ready(model(pixel_values, pixel_mask))  # noqa: E731
    run_onnx = lambda: session.run(None, feeds)  # noqa: E731

    timings = {"jax": [], "onnx": []}
    first = {"jax": None, "onnx": None}
    for _ in range(args.rounds):
        for name, fn in (("jax", run_jax), ("onnx", run_onnx)):
            t = common.time_calls(fn, args.repeats)
            first[name] = first[name] or t["first_s"]
            timings[name] += t["runs_s"]
    out_jax, out_onnx = run_jax(), run_onnx()
    logits_scale = np.abs(np.asarray(out_jax["pred_logits"])).max(axis=-1, keepdims=True)
    result = {
        "model": f"{config.backbone}{'-DC5' if config.dilation else ''} {'panoptic' if panoptic else 'detection'}",
        "input": f"1 x {HEIGHT}x{WIDTH} padded to {padded[0]}x{padded[1]}",
        "threads": threads,
        "jax_median_s": statistics.median(timings["jax"]), "onnx_median_s": statistics.median(timings["onnx"]),
        "jax_first_call_s": first["jax"], "onnx_first_run_s": first["onnx"],
        "export_s": export_s, "onnx_session_s": session_s,
        "runs": timings,
        "max_logit_diff_over_row_max": float((np.abs(out_onnx[0] - np.asarray(out_jax["pred_logits"]))
                                              / logits_scale).max()),
        "max_box_diff": float(np.abs(out_onnx[1] - np.asarray(out_jax["pred_boxes"])).max()),
        "machine": common.machine(),
    }
    if panoptic:
        result["max_mask_diff"] = float(np.abs(out_onnx[2] - np.asarray(out_jax["pred_masks"])).max())
    result["onnx_over_jax"] = result["onnx_median_s"] / result["jax_median_s"]
    print(f"| {result['model']} | {result['input']} | {threads} | jax {result['jax_median_s']:.2f} s | "
          f"onnxruntime {result['onnx_median_s']:.2f} s | onnx/jax {result['onnx_over_jax']:.2f} |")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "machine")}, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
