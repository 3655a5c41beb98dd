"""Training: the pure train step, its data-parallel (pmap) form, and the loop with checkpoints.

    from detr_jax.config import load_config
    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.train import train
    result = train(load_config("detr_tiny"), "runs/tiny", CocoPanoptic(root, "train2017"))

Parallelism: one `jax.pmap` over the local devices (built in `make_parallel_train_step` only; on a
single device of a single process, the same step as `jit` of a `vmap` over the device axis);
with several hosts (`initialize_distributed`) the same pmap spans every device, each host reads
its own shard of the data (`Loader(shard_index=process_index, num_shards=process_count)`) and
splits its batch over its devices.  `TrainConfig.batch_size` is the global batch.

Host syncs: the only transfers in the loop are each step's batch (host to device, explicit in
`shard_batch`) and, every `log_every` steps, the metrics of those steps (device to host); a
non-finite loss found then stops training with an error naming the first bad step.

Outputs in `workdir`: `checkpoints/<step>` (orbax, the last `keep_checkpoints`; `resume=True`
continues exactly: same parameters, optimizer state, step, data order and dropout keys),
`metrics.jsonl` (one row per log interval: every loss term and metric averaged over the interval,
lr, grad norm, images/s), TensorBoard events when `tensorboardX` is installed, `config.json`, and
`model/`, the final model as an inference checkpoint (`detr_jax.load`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from detr_jax import checkpoint, encoder_supervision, optim, runtime, training_queries, xla_cpu
from detr_jax.config import Config, LossConfig, ModelConfig, to_json
from detr_jax.data.loader import Loader
from detr_jax.data.transforms import TrainTransform
from detr_jax.encoder_supervision import EncoderSupervision
from detr_jax.losses import set_criterion, with_sample_valid
from detr_jax.models.detr import DETR, abstract_variables, init_variables
from detr_jax.train_state import Checkpoints, TrainState, create_train_state, load_pretrained
from detr_jax.training_queries import TRAINING_ONLY, TrainingQueries, model_params, training_criterion

log = logging.getLogger(__name__)
AXIS = "batch"              # the pmap axis: gradients and metrics are averaged over it
NOISE_STREAM = 1            # fold_in of the step's key that draws the denoising noise
ENCODER_STREAM = 2          # fold_in of the init key that draws the encoder head (the queries' use NOISE_STREAM)
MODEL_INPUTS = ("pixel_values", "pixel_mask")
TARGETS = ("labels", "boxes", "valid", "sample_valid")
EvalFn = Callable[[Dict[str, Any], int], Optional[Dict[str, float]]]


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------
def stage_configs(config: Config, policy: runtime.PolicyLike = "auto") -> tuple[ModelConfig, LossConfig]:
    """The model and loss configs a training stage runs: the panoptic recipe's stage, the runtime
    `policy`'s attention implementation (blocked on the CPU, dense on GPU/TPU) and, with
    `mixed_precision`, bfloat16 compute (parameters, optimizer state, losses, the matcher's
    inputs and the softmaxes stay float32: the model's outputs are float32)."""
    model, loss, stage = config.model, config.loss, config.train.stage
    if stage == "detection":
        model, loss = dataclasses.replace(model, masks=False), dataclasses.replace(loss, masks=False)
    elif stage == "masks":
        model, loss = dataclasses.replace(model, masks=True), dataclasses.replace(loss, masks=True)
    return runtime.execution_config(model, policy, "bfloat16" if config.train.mixed_precision else None), loss


def make_train_step(model: DETR, loss_config: LossConfig, optimizer: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, trainable: Dict[str, Any], *, padding_invariant: bool = True,
                    axis_name: Optional[str] = AXIS, queries: Optional[TrainingQueries] = None,
                    encoder: Optional[EncoderSupervision] = None) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)`, pure; `axis_name=None` outside pmap.

    batch: pixel_values [B, H, W, 3], pixel_mask [B, H, W], labels [B, M], boxes [B, M, 4],
    valid [B, M], sample_valid [B] (all True when absent) and, with mask losses, masks [B, M, H, W].  rng: the run's base key (uint32 [2]);
    dropout draws from `fold_in(fold_in(rng, step), device index)`.  metrics: every term of
    `set_criterion`, `grad_norm` (trainable gradients, before clipping) and `lr`, averaged over
    the devices.

    With the mask losses and fewer target slots M than queries, the mask head's per-query part
    runs on the matched queries only (one per slot; `matched_masks_only`): the losses and their
    gradients are those of masks for every query, since unmatched masks get no loss.

    queries: the training-only accelerators (`training_queries.build`; None: plain DETR).  Then
    `state.params` also holds `params["training_only"]`, the decoder runs the model's queries with
    the training queries (`DETR.detect_with_extra_queries`, noise drawn from the step's key), the
    mask losses run on the matched queries of the model's own group, and the losses are
    `training_criterion`'s (metrics add `loss_groups`, `loss_dn` and the `_dn` terms).

    encoder: the encoder's dense supervision (`encoder_supervision.build`; None: off).  Then
    `params["training_only"]` holds its head, and the loss adds `encoder.weight` times its
    `loss_enc` (metrics add the `_enc` terms).
    """

    def train_step(state: TrainState, batch: Dict[str, jnp.ndarray], rng: jnp.ndarray):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        keys = TARGETS + (("masks",) if loss_config.masks else ())
        targets = with_sample_valid({k: batch[k] for k in keys if k != "sample_valid" or k in batch})

        matched_only = matched_masks_only(model.config, loss_config, targets["labels"].shape[-1])

        def loss_fn(params):
            variables = {"params": model_params(params), "buffers": state.buffers}
            inputs, method, assignment = (batch["pixel_values"], batch["pixel_mask"]), DETR.detect, None
            if queries is not None:
                extra, assignment = queries.apply({"params": params[TRAINING_ONLY]}, targets,
                                                  jax.random.fold_in(rng, NOISE_STREAM))
                inputs, method = inputs + (extra,), DETR.detect_with_extra_queries
            detect = functools.partial(model.apply, variables, *inputs, train=True, padding_invariant=padding_invariant,
                                       rngs={"dropout": rng}, method=method)
            (outputs, features), sown = detect(mutable=["intermediates"]) if encoder is not None else (detect(), None)
            mask_fn = None
            if loss_config.masks and (matched_only or queries is not None):
                mask_fn = lambda indices: model.apply(variables, features, indices,  # noqa: E731
                                                      method=DETR.masks_of_queries)
            elif loss_config.masks:     # every query's mask, as the model computes them
                outputs = dict(outputs, pred_masks=model.apply(variables, features, method=DETR.masks_of_all_queries))
            if queries is not None:
                terms = training_criterion(outputs, targets, assignment, queries, loss_config, axis_name=axis_name,
                                           mask_fn=mask_fn)
            else:
                terms = set_criterion(outputs, targets, loss_config, axis_name=axis_name, mask_fn=mask_fn)
            if encoder is not None:
                encoder_terms = encoder.criterion(params[TRAINING_ONLY], sown["intermediates"]["memory"][0],
                                                  batch["pixel_mask"], targets, loss_config, axis_name=axis_name)
                terms = dict(terms, **encoder_terms, loss=terms["loss"] + encoder.weight * encoder_terms["loss_enc"])
            return terms["loss"], terms

        grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            grads, terms = jax.lax.pmean((grads, terms), axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        trained = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        metrics = dict(terms, grad_norm=optax.tree.norm(trained), lr=lr_schedule(state.step))
        return new_state, metrics

    return train_step


def matched_masks_only(model_config: ModelConfig, loss_config: LossConfig, num_slots: int) -> bool:
    """Whether the train step computes masks for the matched queries only: with the mask losses,
    when there are fewer target slots than queries (each slot has at most one matched query)."""
    return bool(loss_config.masks and model_config.masks and num_slots < model_config.num_queries)


def make_parallel_train_step(train_step: Callable) -> Callable:
    """The data-parallel step: pmap over `AXIS` (every device of every host), state donated.

    Arguments and results carry a leading axis of the local device count: the state and rng
    replicated (`replicate`), the batch split (`shard_batch`).  On the CPU the step is compiled
    with `detr_jax.xla_cpu.TRAIN_STEP`'s options, once per batch signature.

    On a single device of a single process the same step runs as `jit` of a `vmap` over `AXIS`
    (the same leading axis, of size 1, and the same collectives): a jitted function's dispatch is
    much cheaper than calling a compiled pmap program (the demo's detector step: 0.108 s jitted,
    0.132 s through the pmap program, 2026-12-05).
    """
    if single_device():
        return xla_cpu.jit(jax.vmap(train_step, axis_name=AXIS), xla_cpu.TRAIN_STEP, donate_argnums=(0,))
    return xla_cpu.compiled_per_signature(jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,)),
                                          xla_cpu.TRAIN_STEP)


def single_device() -> bool:
    """One process with one local device: the train step is jitted, not pmapped."""
    return jax.process_count() == 1 and jax.local_device_count() == 1


def replicate(tree: Any) -> Any:
    """Host arrays -> a leading local-device axis with one copy per device (numpy, for pmap)."""
    n = jax.local_device_count()
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)), tree)


def replicate_on_devices(tree: Any) -> Any:
    """`replicate`, placed on the local devices with the sharding that the pmapped step returns.

    The step's compiled executable is cached by its arguments' shardings too: host arrays on the
    first call and the step's own outputs (sharded over a mesh axis named `AXIS`) on the next ones
    would compile the whole step twice.  On a single device (`single_device`), the jitted
    step's: arrays on the default device."""
    if single_device():
        return jax.device_put(replicate(tree))
    return jax.pmap(lambda x: x, axis_name=AXIS)(replicate(tree))


def unreplicate(tree: Any) -> Any:
    """The first local copy of a replicated device tree (a pmap result, `replicate_on_devices`'s
    too when no step ran, e.g. resuming a finished run), as host numpy arrays.  The copy is taken
    apart on the host: indexing the device arrays compiled a program per leaf shape (41 in a
    detr_tiny run with a checkpoint, seconds of a short run)."""
    return jax.tree.map(lambda x: x[0], jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), tree)))


def shard_batch(batch: Dict[str, np.ndarray], keys) -> Dict[str, np.ndarray]:
    """This host's batch `[B, ...]` -> `[devices, B / devices, ...]` for the keys the step uses."""
    n = jax.local_device_count()
    b = batch["pixel_values"].shape[0]
    if b % n:
        raise ValueError(f"a host batch of {b} images does not split over {n} local devices")
    return {k: batch[k].reshape((n, b // n) + batch[k].shape[1:]) for k in keys}


def pad_to_common_shape(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Multi-host: pad every host's batch to the largest image bucket of this step (one small
    cross-host gather), as one pmap needs the same shapes everywhere."""
    from jax.experimental import multihost_utils

    hw = np.asarray(batch["pixel_values"].shape[1:3], np.int32)
    target = np.max(multihost_utils.process_allgather(hw), axis=0)
    if tuple(target) == tuple(hw):
        return batch
    out = dict(batch)
    for key, axes in (("pixel_values", (1, 2)), ("pixel_mask", (1, 2)), ("masks", (2, 3))):
        if key in batch:
            pad = [(0, 0)] * batch[key].ndim
            pad[axes[0]], pad[axes[1]] = (0, int(target[0] - hw[0])), (0, int(target[1] - hw[1]))
            out[key] = np.pad(batch[key], pad)
    return out


def nonfinite_error(history: List[Dict[str, float]]) -> Optional[FloatingPointError]:
    """An error naming the first step whose loss is not finite, or None."""
    for row in history:
        if not np.isfinite(row["loss"]):
            bad = sorted(k for k, v in row.items() if k != "step" and not np.isfinite(v))
            return FloatingPointError(f"non-finite loss {row['loss']} at step {row['step']} (the update of "
                                      f"step {row['step']} is the first bad one; non-finite terms: {bad}); "
                                      f"lower the lr, check the data, or resume from an earlier checkpoint")
    return None


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """`jax.distributed.initialize` from the arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES
    / JAX_PROCESS_ID; nothing when neither gives a coordinator (a single-host run).  "auto": let JAX
    detect the cluster (SLURM, Cloud TPU pods, ...) from its environment."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return
    num_processes = num_processes if num_processes is not None else int(env["JAX_NUM_PROCESSES"])
    process_id = process_id if process_id is not None else int(env["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; harmless elsewhere
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------
class MetricsWriter:
    """Rows to `workdir/metrics.jsonl` (and TensorBoard when tensorboardX is importable), process 0 only."""

    def __init__(self, workdir: pathlib.Path, resume_step: int, enabled: bool):
        self.path, self.enabled, self.tb = workdir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if self.path.exists():  # rows after the resumed step belong to a run that was cut off
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in kept))
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def summarize(history: List[Dict[str, float]], seconds: float, global_batch: int) -> Dict[str, Any]:
    """One logged row: the mean of every metric over the interval, the last lr, images/s."""
    row = {k: float(np.mean([h[k] for h in history])) for k in history[-1] if k not in ("step", "lr")}
    return dict(step=int(history[-1]["step"]) + 1, lr=float(history[-1]["lr"]), **row,
                images_per_s=len(history) * global_batch / max(seconds, 1e-9))


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def make_loader(train_data, config: Config) -> Loader:
    """A training Loader of this host's shard; `train_data` may already be one (used as is).  Its
    records keep their masks only where the stage's losses use them (`stage_configs`)."""
    if isinstance(train_data, Loader):
        return train_data
    batch, hosts = config.train.batch_size, jax.process_count()
    if batch % (hosts * jax.local_device_count()):
        raise ValueError(f"batch_size {batch} must split over {hosts} hosts x {jax.local_device_count()} devices")
    uses_masks = stage_configs(config)[1].masks
    return Loader(train_data, batch // hosts, TrainTransform(config.data), seed=config.train.seed,
                  num_workers=config.train.num_workers, shard_index=jax.process_index(), num_shards=hosts,
                  config=config.data, keep_masks=uses_masks, cache_records=config.train.cache_records)


def run_keys(seed: int):
    """(key of the parameter initialization, base key of the dropout draws) of a run."""
    return tuple(jax.random.split(jax.random.PRNGKey(seed)))


def mask_attention_positions(model_config: ModelConfig, image_size: int) -> int:
    """heads x h x w of the mask head's attention maps for square `image_size` images: the
    `TrainConfig.mask_attention_gain` that gives each map position the weight of a unit input."""
    stride = 16 if model_config.dilation or model_config.is_convnet else 32
    side = -(-image_size // stride)
    return model_config.num_heads * side * side


def scale_mask_attention_kernel(params: Dict[str, Any], model_config: ModelConfig, gain: float) -> Dict[str, Any]:
    """`params` with the first mask-head convolution's kernel on the attention-map input channels
    (`mask_head/lay1`, HWIO, the last `num_heads` input channels) multiplied by `gain`."""
    if gain == 1.0 or "mask_head" not in params:
        return params
    kernel = np.array(params["mask_head"]["lay1"]["kernel"])
    kernel[:, :, kernel.shape[2] - model_config.num_heads:, :] *= gain
    lay1 = dict(params["mask_head"]["lay1"], kernel=kernel)
    return dict(params, mask_head=dict(params["mask_head"], lay1=lay1))


def initial_state(config: Config, model_config: ModelConfig, optimizer, init_from, rng,
                  queries: Optional[TrainingQueries] = None,
                  encoder: Optional[EncoderSupervision] = None) -> TrainState:
    """Step 0: the model's variables (random, or merged from `init_from`: a fresh mask head's
    attention-map kernel scaled by `mask_attention_gain`, one loaded from `init_from` kept as it
    is) and, with `queries` and / or `encoder`, the training-only parameters in
    `params["training_only"]` (from keys of their own)."""
    variables = jax.tree.map(np.asarray, init_variables(dataclasses.replace(model_config, dtype="float32"), rng))
    variables = dict(variables, params=scale_mask_attention_kernel(variables["params"], model_config,
                                                                   config.train.mask_attention_gain))
    if init_from is not None:
        variables = load_pretrained(init_from, variables, model_config)
    elif config.train.stage == "masks":
        log.warning("stage 'masks' without init_from: the detector is random; give the stage-1 checkpoint")
    extra = training_only_params(queries, encoder, rng)
    if extra is not None:
        variables = dict(variables, params={**variables["params"], TRAINING_ONLY: jax.tree.map(np.asarray, extra)})
    return create_train_state(variables, optimizer)


def training_only_params(queries: Optional[TrainingQueries], encoder: Optional[EncoderSupervision], rng,
                         abstract: bool = False) -> Optional[Dict[str, Any]]:
    """params["training_only"] of the accelerators (None when all are off): the queries' and the
    encoder head's (`encoder_supervision.ENCODER_HEAD`), each drawn from a key of its own;
    `abstract`: as `jax.ShapeDtypeStruct` leaves."""
    parts: Dict[str, Any] = {}
    if queries is not None:
        parts.update(queries.abstract_params() if abstract else queries.init_params(jax.random.fold_in(rng, NOISE_STREAM)))
    if encoder is not None:
        parts.update(encoder.abstract_params() if abstract else encoder.init_params(jax.random.fold_in(rng, ENCODER_STREAM)))
    return parts or None


def exported_variables(state: TrainState) -> Dict[str, Any]:
    """The model's variables of a (host) train state: the training-only parameters left out."""
    return {"params": model_params(state.params), "buffers": state.buffers}


def train(config: Config, workdir, train_data, *, resume: bool = True, max_steps: Optional[int] = None,
          init_from=None, eval_fn: Optional[EvalFn] = None, eval_every: Optional[int] = None,
          progress: bool = True, policy: runtime.PolicyLike = "auto") -> Dict[str, Any]:
    """Train `config` on `train_data` (a `data.coco` dataset or a `Loader`) in `workdir`.

    resume: continue from the latest checkpoint in `workdir` (init_from is then ignored); False
    with checkpoints present is an error.  max_steps: overrides the config's steps.  init_from: a
    detr-jax checkpoint folder to start from (fine-tuning, or stage 2 of the panoptic recipe).
    eval_fn(variables, step) -> metrics dict: called every `eval_every` steps and at the end, on
    process 0 only (the other hosts wait at their next step); its numbers are logged to
    metrics.jsonl as `eval/NAME` (`detr_jax.evaluation.runner.make_eval_fn`).  policy: the runtime's
    execution policy the step follows ("auto": by the backend; see `detr_jax.runtime`); under the
    CPU policy the process's C heap keeps the memory the steps free (`runtime.keep_host_heap`).
    Returns {"state": TrainState (host), "metrics": the last logged row, "steps": steps run here}.
    """
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tc, primary = config.train, jax.process_index() == 0
    model_config, loss_config = stage_configs(config, policy)
    if runtime.resolve_policy(policy).keep_host_heap:
        runtime.keep_host_heap()
    loader = make_loader(train_data, config)
    total = max_steps or tc.max_steps or tc.epochs * loader.steps_per_epoch
    init_rng, step_rng = run_keys(tc.seed)
    queries = training_queries.build(tc, model_config)
    encoder = encoder_supervision.build(tc, model_config)
    abstract_params = abstract_variables(model_config)["params"]
    abstract_extra = training_only_params(queries, encoder, None, abstract=True)
    if abstract_extra is not None:
        abstract_params = {**abstract_params, TRAINING_ONLY: abstract_extra}
    optimizer = optim.make_optimizer(abstract_params, tc, loader.steps_per_epoch)
    checkpoints = Checkpoints(workdir, tc.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{checkpoints.directory} holds checkpoints (latest step {latest}): resume, or "
                              f"use another workdir")
    state = initial_state(config, model_config, optimizer, None if latest else init_from, init_rng, queries, encoder)
    if latest is not None:
        state = checkpoints.restore_latest(state)   # past damaged ones, never from scratch
        log.warning("resumed from %s/%d", checkpoints.directory, int(state.step))
    start = int(state.step)
    if primary:
        (workdir / "config.json").write_text(to_json(config))
        log.warning("training %s (stage %s) steps %d..%d on %d devices x %d hosts; parameters %s",
                    config.name, tc.stage, start, total, jax.local_device_count(), jax.process_count(),
                    optim.count_by_label(state.params, tc))

    step_fn = make_train_step(DETR(model_config), loss_config, optimizer,
                              optim.lr_schedule(tc.lr, tc, loader.steps_per_epoch),
                              optim.trainable_mask(state.params, tc), padding_invariant=tc.padding_invariant,
                              queries=queries, encoder=encoder)
    p_train_step = make_parallel_train_step(step_fn)
    keys = MODEL_INPUTS + TARGETS + (("masks",) if loss_config.masks else ())
    device_state, device_rng = replicate_on_devices(state), replicate(step_rng)
    writer = MetricsWriter(workdir, start, primary)
    meta = {"config": json.loads(to_json(config)), "model": model_config.to_dict()}
    pending: List[tuple] = []  # (step, metrics on the devices)
    last_row: Dict[str, Any] = {}
    tick = time.perf_counter()

    def flush() -> None:  # the host sync: metrics of the steps since the last one
        nonlocal tick, last_row
        if not pending:
            return
        history = [dict(row, step=s) for (s, _), row in zip(pending, unreplicate([m for _, m in pending]))]
        pending.clear()
        error = nonfinite_error(history)
        if error is not None:
            raise error
        last_row = summarize(history, time.perf_counter() - tick, tc.batch_size)
        writer.write(last_row)
        bar.set_postfix(loss=f"{last_row['loss']:.4f}", img_s=f"{last_row['images_per_s']:.1f}")
        tick = time.perf_counter()

    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, disable=not (progress and primary), desc=config.name, unit="step")
    batches: Iterator[Dict[str, np.ndarray]] = loader.iterate(start_step=start)
    try:
        for step in range(start, total):
            batch = next(batches)
            if jax.process_count() > 1:
                batch = pad_to_common_shape(batch)
            device_state, metrics = p_train_step(device_state, shard_batch(batch, keys), device_rng)
            pending.append((step, metrics))
            bar.update(1)
            done = step + 1
            if done % tc.log_every == 0 or done == total:
                flush()
            if done % tc.save_every == 0 or done == total:
                flush()  # never save a state whose loss went non-finite
                checkpoints.save(unreplicate(device_state), dict(meta, metrics=last_row))
            if eval_fn is not None and primary and ((eval_every and done % eval_every == 0) or done == total):
                host = unreplicate(device_state)
                result = eval_fn(exported_variables(host), done)
                if result:
                    writer.write(dict(step=done, **{f"eval/{k}": v for k, v in result.items()}))
        state = unreplicate(device_state)
        export_model_config = dataclasses.replace(model_config, dtype=config.model.dtype,
                                                  attention=config.model.attention)
        checkpoint.save(workdir / "model", export_model_config, exported_variables(state),
                        source=f"detr-jax train {config.name} stage {tc.stage} step {int(state.step)}")
    finally:
        bar.close()
        writer.close()
        checkpoints.wait()
        checkpoints.close()
    return {"state": state, "metrics": last_row, "steps": total - start}


# ------------------------------------------------------------------------------------------------
# Entry point of `detr-jax train`
# ------------------------------------------------------------------------------------------------
def build_dataset(config: Config, data=None, split: str = "train2017", images=None, annotations=None,
                  panoptic_dir=None, tfds=None, tfds_data_dir=None):
    """The training dataset: a COCO root and split, an image folder with its annotation json, or a
    TensorFlow Datasets name (`coco/2017`, `coco/2017_panoptic`; split train2017 means train).

    Panoptic annotations (a panoptic config with a COCO root, `panoptic_dir` given, or a panoptic
    TFDS dataset) give `CocoPanoptic` (`TfdsCocoPanoptic`), whose boxes come from the segments (stage 1
    of the panoptic recipe); otherwise `CocoDetection` (`TfdsCocoDetection`), with instance masks when
    the mask losses are on (not on TFDS: coco/2017 has none).
    """
    from detr_jax.data.coco import CocoDetection, CocoPanoptic

    _, loss_config = stage_configs(config)
    if tfds is not None:
        from detr_jax.data.tfds import load_tfds

        dataset = load_tfds(tfds, split, data_dir=tfds_data_dir)
        if loss_config.masks and not dataset.panoptic:
            raise ValueError(f"{tfds} has no instance masks, which the mask losses need: train on "
                             f"coco/2017_panoptic, or run --stage detection")
        return dataset
    if data is not None:
        if config.model.masks:
            return CocoPanoptic(data, split)
        return CocoDetection(data, split, return_masks=loss_config.masks)
    if images is None or annotations is None:
        raise ValueError("give --data COCO_ROOT, --images DIR and --annotations JSON, or --tfds NAME")
    if panoptic_dir is not None:
        return CocoPanoptic(images_dir=images, ann_file=annotations, png_dir=panoptic_dir)
    return CocoDetection(images_dir=images, ann_file=annotations, return_masks=loss_config.masks)


def build_eval_fn(config: Config, eval_split: str = "val2017", max_images: Optional[int] = None, *, data=None,
                  tfds=None, tfds_data_dir=None, **unused_data_args) -> EvalFn:
    """Periodic evaluation on the validation split of the training data: `eval_split` of the COCO
    root `data`, or of the TFDS dataset `tfds` (val2017 means validation); the first `max_images`."""
    from detr_jax.evaluation.runner import load_dataset, make_eval_fn

    dataset = load_dataset(data, eval_split, tfds=tfds, tfds_data_dir=tfds_data_dir)
    model_config, _ = stage_configs(config)
    devices = jax.process_count() * jax.local_device_count()
    return make_eval_fn(dataclasses.replace(model_config, dtype=config.model.dtype), dataset, config.data,
                        max_images=max_images, batch_size=max(1, config.train.batch_size // devices))


def run(config_name: str, workdir, *, num_classes=None, batch_size=None, max_steps=None, stage=None,
        mixed_precision: Optional[bool] = None, query_groups: Optional[int] = None,
        denoising_groups: Optional[int] = None, encoder_supervision: Optional[float] = None, init_from=None,
        resume=True, coordinator_address=None,
        num_processes=None, process_id=None,
        eval_every: Optional[int] = None, eval_max_images: Optional[int] = None, eval_split: str = "val2017",
        progress: bool = True, **data_args) -> Dict[str, Any]:
    """`detr-jax train`: load the config, apply the overrides, join the hosts, build the data, train.

    num_classes: an int, or "auto" for the dataset's (fine-tuning on another label set).
    query_groups, denoising_groups, encoder_supervision: the training-only accelerators
    (`TrainConfig.query_groups`, `DenoisingConfig.groups`, `TrainConfig.encoder_supervision`; None:
    the config's).
    eval_every: evaluate (box AP, segm AP, PQ) every N steps and at the end on `eval_split`, the
    first `eval_max_images` images, on process 0 (`build_eval_fn`).  progress: the progress bar.
    data_args: `build_dataset`'s (data, split, images, annotations, panoptic_dir, tfds, tfds_data_dir).
    """
    from detr_jax.config import load_config

    initialize_distributed(coordinator_address, num_processes, process_id)
    config = load_config(config_name)
    overrides = {k: v for k, v in (("batch_size", batch_size), ("max_steps", max_steps), ("stage", stage),
                                   ("mixed_precision", mixed_precision)) if v is not None}
    if query_groups is not None:
        overrides["query_groups"] = query_groups
    if encoder_supervision is not None:
        overrides["encoder_supervision"] = encoder_supervision
    if denoising_groups is not None:
        overrides["denoising"] = dataclasses.replace(config.train.denoising, groups=denoising_groups)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **overrides))
    dataset = build_dataset(config, **data_args)
    if num_classes is not None:
        n = dataset.num_classes if num_classes == "auto" else int(num_classes)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=n))
    if dataset.num_classes > config.model.num_classes:
        raise ValueError(f"the dataset's labels need num_classes >= {dataset.num_classes}, the config has "
                         f"{config.model.num_classes}; pass --num-classes auto to fine-tune on it")
    eval_fn = None
    if eval_every and data_args.get("data") is None and data_args.get("tfds") is None:
        raise ValueError("periodic evaluation (--eval-every) needs --data or --tfds, whose --eval-split it reads")
    if eval_every and jax.process_index() == 0:
        eval_fn = build_eval_fn(config, eval_split, eval_max_images, **data_args)
    return train(config, workdir, dataset, resume=resume, init_from=init_from, eval_fn=eval_fn,
                 eval_every=eval_every, progress=progress)
