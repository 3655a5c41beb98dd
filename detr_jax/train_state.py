"""The training state, its creation (from scratch or from a checkpoint) and its checkpoints.

`TrainState` is a pytree of arrays only (the optimizer and the model live in the train step's
closure), so orbax saves and restores it as it is:

    step       int32 []       number of updates applied
    params     the trained `params` collection (float32)
    buffers    the frozen-BatchNorm `buffers` collection, never updated (kept for the export)
    opt_state  the optax state of `optim.make_optimizer`

Fine-tuning (`init_from`): a detr-jax checkpoint folder (`checkpoint.save`, e.g. converted with
`convert_weights.py`) is merged into freshly initialized variables.  The class head is
re-initialized when its shape differs (another number of classes); the mask head may be missing
from a detection checkpoint (stage 2 starts from stage 1) or unused (stage 1 from a panoptic
checkpoint); anything else missing, unexpected or mis-shaped is an error listing it.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from detr_jax import checkpoint
from detr_jax.config import ModelConfig

log = logging.getLogger(__name__)
REINIT_ON_SHAPE_CHANGE = ("params/class_embed/",)   # the head that depends on the number of classes
OPTIONAL_HEADS = ("params/bbox_attention/", "params/mask_head/")  # present in panoptic models only


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    buffers: Any
    opt_state: Any


REASON_CHARS = 300   # how much of a restore error a log line quotes


def _first_line(error: BaseException) -> str:
    """`Kind: message`, its first line without tensorstore's spec dump, at most REASON_CHARS."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    text = text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class IncompatibleCheckpointError(ValueError):
    """`init_from` does not fit the model: names the missing, unexpected and mis-shaped arrays."""


def merge_pretrained(fresh: Dict[str, Any], loaded: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
    """Variables of `fresh` ({'params', 'buffers'}) with every compatible array of `loaded` copied in.

    Returns (variables, report) with report lists `loaded`, `reinitialized` (class head of another
    shape, or a head missing from the checkpoint) and `ignored` (heads the model does not have).
    Raises IncompatibleCheckpointError for anything else that does not fit.
    """
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
    merged, report = {}, {"loaded": [], "reinitialized": [], "ignored": []}
    problems = {"missing": [], "unexpected": [], "mis-shaped": []}
    for key, value in flat_fresh.items():
        if key not in flat_loaded:
            (report["reinitialized"] if key.startswith(OPTIONAL_HEADS) else problems["missing"]).append(key)
            merged[key] = value
        elif tuple(flat_loaded[key].shape) != tuple(value.shape):
            if key.startswith(REINIT_ON_SHAPE_CHANGE):
                report["reinitialized"].append(f"{key} {tuple(flat_loaded[key].shape)} -> {tuple(value.shape)}")
            else:
                problems["mis-shaped"].append(f"{key}: checkpoint {tuple(flat_loaded[key].shape)}, "
                                              f"model {tuple(value.shape)}")
            merged[key] = value
        else:
            merged[key] = np.asarray(flat_loaded[key], np.asarray(value).dtype)
            report["loaded"].append(key)
    for key in flat_loaded:
        if key not in flat_fresh:
            (report["ignored"] if key.startswith(OPTIONAL_HEADS) else problems["unexpected"]).append(key)
    if any(problems.values()):
        lines = [f"  {kind} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for kind, keys in problems.items() if keys]
        raise IncompatibleCheckpointError("the checkpoint does not fit the model:\n" + "\n".join(lines))
    return traverse_util.unflatten_dict(merged, sep="/"), report


def load_pretrained(path, fresh: Dict[str, Any], model_config: ModelConfig) -> Dict[str, Any]:
    """`merge_pretrained` of the checkpoint folder `path`, logging what was re-initialized."""
    source_config = checkpoint.read_config(path)
    loaded = checkpoint.load_variables(path, source_config)
    variables, report = merge_pretrained(fresh, loaded)
    log.warning("init from %s: %d arrays loaded; re-initialized: %s; ignored (not in this model): %s",
                path, len(report["loaded"]), report["reinitialized"] or "none", report["ignored"] or "none")
    if source_config.num_classes != model_config.num_classes:
        log.warning("init from %s: %d classes in the checkpoint, %d in the model: the class head "
                    "`class_embed` starts from random values", path, source_config.num_classes,
                    model_config.num_classes)
    return variables


def create_train_state(variables: Dict[str, Any], optimizer) -> TrainState:
    """Step 0 with `variables` ({'params', 'buffers'}) as host numpy arrays."""
    params = jax.tree.map(np.asarray, variables["params"])
    opt_state = jax.tree.map(np.asarray, jax.jit(optimizer.init)(params))
    return TrainState(step=np.zeros((), np.int32), params=params,
                      buffers=jax.tree.map(np.asarray, variables.get("buffers", {})), opt_state=opt_state)


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a workdir that holds some can be restored: names each step and its error."""


class Checkpoints:
    """Periodic training checkpoints in `workdir/checkpoints/<step>` (orbax CheckpointManager).

    Saving is asynchronous (training goes on while the files are written); the last `keep` are
    kept.  Every process calls `save`/`restore` with the same host (numpy) state; in a multi-host
    run the folder must be on a filesystem all hosts share.

    Resuming (`restore_latest`) survives damaged checkpoints: a newest one that cannot be restored
    (truncated or missing files) is reported in one line and the next older one is tried; that is
    what keeping several is for.  Once one restores, the damaged newer ones are moved aside to
    `workdir/checkpoints_damaged/<step>` (process 0), so that the run can save those steps again.
    When none restores, it stops with `CheckpointRestoreError` and leaves them all in place: a
    workdir with checkpoints never silently starts from scratch, now or on the next try.
    """

    def __init__(self, workdir, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.damaged_directory = self.directory.with_name("checkpoints_damaged")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self.manager.all_steps()

    def save(self, state: TrainState, metadata: Dict[str, Any]) -> None:
        step = int(state.step)
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                        meta=self._ocp.args.JsonSave(metadata))
        self.manager.save(step, args=args)

    def restore(self, step: int, target: TrainState) -> TrainState:
        """The state saved at `step`, in the structure (and dtypes) of `target`."""
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target))
        restored = self.manager.restore(step, args=args)["state"]
        return jax.tree.map(np.asarray, restored)

    def restore_latest(self, target: TrainState) -> TrainState:
        """The newest checkpoint that restores (see the class docstring), in the structure of
        `target`; raises CheckpointRestoreError when there are checkpoints and none restores,
        ValueError when there are none."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise ValueError(f"{self.directory} holds no checkpoint")
        errors: List[str] = []
        for step in steps:
            try:
                state = self.restore(step, target)
            except Exception as error:   # noqa: BLE001 (orbax raises many kinds for damaged files)
                reason = _first_line(error)
                errors.append(f"step {step}: {reason}")
                log.warning("checkpoint step %d in %s cannot be restored (%s); trying an older one",
                            step, self.directory, reason)
                continue
            for damaged in steps[:len(errors)]:   # newer than the one restored: out of the way
                self._set_aside(damaged)
            return state
        raise CheckpointRestoreError(f"no checkpoint in {self.directory} can be restored:\n  " + "\n  ".join(errors)
                                     + "\nrepair or remove them, or train in another workdir")

    def _set_aside(self, step: int) -> None:
        """Moves a damaged checkpoint out of the manager's folder, so that the run can save that
        step again (process 0; every process then re-reads the folder)."""
        if jax.process_index() == 0:
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            destination = self.damaged_directory / str(step)
            suffix = 1
            while destination.exists():
                destination, suffix = self.damaged_directory / f"{step}.{suffix}", suffix + 1
            (self.directory / str(step)).rename(destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"detr_jax checkpoint {step} set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
