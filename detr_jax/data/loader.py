"""Deterministic, resumable, sharded batching into static shapes for jit.

A batch (B = batch_size, M = DataConfig.max_boxes, H x W = the batch's bucket):

    pixel_values float32 [B, H, W, 3]   normalized, zero padding at the bottom / right
    pixel_mask   bool    [B, H, W]      True on real pixels
    labels       int32   [B, M]
    boxes        float32 [B, M, 4]      normalized cx, cy, w, h of the unpadded image
    valid        bool    [B, M]         True on real targets
    masks        bool    [B, M, H, W]   panoptic only: at the PADDED image size, False outside
    image_id     int64   [B]            -1 on filler rows
    orig_size    int32   [B, 2]         (h, w) of the stored image
    image_size   int32   [B, 2]         (h, w) after the transform, before padding
    sample_valid bool    [B]            False on filler rows (see below)

Buckets: each image's sides are rounded up to a multiple of `bucket_multiple`, capped at the
largest size a transform can produce (max(max_size, train_max_size)), never below the image;
the batch takes the largest bucket of its images, so a run compiles for a handful of shapes.
More than M targets: the M largest by `area` are kept (in their original order), warned once.
With `DataConfig.box_bucket` (one host only: every host's batch must have the same shapes), M is
the batch's largest target count rounded up to a multiple of it, capped at max_boxes.

Order and randomness: epoch e visits `permutation(seed, e)` of the dataset; shard s of S takes
every S-th item of it.  Item i's augmentation draws from `default_rng([seed, 1, e, i])`, so
batches do not depend on the number of workers.  `iterate(start_step=k)` starts at global step k
(epoch k // steps_per_epoch) without reading the skipped items.

Records: `keep_masks=False` drops each record's masks before the transform (a stage whose losses
use none: no time spent resizing, flipping and padding them).  `cache_records=True` keeps every
record read (after that drop) in memory and reads each item from disk once: for small datasets
trained for many epochs, where decoding would take a share of the CPU the train step needs.
Cached arrays are read-only, so a transform that wrote into its input would fail loudly instead of
changing later epochs.

Filler rows keep shapes static: an unreadable item (`BadSampleError`, logged and counted in
`num_skipped`) is replaced by a copy of another row of its batch, and with
`drop_remainder=False` the last batch of an epoch is completed the same way; both have
`sample_valid` False and `image_id` -1 (evaluators must skip them).
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from detr_jax.config import DataConfig
from detr_jax.data.coco import BadSampleError
from detr_jax.data.preprocess import bucket_shape, pad_batch
from detr_jax.data.transforms import finalize

log = logging.getLogger(__name__)
Sample = Dict[str, np.ndarray]


def _bucket(size: Sequence[int], multiple: int, cap: Optional[int]) -> Tuple[int, int]:
    rounded = bucket_shape(int(size[0]), int(size[1]), multiple)
    if cap is None:
        return tuple(rounded)
    return tuple(max(min(r, cap), int(s)) for r, s in zip(rounded, size))


def target_slots(most: int, config: DataConfig) -> int:
    """Target slots M of a batch whose largest target count is `most`: max_boxes, or with
    `box_bucket` that count rounded up to a multiple of it (at least one bucket, at most max_boxes)."""
    if config.box_bucket is None:
        return config.max_boxes
    return min(config.max_boxes, max(1, -(-most // config.box_bucket)) * config.box_bucket)


def collate(samples: List[Sample], max_boxes: int, bucket_multiple: int, max_side: Optional[int] = None,
            sample_valid: Optional[Sequence[bool]] = None,
            with_masks: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """Stack transformed samples (`transforms.finalize` output) into one padded batch (module doc)."""
    buckets = [_bucket(s["image"].shape[:2], bucket_multiple, max_side) for s in samples]
    shape = (max(b[0] for b in buckets), max(b[1] for b in buckets))
    pixel_values, pixel_mask = pad_batch([s["image"] for s in samples], shape)
    n = len(samples)
    with_masks = all("masks" in s for s in samples) if with_masks is None else with_masks
    batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask,
             "labels": np.zeros((n, max_boxes), np.int32), "boxes": np.zeros((n, max_boxes, 4), np.float32),
             "valid": np.zeros((n, max_boxes), bool),
             "image_id": np.array([s["image_id"] for s in samples], np.int64),
             "orig_size": np.stack([np.asarray(s["orig_size"], np.int32) for s in samples]),
             "image_size": np.stack([np.asarray(s["image_size"], np.int32) for s in samples]),
             "sample_valid": np.ones(n, bool) if sample_valid is None else np.asarray(sample_valid, bool)}
    if with_masks:
        batch["masks"] = np.zeros((n, max_boxes) + shape, bool)
    for i, s in enumerate(samples):
        keep = np.arange(len(s["labels"]))
        if len(keep) > max_boxes:
            area = s["area"] if "area" in s else s["boxes"][:, 2] * s["boxes"][:, 3]
            keep = np.sort(np.argsort(-np.asarray(area), kind="stable")[:max_boxes])
        k = len(keep)
        batch["labels"][i, :k] = s["labels"][keep]
        batch["boxes"][i, :k] = s["boxes"][keep]
        batch["valid"][i, :k] = True
        if with_masks:
            h, w = s["masks"].shape[1:]
            batch["masks"][i, :k, :h, :w] = s["masks"][keep]
    batch["image_id"][~batch["sample_valid"]] = -1
    return batch


def read_only(record: Sample) -> Sample:
    """A shallow copy of `record` whose numpy arrays are read-only views."""
    def frozen(value):
        if isinstance(value, np.ndarray):
            value = value.view()
            value.flags.writeable = False
        return value
    return {k: frozen(v) for k, v in record.items()}


class Loader:
    """Batches of `dataset` (a sequence of records, `coco.py`) through `transform(record, rng)`.

    transform: e.g. `TrainTransform(cfg)`; None = `finalize` only (no resize, no augmentation).
    num_workers: threads decoding and augmenting ahead of the consumer (0: in the caller).
    prefetch: batches prepared ahead when num_workers > 0.
    config: supplies max_boxes, bucket_multiple and the bucket cap.
    keep_masks: False drops the records' masks (see the module docstring).
    cache_records: keep the records read in memory (see the module docstring).
    """

    def __init__(self, dataset, batch_size: int, transform: Optional[Callable] = None, seed: int = 0,
                 shuffle: bool = True, num_workers: int = 0, drop_remainder: bool = True,
                 shard_index: int = 0, num_shards: int = 1, *, config: DataConfig = DataConfig(),
                 prefetch: int = 2, keep_masks: bool = True, cache_records: bool = False):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.transform = transform or (lambda record, rng: finalize(record))
        self.num_workers, self.prefetch, self.drop_remainder = num_workers, prefetch, drop_remainder
        self.shard_index, self.num_shards = shard_index, num_shards
        self.config, self.max_boxes, self.bucket_multiple = config, config.max_boxes, config.bucket_multiple
        if config.box_bucket is not None and (num_shards > 1 or config.box_bucket < 1):
            raise ValueError(f"box_bucket={config.box_bucket}: needs a positive multiple and one host "
                             f"(this loader is shard {shard_index} of {num_shards}; hosts must agree on shapes)")
        self.max_side = max(config.max_size, config.train_max_size)
        n = len(dataset)
        per_shard = n // num_shards if drop_remainder else -(-n // num_shards)
        self.steps_per_epoch = per_shard // batch_size if drop_remainder else -(-per_shard // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} items in {num_shards} shards make no batch of {batch_size}")
        self.num_skipped = 0
        self._lock = threading.Lock()
        self._warned_max_boxes = False
        self._with_masks: Optional[bool] = None  # whether the samples carry masks (None: not known yet)
        self._order_cache: Dict[int, np.ndarray] = {}
        self.keep_masks, self.cache_records = keep_masks, cache_records
        self._records: Dict[int, Sample] = {}   # index -> record (cache_records)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def position(self, step: int) -> Tuple[int, int]:
        """Global step -> (epoch, batch index within the epoch)."""
        return divmod(step, self.steps_per_epoch)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Dataset indices this shard visits in `epoch`, in order (uncut by batches)."""
        if epoch not in self._order_cache:
            n = len(self.dataset)
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
            mine = order[self.shard_index::self.num_shards]
            if self.drop_remainder:
                mine = mine[:n // self.num_shards]
            self._order_cache = {epoch: mine}
        return self._order_cache[epoch]

    def batch_indices(self, step: int) -> List[Optional[int]]:
        """Dataset indices of global step `step`; None marks the filler rows of a short last batch."""
        epoch, pos = self.position(step)
        chosen = self.epoch_indices(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()
        return chosen + [None] * (self.batch_size - len(chosen))

    def record(self, index: int) -> Sample:
        """Item `index` of the dataset as the transform receives it: without masks unless
        `keep_masks`, from memory when cached.  Raises the dataset's `BadSampleError`."""
        cached = self._records.get(index)
        if cached is not None:
            return cached
        record = self.dataset[index]
        if not self.keep_masks:
            record = {k: v for k, v in record.items() if k != "masks"}
        if self.cache_records:
            record = read_only(record)
            self._records[index] = record   # one dict store: atomic under the GIL
        return record

    def _sample(self, epoch: int, index: Optional[int]) -> Optional[Sample]:
        if index is None:
            return None
        try:
            record = self.record(index)
        except BadSampleError as e:
            log.warning("skipping item %d: %s", index, e)
            with self._lock:
                self.num_skipped += 1
            return None
        return self.transform(record, np.random.default_rng([self.seed, 1, epoch, index]))

    def _samples_carry_masks(self) -> bool:
        """Whether the samples carry masks: as the last good batch's, else read from the first
        readable record as `record` gives it (once; a first batch of unreadable rows still has
        every key)."""
        if self._with_masks is None:
            self._with_masks = False
            for index in range(len(self.dataset)):
                try:
                    self._with_masks = "masks" in self.record(index)
                    break
                except BadSampleError:
                    continue
        return self._with_masks

    def _collate(self, samples: List[Optional[Sample]]) -> Dict[str, np.ndarray]:
        good = [s for s in samples if s is not None]
        if good:
            self._with_masks = all("masks" in s for s in good)
        else:  # every row unreadable: one blank image without targets, same keys as the others
            m = self.bucket_multiple
            good = [{"image": np.zeros((m, m, 3), np.float32), "labels": np.zeros(0, np.int32),
                     "boxes": np.zeros((0, 4), np.float32), "area": np.zeros(0, np.float32),
                     "image_id": -1, "orig_size": (m, m), "image_size": (m, m)}]
            if self._samples_carry_masks():
                good[0]["masks"] = np.zeros((0, m, m), bool)
        valid = [s is not None for s in samples]
        filled = [s if s is not None else good[i % len(good)] for i, s in enumerate(samples)]
        if not self._warned_max_boxes and any(len(s["labels"]) > self.max_boxes for s in good):
            log.warning("an image has more than max_boxes=%d targets: keeping the largest by area "
                        "(warned once)", self.max_boxes)
            self._warned_max_boxes = True
        slots = target_slots(max(len(s["labels"]) for s in filled), self.config)
        return collate(filled, slots, self.bucket_multiple, self.max_side, valid)

    def iterate(self, start_step: int = 0,
                num_steps: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
        """Batches from global step `start_step` on, across epochs (forever if num_steps is None)."""
        end = None if num_steps is None else start_step + num_steps
        steps = range(start_step, end) if end is not None else itertools.count(start_step)
        if self.num_workers == 0:
            for step in steps:
                epoch = self.position(step)[0]
                yield self._collate([self._sample(epoch, i) for i in self.batch_indices(step)])
            return
        pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="detr-data")
        pending: collections.deque = collections.deque()
        try:
            for step in steps:
                epoch = self.position(step)[0]
                pending.append([pool.submit(self._sample, epoch, i) for i in self.batch_indices(step)])
                if len(pending) > self.prefetch:
                    yield self._collate([f.result() for f in pending.popleft()])
            while pending:
                yield self._collate([f.result() for f in pending.popleft()])
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def epoch(self, epoch: int) -> Iterator[Dict[str, np.ndarray]]:
        """The batches of one epoch."""
        return self.iterate(epoch * self.steps_per_epoch, self.steps_per_epoch)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return self.epoch(0)
