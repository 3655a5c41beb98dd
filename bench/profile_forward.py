"""Where the forward time goes: R50-DC5 panoptic at 1x800x1066, component by component.

Each component of `detr_jax.models.DETR` is jitted on its own (its parameters from the same
variables, its inputs taken from one full forward) and timed like the whole model: the backbone,
the encoder, the decoder, the bbox attention + mask head on the K best queries (`--mask-queries`,
the Predictor's 32 by default) or on all 100.  For each: median time, XLA's FLOP count as executed
(`common.executed_gflops`: loops at their trip count), GFLOP/s
and the fraction of the float32 matmul peak measured in the same run, and its share of the sum.

    python bench/profile_forward.py [--repeats 3] [--threads 2] [--mask-queries 32] [--size 800x1066]
                                    [--compare-library-fusions]

Each component is compiled with the XLA:CPU options `DETRModel` gives its program
(`detr_jax.xla_cpu`: MODEL for the backbone, encoder and decoder, MASK_HEAD for the mask head).
`--compare-library-fusions` times every component under each choice of YNNPACK library fusions
instead (XLA's default, dot + reduce, dot, none), the calls interleaved, one table.

Weights: the reference recipe when the fixture is present (else random of the right shapes).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def library_fusion_choices():
    """--compare-library-fusions: name -> YNNPACK fusions (None: XLA's default)."""
    from detr_jax.xla_cpu import DOT, REDUCE

    return {"XLA default": None, "dot + reduce": (DOT, REDUCE), "dot": (DOT,), "none": ()}


def component_functions(config, variables, x, mask, mask_queries):
    """name -> (function, its arguments, the library fusions DETRModel's program of it gets):
    the model's components as separate programs."""
    import jax
    import jax.numpy as jnp

    from detr_jax import runtime, xla_cpu
    from detr_jax.models.backbone import ResNet
    from detr_jax.models.detr import DETR
    from detr_jax.models.layers import image_sizes_from_mask
    from detr_jax.models.segmentation import MaskHeadSmallConv, MHAttentionMap
    from detr_jax.models.transformer import Decoder, Encoder

    params, buffers = variables["params"], variables["buffers"]
    dt = jnp.dtype(config.dtype)
    _, state = DETR(config).apply(variables, x, mask, mutable=["intermediates"])
    inter = {k: v[0] for k, v in state["intermediates"].items()}
    b = x.shape[0]
    flat = lambda t: t.reshape(b, -1, t.shape[-1])  # noqa: E731
    src, pos, valid = flat(inter["projected"]), flat(inter["position_embedding"]), inter["feature_mask"]
    memory, hs = inter["memory"], inter["decoder_hs"]
    sizes = image_sizes_from_mask(mask)
    config = runtime.execution_config(config, "cpu")     # the CPU policy's blocked attention
    args = (config.hidden_dim, config.num_heads, config.dim_feedforward, config.dropout, config.pre_norm, dt,
            config.attention)
    query_pos = jnp.broadcast_to(params["query_embed"]["embedding"], (b, config.num_queries, config.hidden_dim))

    def backbone(x, sizes):
        return ResNet(config.resnet_depths, config.resnet_width, config.dilation, dt).apply(
            {"params": params["backbone"], "buffers": buffers["backbone"]}, x, sizes)

    def encoder(src, valid, pos):
        return Encoder(config.enc_layers, *args).apply({"params": params["transformer"]["encoder"]}, src, valid, pos)

    def decoder(memory, valid, pos, query_pos):
        return Decoder(config.dec_layers, *args).apply({"params": params["transformer"]["decoder"]},
                                                       jnp.zeros_like(query_pos), memory, valid, pos, query_pos)

    features = [inter[f"backbone_layer{i}"] for i in (1, 2, 3, 4)]
    _, feature_sizes = jax.jit(backbone)(x, sizes)

    def mask_head(hs_last, logits, memory, src_image, f3, f2, f1):
        queries = hs_last
        if mask_queries is not None and mask_queries < config.num_queries:
            indices, _ = runtime.top_queries(logits, k=mask_queries)
            queries = jnp.take_along_axis(queries, indices[..., None], axis=1)
        attention = MHAttentionMap(config.hidden_dim, config.num_heads, dt).apply(
            {"params": params["bbox_attention"]}, queries, memory, valid)
        mask_sizes = [feature_sizes[3], feature_sizes[2], feature_sizes[1], feature_sizes[0]]
        return MaskHeadSmallConv(config.hidden_dim, config.num_heads, dt).apply(
            {"params": params["mask_head"]}, src_image, attention, [f3, f2, f1], mask_sizes)

    logits = DETR(config).apply(variables, x, mask)["pred_logits"]
    return {
        "backbone (ResNet-50 DC5)": (backbone, (x, sizes), xla_cpu.MODEL),
        "encoder (6 layers)": (encoder, (src, valid.reshape(b, -1), pos), xla_cpu.MODEL),
        "decoder (6 layers)": (decoder, (flat(memory), valid.reshape(b, -1), pos, query_pos), xla_cpu.MODEL),
        f"mask head ({mask_queries or config.num_queries} queries)": (
            mask_head, (hs[-1], logits, memory, inter["projected"], features[2], features[1], features[0]),
            xla_cpu.MASK_HEAD),
    }


def compare_library_fusions(components, repeats: int) -> None:
    """Median ms of every component under each of `library_fusion_choices()` (calls interleaved)."""
    import jax

    from detr_jax import xla_cpu

    choices = library_fusion_choices()
    print("| component | " + " | ".join(f"{name} ms" for name in choices) + " |")
    print("|---|" + "---:|" * len(choices))
    for name, (fn, fn_args, _) in components.items():
        jitted = {choice: jax.jit(fn) if fusions is None else xla_cpu.jit(fn, fusions)
                  for choice, fusions in choices.items()}
        times: dict = {choice: [] for choice in jitted}
        for _ in range(repeats + 1):                      # the first round compiles and warms up
            for choice, f in jitted.items():
                start = time.perf_counter()
                jax.block_until_ready(f(*fn_args))
                times[choice].append(time.perf_counter() - start)
        print(f"| {name} | " + " | ".join(f"{1e3 * float(np.median(t[1:])):.0f}" for t in times.values()) + " |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPUs to use (0: all usable)")
    parser.add_argument("--mask-queries", type=int, default=32, help="0: all 100")
    parser.add_argument("--size", default="800x1066")
    parser.add_argument("--compare-library-fusions", action="store_true",
                        help="time each component under each choice of XLA:CPU's YNNPACK fusions")
    args = parser.parse_args()
    threads = common.limit_threads(args.threads or None)

    import jax

    from detr_jax.config import load_config

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from bench_forward import random_variables, recipe_variables

    config = load_config("detr_r50_dc5_panoptic").model
    variables = recipe_variables(config)
    weights = "recipe" if variables is not None else "random"
    variables = variables if variables is not None else random_variables(config)
    h, w = (int(v) for v in args.size.split("x"))
    x = np.random.default_rng(0).standard_normal((1, h, w, 3)).astype(np.float32)
    mask = np.ones((1, h, w), bool)
    from detr_jax import xla_cpu

    components = component_functions(config, variables, x, mask, args.mask_queries or None)
    m = common.machine()
    if args.compare_library_fusions:
        print(f"machine: {m['cpu']}, {threads} threads, load {m['load_avg_1m']:.1f}, jax {m['jax']}; weights {weights}")
        print(f"command: python {' '.join(sys.argv)}")
        compare_library_fusions(components, args.repeats)
        return
    peak = common.matmul_peak_gflops("jax")
    rows = []
    for name, (fn, fn_args, fusions) in components.items():
        fn = xla_cpu.jit(fn, fusions)
        timing = common.time_calls(lambda: jax.block_until_ready(fn(*fn_args)), args.repeats)
        rows.append((name, timing["median_s"], common.executed_gflops(fn, *fn_args)))
        print(f"{name}: {timing['median_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    total = sum(r[1] for r in rows)
    print(f"machine: {m['cpu']}, {threads} threads, load {m['load_avg_1m']:.1f}, jax {m['jax']}; weights {weights}; "
          f"float32 matmul peak {peak:.0f} GFLOP/s (2048^3, same run)")
    print(f"command: python {' '.join(sys.argv)}")
    print("| component | median ms | share | GFLOPs | GFLOP/s | % of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, gf in rows:
        print(f"| {name} | {t * 1e3:.0f} | {100 * t / total:.0f}% | {gf:.0f} | {gf / t:.0f} | {100 * gf / t / peak:.0f}% |")
    gf = sum(r[2] for r in rows)
    print(f"| sum | {total * 1e3:.0f} | 100% | {gf:.0f} | {gf / total:.0f} | {100 * gf / total / peak:.0f}% |")


if __name__ == "__main__":
    main()
