"""The Hungarian matcher of DETR on padded, static-shape arrays.

Conventions
-----------
* outputs: `pred_logits` float `[B, Q, C+1]` (the last logit is "no object"), `pred_boxes`
  `[B, Q, 4]` (normalized cx, cy, w, h).
* targets: `labels` int `[B, M]`, `boxes` `[B, M, 4]` (normalized cx, cy, w, h), `valid` bool
  `[B, M]` (valid entries first, padding after).
* result: int32 `[B, Q]`, for each query the index of its matched target, or -1.

The cost is the original's, in float32 and in the same order of operations:
`cost_bbox * L1(box, target box) + cost_class * (-softmax(logits)[target class])
 + cost_giou * (-GIoU)`, the softmax over all C+1 logits and the GIoU on cxcywh -> xyxy boxes.

Two solvers give the same assignment (up to exact ties of the optimum):
* `method="scipy"`: `scipy.optimize.linear_sum_assignment` on the host through one
  `jax.pure_callback` per call (batched with `vmap_method="broadcast_all"`, so a `vmap` over
  decoder layers or a batch still makes one host call); the host slices away padded targets.
  Works under `jit`, `vmap` and `pmap`.
* `method="device"`: a jittable Hungarian solver (`_solve_rows`, the shortest augmenting path
  method with potentials, as scipy's) with targets as rows, processing only the valid ones, so
  padded slots cost nothing and can never be matched.  (`optax.assignment.hungarian_algorithm`
  solves the same problem but must assign every padded slot too, much slower with DETR's
  mostly padded targets: BENCHMARKS.md, "Measurements behind design choices".)
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from detr_jax import box_ops

Array = jnp.ndarray
_SAFE_BOX = (0.5, 0.5, 1.0, 1.0)  # stands in for padded target boxes so that no NaN appears


def ensure_target_slot(targets: Dict[str, Array]) -> Dict[str, Array]:
    """Pads targets with zero slots (M = 0) to one invalid slot, so gathers stay well defined."""
    if targets["labels"].shape[-1] > 0:
        return targets
    out = dict(targets)
    lead = targets["labels"].shape[:-1]
    out["labels"] = jnp.zeros(lead + (1,), jnp.int32)
    out["boxes"] = jnp.broadcast_to(jnp.asarray(_SAFE_BOX, jnp.float32), lead + (1, 4))
    out["valid"] = jnp.zeros(lead + (1,), bool)
    if "masks" in targets:
        out["masks"] = jnp.zeros(lead + (1,) + targets["masks"].shape[-2:], jnp.float32)
    return out


def safe_target_boxes(boxes: Array, valid: Array) -> Array:
    """Target boxes `[..., M, 4]` with padded entries replaced by a harmless unit box."""
    return jnp.where(valid[..., None], boxes, jnp.asarray(_SAFE_BOX, boxes.dtype))


def match_cost(outputs: Dict[str, Array], targets: Dict[str, Array], cost_class: float = 1.0,
               cost_bbox: float = 5.0, cost_giou: float = 2.0) -> Array:
    """The matching cost `[B, Q, M]` (float32); columns of padded targets hold finite junk."""
    logits = outputs["pred_logits"].astype(jnp.float32)
    boxes = outputs["pred_boxes"].astype(jnp.float32)
    num_logits = logits.shape[-1]
    labels = jnp.clip(targets["labels"].astype(jnp.int32), 0, num_logits - 1)
    tgt_boxes = safe_target_boxes(targets["boxes"].astype(jnp.float32), targets["valid"])

    prob = jax.nn.softmax(logits, axis=-1)                                       # [B, Q, C+1]
    index = jnp.broadcast_to(labels[:, None, :], prob.shape[:2] + labels.shape[-1:])
    class_cost = -jnp.take_along_axis(prob, index, axis=-1)                     # [B, Q, M]
    bbox_cost = jnp.abs(boxes[:, :, None, :] - tgt_boxes[:, None, :, :]).sum(-1)
    giou_cost = -box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(boxes),
                                              box_ops.box_cxcywh_to_xyxy(tgt_boxes))
    return cost_bbox * bbox_cost + cost_class * class_cost + cost_giou * giou_cost


NONFINITE_COST = 1e30   # stands in for NaN / inf costs, which scipy refuses


def _scipy_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Host side: `[..., Q, M]` costs and `[..., M]` validity -> `[..., Q]` int32 matches."""
    cost, valid = np.asarray(cost), np.asarray(valid)
    num_queries, num_slots = cost.shape[-2:]
    lead = cost.shape[:-2]
    flat_cost = cost.reshape(-1, num_queries, num_slots)
    flat_valid = np.broadcast_to(valid, lead + (num_slots,)).reshape(-1, num_slots)
    out = np.full((flat_cost.shape[0], num_queries), -1, np.int32)
    for i, (c, v) in enumerate(zip(flat_cost, flat_valid)):
        cols = np.flatnonzero(v)
        if cols.size:                      # zero-object images keep all -1
            block = c[:, cols]
            if not np.isfinite(block).all():
                # diverged outputs: match anyway, so that the train loop's non-finite loss check
                # stops the run naming the step, instead of scipy's error inside the callback
                block = np.nan_to_num(block, nan=NONFINITE_COST, posinf=NONFINITE_COST, neginf=-NONFINITE_COST)
            rows, picked = scipy.optimize.linear_sum_assignment(block)
            out[i, rows] = cols[picked]
    return out.reshape(lead + (num_queries,))


def _match_scipy(cost: Array, valid: Array) -> Array:
    shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    return jax.pure_callback(_scipy_host, shape, cost, valid, vmap_method="broadcast_all")


def _solve_rows(cost: Array, active: Array) -> Array:
    """Min-cost assignment of every active row of `cost` `[n, m]` (at most m active rows) to a
    distinct column: the shortest-augmenting-path Hungarian method with potentials, one row at
    a time in order; inactive rows are skipped.  Returns `[m]` int32: per column the matched row
    or -1."""
    n, m = cost.shape
    cost = jnp.pad(cost, ((1, 0), (1, 0)))           # 1-based rows/columns; column 0 is virtual

    def add_row(carry, row):
        u, v, owner = carry                           # potentials, row owning each column (0: none)
        owner = owner.at[0].set(row)

        def search(state):                            # grow the alternating tree by one column
            u, v, used, minv, way, col = state
            used = used.at[col].set(True)
            slack = cost[owner[col]] - u[owner[col]] - v
            better = ~used & (slack < minv)
            minv, way = jnp.where(better, slack, minv), jnp.where(better, col, way)
            reachable = jnp.where(used, jnp.inf, minv)
            nxt = jnp.argmin(reachable)
            delta = reachable[nxt]
            u = u.at[jnp.where(used, owner, n + 1)].add(delta, mode="drop")
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return u, v, used, minv, way, nxt

        start = (u, v, jnp.zeros(m + 1, bool), jnp.full(m + 1, jnp.inf, cost.dtype),
                 jnp.zeros(m + 1, jnp.int32), jnp.int32(0))
        u, v, _, _, way, col = jax.lax.while_loop(
            lambda s: active[row - 1] & (owner[s[5]] != 0), search, start)

        def augment(state):                           # flip the path back to the virtual column
            owner, col = state
            prev = way[col]
            return owner.at[col].set(owner[prev]), prev

        owner, _ = jax.lax.while_loop(lambda s: s[1] != 0, augment, (owner, col))
        return (u, v, owner), None

    init = (jnp.zeros(n + 1, cost.dtype), jnp.zeros(m + 1, cost.dtype), jnp.zeros(m + 1, jnp.int32))
    (_, _, owner), _ = jax.lax.scan(add_row, init, jnp.arange(1, n + 1, dtype=jnp.int32))
    return owner[1:] - 1


def _match_device_single(cost: Array, valid: Array) -> Array:
    """One image: `[Q, M]` cost, `[M]` validity -> `[Q]` int32 matches, on the device.

    Targets are the rows, so padded slots are skipped.  When there may be more valid targets
    than queries (M > Q), dummy queries costing more than any real pair take the surplus.
    """
    num_queries, num_slots = cost.shape
    cost = cost.T                                                        # [M, Q]
    if num_slots > num_queries:
        worst = jnp.max(jnp.where(valid[:, None], cost, -jnp.inf))
        surplus = jnp.where(jnp.any(valid), worst + 1.0, 0.0)
        dummies = jnp.full((num_slots, num_slots - num_queries), surplus, cost.dtype)
        cost = jnp.concatenate([cost, dummies], axis=1)
    return _solve_rows(cost, valid)[:num_queries]


def assign(cost: Array, valid: Array, method: str = "scipy") -> Array:
    """Optimal assignment for costs `[B, Q, M]` and target validity `[B, M]` -> int32 `[B, Q]`
    (matched target per query, or -1); min(Q, #valid) pairs per image, padding never matched."""
    valid = valid.astype(bool)
    if method == "scipy":
        return _match_scipy(cost, valid)
    if method == "device":
        return jax.vmap(_match_device_single)(cost, valid)
    raise ValueError(f"unknown matcher method {method!r}; use 'scipy' or 'device'")


def hungarian_match(outputs: Dict[str, Array], targets: Dict[str, Array], cost_class: float = 1.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0, method: str = "scipy") -> Array:
    """Optimal one-to-one assignment of queries to valid targets: int32 `[B, Q]`, -1 = unmatched.

    Jittable and vmappable for both methods; the result carries no gradient.
    """
    targets = ensure_target_slot(targets)
    outputs = {k: jax.lax.stop_gradient(outputs[k]) for k in ("pred_logits", "pred_boxes")}
    targets = jax.tree.map(jax.lax.stop_gradient, targets)
    cost = match_cost(outputs, targets, cost_class, cost_bbox, cost_giou)
    return assign(cost, targets["valid"], method)


def match_indices(match) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Host helper: `[B, Q]` matches -> per image `(src, tgt)` int64 arrays as the original returns
    them (query indices ascending, `tgt[k]` the target matched to query `src[k]`)."""
    match = np.asarray(match)
    pairs = []
    for row in match.reshape(-1, match.shape[-1]):
        src = np.flatnonzero(row >= 0).astype(np.int64)
        pairs.append((src, row[src].astype(np.int64)))
    return pairs
