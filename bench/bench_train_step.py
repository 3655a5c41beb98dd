"""One training step of DETR R50-DC5 panoptic on the current JAX backend (the CPU by default).

The step is the library's `make_train_step` jitted on one device: forward, Hungarian matching
(scipy, one host callback for the 6 decoder layers), every loss (masks included), backward and
the AdamW update, for a random-init model.  Cases: batch 1 at 800x1066 and batch 2 at 512x683,
20 objects per image among 100 target slots.  Reported: compile time, median and min of
`--repeats` steps after one warm-up step, the peak RSS of the process (getrusage), and the
Hungarian matching's share of the step, measured two ways: the same step with the matcher
replaced by a fixed assignment (query i -> target i), and the host callback timed alone on cost
matrices of the step's shape.

Beside it, in the same run, one train step of the original in PyTorch (`bench/torch_detr.py`, the
same architecture, random init, train mode) on the same batch, in a subprocess of its own (run
first, so that its peak RSS is its own and the two never hold memory at once): forward, the
original's SetCriterion (HungarianMatcher with scipy per decoder layer on the same cost; CE with
the no-object weight, L1, GIoU, cardinality; focal and dice on the matched masks upsampled to the
target size), backward, gradient clipping at 0.1 and AdamW (backbone lr 1e-5, stem and layer1
frozen), as the original's train loop.  `--no-torch` leaves it out.

    python bench/bench_train_step.py [--repeats 3] [--cases b1_800x1066,b2_512x683] [--config NAME] [--no-torch]
        [--box-bucket 16]

`--box-bucket N`: the JAX batch has the target slots that `DataConfig.box_bucket=N` gives a batch
of 20 objects per image (32 for N=16) instead of max_boxes (100): fewer slots than queries, so the
step runs the mask head on the matched queries only.  The PyTorch side takes the same targets
(unpadded lists) either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

# JAX and detr_jax are imported where used: the PyTorch worker (`--torch-worker`) loads neither.

CASES = {"b1_800x1066": (1, 800, 1066), "b2_512x683": (2, 512, 683)}
OBJECTS = 20


def make_batch(batch: int, h: int, w: int, slots: int, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    valid = np.arange(slots)[None] < np.full((batch, 1), OBJECTS)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, slots, 2)), rng.uniform(0.05, 0.4, (batch, slots, 2))], -1)
    return {"pixel_values": rng.normal(size=(batch, h, w, 3)).astype(np.float32),
            "pixel_mask": np.ones((batch, h, w), bool),
            "labels": rng.integers(0, 250, (batch, slots)).astype(np.int32),
            "boxes": np.where(valid[..., None], boxes, 0).astype(np.float32), "valid": valid,
            "sample_valid": np.ones(batch, bool), "masks": (rng.uniform(size=(batch, slots, h, w)) < 0.1) & valid[..., None, None]}


def fixed_match(outputs, targets, **unused):
    """Query i -> target slot i where that slot is valid: matching without the Hungarian algorithm."""
    import jax.numpy as jnp

    b, q = outputs["pred_logits"].shape[:2]
    slots = targets["valid"].shape[-1]
    index = jnp.broadcast_to(jnp.arange(q), (b, q))
    ok = (index < slots) & jnp.take_along_axis(targets["valid"], jnp.clip(index, 0, slots - 1), axis=1)
    return jnp.where(ok, index, -1).astype(jnp.int32)


def time_step(step, state, batch, rng, repeats: int) -> Dict[str, float]:
    import jax

    t = time.perf_counter()
    from detr_jax import xla_cpu

    options = xla_cpu.compiler_options(xla_cpu.TRAIN_STEP)    # as the library's parallel step
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch, rng).compile(compiler_options=options)
    compile_s = time.perf_counter() - t
    state, metrics = compiled(state, batch, rng)          # warm-up
    jax.block_until_ready(metrics)
    times: List[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times),
            "loss": float(metrics["loss"])}


def time_host_matcher(outputs_shape, batch, repeats: int) -> float:
    """Median seconds of the scipy host function on [layers, B, Q, M] costs like the step's."""
    import jax.numpy as jnp

    from detr_jax.matcher import _scipy_host, match_cost

    layers, b, q, c = outputs_shape
    rng = np.random.default_rng(1)
    out = {"pred_logits": jnp.asarray(rng.normal(size=(layers * b, q, c)), jnp.float32),
           "pred_boxes": jnp.asarray(rng.uniform(0.1, 0.6, (layers * b, q, 4)), jnp.float32)}
    tgt = {k: jnp.asarray(np.concatenate([batch[k]] * layers)) for k in ("labels", "boxes", "valid")}
    cost = np.asarray(match_cost(out, tgt)).reshape(layers, b, q, -1)
    valid = np.broadcast_to(batch["valid"], (layers,) + batch["valid"].shape)
    times = []
    for _ in range(max(repeats, 3)):
        t = time.perf_counter()
        _scipy_host(cost, valid)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_case(config, name: str, repeats: int) -> Dict[str, float]:
    import jax

    from detr_jax import losses, optim
    from detr_jax.data.loader import target_slots
    from detr_jax.models.detr import DETR, init_variables
    from detr_jax.train import make_train_step, stage_configs
    from detr_jax.train_state import create_train_state

    batch_size, h, w = CASES[name]
    model_config, loss_config = stage_configs(config)
    variables = jax.tree.map(np.asarray, init_variables(model_config, jax.random.PRNGKey(0)))
    optimizer = optim.make_optimizer(variables["params"], config.train, steps_per_epoch=1000)
    make = lambda: make_train_step(DETR(model_config), loss_config, optimizer,  # noqa: E731
                                   optim.lr_schedule(config.train.lr, config.train, 1000),
                                   optim.trainable_mask(variables["params"], config.train), axis_name=None)
    batch = make_batch(batch_size, h, w, target_slots(OBJECTS, config.data))
    rng = np.asarray(jax.random.PRNGKey(1))
    result = time_step(make(), create_train_state(variables, optimizer), batch, rng, repeats)
    original = losses.hungarian_match
    losses.hungarian_match = fixed_match      # the same step without the Hungarian matching
    try:
        fixed = time_step(make(), create_train_state(variables, optimizer), batch, rng, repeats)
    finally:
        losses.hungarian_match = original
    layers = model_config.dec_layers
    host = time_host_matcher((layers, batch_size, model_config.num_queries, model_config.num_logits), batch, repeats)
    return dict(result, fixed_median_s=fixed["median_s"], host_matcher_s=host,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


# ------------------------------------------------------------------------------------------------
# The original's train step in PyTorch (bench/torch_detr.py), in a subprocess of its own
# ------------------------------------------------------------------------------------------------
def _torch_box_ops():
    import torch

    def cxcywh_to_xyxy(b):
        cx, cy, w, h = b.unbind(-1)
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)

    def box_iou(a, b):
        area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lt = torch.max(a[:, None, :2], b[:, :2])
        rb = torch.min(a[:, None, 2:], b[:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        union = area_a[:, None] + area_b - inter
        return inter / union, union

    def generalized_box_iou(a, b):
        iou, union = box_iou(a, b)
        lt = torch.min(a[:, None, :2], b[:, :2])
        rb = torch.max(a[:, None, 2:], b[:, 2:])
        wh = (rb - lt).clamp(min=0)
        area = wh[..., 0] * wh[..., 1]
        return iou - (area - union) / area

    return cxcywh_to_xyxy, generalized_box_iou


def torch_criterion(num_classes: int, loss_config):
    """The original's HungarianMatcher + SetCriterion (labels, boxes, cardinality, masks), written
    for this bench: `criterion(outputs, targets) -> (weighted total, terms)`, targets a list of
    dicts (labels [n], boxes [n, 4] cxcywh, masks [n, H, W]) as the original's, on the outputs'
    device (the matching on the host, as the original)."""
    import torch
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment

    cxcywh_to_xyxy, generalized_box_iou = _torch_box_ops()
    lc = loss_config
    empty_weight = torch.ones(num_classes + 1)
    empty_weight[-1] = lc.eos_coef

    @torch.no_grad()
    def match(out, targets):
        bs, nq = out["pred_logits"].shape[:2]
        prob = out["pred_logits"].flatten(0, 1).softmax(-1)
        boxes = out["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        cost = (lc.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1) - lc.cost_class * prob[:, tgt_ids]
                - lc.cost_giou * generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes)))
        cost = cost.view(bs, nq, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        return [tuple(torch.as_tensor(x, dtype=torch.int64) for x in linear_sum_assignment(c[i]))
                for i, c in enumerate(cost.split(sizes, -1))]

    def src_index(indices):
        return (torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)]),
                torch.cat([s for s, _ in indices]))

    def tgt_index(indices):
        return (torch.cat([torch.full_like(t, i) for i, (_, t) in enumerate(indices)]),
                torch.cat([t for _, t in indices]))

    def layer_losses(out, targets, indices, num_boxes, final):
        logits = out["pred_logits"]
        idx = src_index(indices)
        classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = classes_o
        terms = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, empty_weight.to(logits.device))}
        if final:
            with torch.no_grad():
                pred = logits[idx].argmax(-1)
                terms["class_error"] = 100 - 100 * (pred == classes_o).float().mean()
        with torch.no_grad():
            lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
            card = (logits.argmax(-1) != num_classes).sum(1)
            terms["cardinality_error"] = F.l1_loss(card.float(), lengths.float())
        src_boxes = out["pred_boxes"][idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        terms["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)))
        terms["loss_giou"] = (1 - giou).sum() / num_boxes
        if final and "pred_masks" in out:
            src_masks = out["pred_masks"][idx]
            target_masks = torch.stack([t["masks"] for t in targets]).to(src_masks)  # equal sizes: no padding
            target_masks = target_masks[tgt_index(indices)]
            src_masks = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                      align_corners=False)[:, 0].flatten(1)
            target_masks = target_masks.flatten(1)
            prob = src_masks.sigmoid()
            ce = F.binary_cross_entropy_with_logits(src_masks, target_masks, reduction="none")
            p_t = prob * target_masks + (1 - prob) * (1 - target_masks)
            focal = ce * ((1 - p_t) ** lc.focal_gamma)
            focal = (lc.focal_alpha * target_masks + (1 - lc.focal_alpha) * (1 - target_masks)) * focal
            terms["loss_mask"] = focal.mean(1).sum() / num_boxes
            numerator = 2 * (prob * target_masks).sum(1)
            denominator = prob.sum(-1) + target_masks.sum(-1)
            terms["loss_dice"] = (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes
        return terms

    weights = {"loss_ce": lc.ce_weight, "loss_bbox": lc.bbox_weight, "loss_giou": lc.giou_weight,
               "loss_mask": lc.mask_weight, "loss_dice": lc.dice_weight}

    def criterion(out, targets):
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        terms = layer_losses(out, targets, match(out, targets), num_boxes, final=True)
        for i, aux in enumerate(out.get("aux_outputs", [])):
            aux_terms = layer_losses(aux, targets, match(aux, targets), num_boxes, final=False)
            terms.update({f"{k}_{i}": v for k, v in aux_terms.items()})
        total = sum(weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v for k, v in terms.items()
                    if (k.rsplit("_", 1)[0] if k[-1].isdigit() else k) in weights)
        return total, terms

    return criterion


def torch_train_step(config, batch_size: int, h: int, w: int, device=None) -> Callable[[], float]:
    """`step() -> loss`: the original's train step in PyTorch (stem and layer1 frozen, AdamW with
    the backbone's lr, clipping) on `make_batch`'s batch of `batch_size` h x w images, on `device`
    (default: the CPU).  Each call is one update and returns the loss (a host sync)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_detr import build_detr

    device = device or torch.device("cpu")
    mc, tc = config.model, config.train
    torch.manual_seed(0)
    model = build_detr(mc.backbone, mc.dilation, mc.masks, mc.num_classes, mc.num_queries).to(device).train()
    for n, p in model.named_parameters():       # the original: stem and layer1 frozen
        if "backbone" in n and not any(f"layer{i}" in n for i in (2, 3, 4)):
            p.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in trainable if "backbone" not in n]},
                                   {"params": [p for n, p in trainable if "backbone" in n], "lr": tc.lr_backbone}],
                                  lr=tc.lr, weight_decay=tc.weight_decay)
    criterion = torch_criterion(mc.num_classes, config.loss)
    batch = make_batch(batch_size, h, w, config.data.max_boxes)
    images = torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous().to(device)
    padding = torch.from_numpy(~batch["pixel_mask"]).to(device)      # the original: True on padding
    targets = [{"labels": torch.from_numpy(batch["labels"][i][v]).long().to(device),
                "boxes": torch.from_numpy(batch["boxes"][i][v]).to(device),
                "masks": torch.from_numpy(batch["masks"][i][v]).to(device)}
               for i, v in enumerate(batch["valid"])]

    def step() -> float:
        out = model(images, padding)
        total, _ = criterion(out, targets)
        optimizer.zero_grad()
        total.backward()
        if tc.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], tc.clip_max_norm)
        optimizer.step()
        return float(total.detach())

    return step


def torch_step(config_name: str, name: str, repeats: int) -> Dict[str, float]:
    """Times the original's train step in PyTorch on the bench batch (this process: the worker)."""
    import torch

    from detr_jax.config import load_config   # dataclasses only (no JAX)

    batch_size, h, w = CASES[name]
    step = torch_train_step(load_config(config_name), batch_size, h, w)
    step()                                        # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "loss": loss,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def run_torch(config_name: str, name: str, repeats: int) -> Optional[Dict[str, float]]:
    """`torch_step` in a fresh subprocess; None (and the reason on stderr) when it fails."""
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", name, "--config", config_name,
           "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"PyTorch step {name} failed (rc {proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="detr_r50_dc5_panoptic")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch step")
    parser.add_argument("--box-bucket", type=int, default=None,
                        help="JAX targets padded as DataConfig.box_bucket=N pads them (default: to max_boxes)")
    parser.add_argument("--torch-worker", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        print(json.dumps(torch_step(args.config, args.torch_worker, args.repeats)))
        return

    import jax

    from detr_jax.config import load_config
    from detr_jax.data.loader import target_slots

    config = load_config(args.config)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, stage="all"),
                                 data=dataclasses.replace(config.data, box_bucket=args.box_bucket))
    torch_results = {} if args.no_torch else {name: run_torch(args.config, name, args.repeats)
                                              for name in args.cases.split(",")}
    print(f"`python bench/bench_train_step.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
          f"on {jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} CPUs), "
          f"jax {jax.__version__}, {args.config}, random init, {OBJECTS} objects / image in "
          f"{target_slots(OBJECTS, config.data)} target slots (JAX)")
    torch_info = [r for r in torch_results.values() if r]
    if torch_info:
        print(f"PyTorch {torch_info[0]['torch']} ({torch_info[0]['threads']} threads): the original's step "
              f"(bench/torch_detr.py + the original's SetCriterion, AdamW) in a subprocess, run first")
    print()
    print("| case | compile s | step median s | step min s | step w/o matching s | matching share "
          "| host matcher ms | peak RSS GiB | PyTorch step median s | PyTorch peak RSS GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.cases.split(","):
        r = run_case(config, name, args.repeats)
        share = 1 - r["fixed_median_s"] / r["median_s"]
        t = torch_results.get(name)
        torch_cols = (f"{t['median_s']:.2f} | {t['peak_rss_gib']:.1f}" if t else
                      ("not run | not run" if args.no_torch else "failed | failed"))
        print(f"| {name} | {r['compile_s']:.1f} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['fixed_median_s']:.2f} "
              f"| {100 * share:.1f}% (callback alone {100 * r['host_matcher_s'] / r['median_s']:.2f}%) "
              f"| {1e3 * r['host_matcher_s']:.1f} | {r['peak_rss_gib']:.1f} | {torch_cols} |", flush=True)


if __name__ == "__main__":
    main()
