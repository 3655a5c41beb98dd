"""The loader: static padded shapes, determinism, exact resume, disjoint shards, bad data survived."""
import logging

import numpy as np
import pytest

from detr_jax.config import DataConfig
from detr_jax.data import synthetic
from detr_jax.data.coco import BadSampleError, CocoPanoptic
from detr_jax.data.loader import Loader, collate
from detr_jax.data.transforms import TrainTransform, finalize

CFG = DataConfig(short_side=48, max_size=80, train_scales=(32, 40, 48), train_max_size=80,
                 crop_resize_scales=(40, 48), crop_min_size=24, crop_max_size=40, max_boxes=4,
                 bucket_multiple=16)


class ToyDataset:
    """Records of varied sizes and object counts; `bad` indices raise; counts reads."""

    def __init__(self, n=23, bad=(), with_masks=True):
        self.n, self.bad, self.with_masks, self.reads = n, set(bad), with_masks, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(i)
        if i in self.bad:
            raise BadSampleError(f"item {i} is corrupt")
        rng = np.random.default_rng(i)
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        k = i % 7
        x0, y0 = rng.uniform(0, w / 2, k), rng.uniform(0, h / 2, k)
        boxes = np.stack([x0, y0, x0 + rng.uniform(2, w / 2, k), y0 + rng.uniform(2, h / 2, k)], 1)
        rec = {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "image_id": 1000 + i,
               "orig_size": np.array([h, w], np.int32), "boxes": boxes.astype(np.float32),
               "labels": np.arange(k, dtype=np.int32) + 1, "iscrowd": np.zeros(k, bool),
               "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32)}
        if self.with_masks:
            rec["masks"] = rng.random((k, h, w)) < 0.3
        return rec


def make(dataset=None, **kw):
    args = dict(batch_size=4, transform=TrainTransform(CFG), seed=0, config=CFG)
    args.update(kw)
    return Loader(dataset if dataset is not None else ToyDataset(), **args)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_shapes_padding_and_valid():
    loader = make(transform=None)
    batch = next(iter(loader))
    b, m = 4, CFG.max_boxes
    h, w = batch["pixel_values"].shape[1:3]
    assert h % 16 == 0 and w % 16 == 0
    assert batch["pixel_values"].dtype == np.float32 and batch["pixel_mask"].shape == (b, h, w)
    assert batch["labels"].shape == (b, m) and batch["labels"].dtype == np.int32
    assert batch["boxes"].shape == (b, m, 4) and batch["valid"].shape == (b, m)
    assert batch["masks"].shape == (b, m, h, w) and batch["masks"].dtype == bool
    assert batch["image_id"].shape == (b,) and batch["orig_size"].shape == batch["image_size"].shape == (b, 2)
    for i, index in enumerate(loader.batch_indices(0)):
        rec = finalize(ToyDataset()[index])
        ih, iw = rec["image_size"]
        assert batch["pixel_mask"][i].sum() == ih * iw and batch["pixel_mask"][i, :ih, :iw].all()
        np.testing.assert_array_equal(batch["pixel_values"][i, :ih, :iw], rec["image"])
        k = min(len(rec["labels"]), m)
        assert batch["valid"][i].sum() == k and not batch["masks"][i, k:].any()
        assert not batch["masks"][i, :, ih:].any() and not batch["masks"][i, :, :, iw:].any()
        assert batch["image_id"][i] == 1000 + index


def test_more_than_max_boxes_keeps_the_largest_by_area_and_warns_once(caplog):
    rec = finalize(ToyDataset()[6])                       # 6 objects > max_boxes = 4
    with caplog.at_level(logging.WARNING):
        batch = collate([rec], max_boxes=4, bucket_multiple=16)
    largest = np.sort(np.argsort(-rec["area"])[:4])
    np.testing.assert_array_equal(batch["labels"][0], rec["labels"][largest])
    loader = make(shuffle=False)
    with caplog.at_level(logging.WARNING):
        list(loader.iterate(0, 3))
    assert caplog.text.count("more than max_boxes") == 1


def test_box_bucket_pads_targets_to_the_batch_count_rounded_up():
    """Counts are i % 7 (0..6); max_boxes 6: M is the batch's largest count rounded up to 2, capped."""
    config = DataConfig(**{**CFG.__dict__, "max_boxes": 6, "box_bucket": 2})
    loader = make(config=config, shuffle=False, transform=None, batch_size=2)
    seen = set()
    for step, batch in enumerate(loader.iterate(0, 11)):
        counts = [i % 7 for i in loader.batch_indices(step)]
        expected = min(6, max(1, -(-max(counts) // 2)) * 2)
        assert batch["labels"].shape == (2, expected) and batch["masks"].shape[1] == expected
        assert list(batch["valid"].sum(1)) == counts
        seen.add(expected)
    assert seen == {2, 4, 6}
    with pytest.raises(ValueError, match="one host"):
        make(config=config, shard_index=0, num_shards=2)


def test_same_seed_same_batches_whatever_the_worker_count():
    serial = list(make(num_workers=0).iterate(0, 8))       # crosses an epoch boundary (5 steps)
    assert_same_batches(serial, list(make(num_workers=3).iterate(0, 8)))
    assert_same_batches(serial, list(make(num_workers=2, prefetch=1).iterate(0, 8)))
    other = next(make(seed=1).iterate(0, 1))
    assert not np.array_equal(other["image_id"], serial[0]["image_id"])


def test_epochs_are_distinct_permutations():
    loader = make(drop_remainder=False)
    first, second = loader.epoch_indices(0), loader.epoch_indices(1)
    assert sorted(first) == sorted(second) == list(range(23)) and list(first) != list(second)
    assert list(make(shuffle=False).epoch_indices(3)) == list(range(23))


@pytest.mark.parametrize("k", [1, 5, 6])
def test_resume_equals_the_uninterrupted_run_without_reading_skipped_items(k):
    full = list(make(num_workers=2).iterate(0, 9))
    dataset = ToyDataset()
    resumed = list(make(dataset, num_workers=2).iterate(start_step=k, num_steps=9 - k))
    assert_same_batches(full[k:], resumed)
    loader = make()
    assert sorted(set(dataset.reads)) == sorted({i for s in range(k, 9) for i in loader.batch_indices(s)})


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_shards_are_disjoint_and_cover_the_epoch(drop_remainder):
    shards = [make(shard_index=s, num_shards=3, drop_remainder=drop_remainder, transform=None)
              for s in range(3)]
    assert len({len(loader) for loader in shards}) == 1    # every host runs the same number of steps
    seen = []
    for loader in shards:
        for batch in loader.epoch(0):
            seen.append(batch["image_id"][batch["sample_valid"]] - 1000)
    seen = np.concatenate(seen)
    assert len(seen) == len(set(seen))
    if drop_remainder:   # 23 // 3 = 7 items per shard, one full batch of 4 each
        assert len(seen) == 3 * len(shards[0]) * 4 == 12
    else:                # every item once; short batches completed with filler rows
        assert sorted(seen) == list(range(23))


def test_short_last_batch_is_completed_with_filler_rows():
    loader = make(drop_remainder=False, shuffle=False)
    assert len(loader) == 6
    last = list(loader.epoch(0))[-1]
    np.testing.assert_array_equal(last["sample_valid"], [True, True, True, False])
    np.testing.assert_array_equal(last["image_id"], [1020, 1021, 1022, -1])
    assert last["pixel_values"].shape[0] == 4


def test_bucketing_gives_few_shapes():
    loader = make(dataset=ToyDataset(n=64), batch_size=2, drop_remainder=True)
    shapes = {b["pixel_values"].shape[1:3] for b in loader.iterate(0, 64)}
    assert all(h % 16 == 0 and w % 16 == 0 or max(h, w) == 80 for h, w in shapes)
    assert len(shapes) <= 12


def test_bad_items_are_skipped_with_a_warning_and_shapes_stay_static(caplog):
    dataset = ToyDataset(bad={0, 1, 2, 3, 5})
    loader = make(dataset, shuffle=False, num_workers=2)
    with caplog.at_level(logging.WARNING):
        batches = list(loader.epoch(0))     # the first batch is all bad: it still carries masks
    assert "item 5 is corrupt" in caplog.text and loader.num_skipped == 5
    assert "masks" in batches[0] and batches[0]["masks"].shape[:2] == batches[0]["labels"].shape
    assert all(b["pixel_values"].shape[0] == 4 and b.keys() == batches[1].keys() for b in batches)
    assert not batches[0]["sample_valid"].any() and not batches[0]["valid"].any()   # all four bad
    np.testing.assert_array_equal(batches[1]["sample_valid"], [True, False, True, True])
    np.testing.assert_array_equal(batches[1]["image_id"], [1004, -1, 1006, 1007])


def test_synthetic_panoptic_end_to_end(tmp_path):
    root = synthetic.generate(tmp_path, num_train=5, num_val=1, image_size=(48, 64), seed=2)
    loader = Loader(CocoPanoptic(root, "train2017"), batch_size=2, transform=TrainTransform(CFG),
                    seed=0, num_workers=2, config=CFG)
    for batch in loader.epoch(0):
        b, h, w = batch["pixel_mask"].shape
        assert batch["masks"].shape == (2, CFG.max_boxes, h, w)
        assert (batch["boxes"][batch["valid"]] > 0).all() and (batch["boxes"][batch["valid"]] <= 1).all()
        assert set(batch["labels"][batch["valid"]]) <= set(range(1, 7))


def test_cached_records_are_read_once_and_give_the_same_batches():
    uncached = list(make(num_workers=2).iterate(0, 12))     # 5 steps an epoch: three epochs
    dataset = ToyDataset(bad={3})
    cached = make(dataset, num_workers=2, cache_records=True)
    batches = list(cached.iterate(0, 12))
    good_reads = [i for i in dataset.reads if i != 3]
    assert len(good_reads) == len(set(good_reads)) > 19     # 20 of the 23 drawn an epoch, each read once
    assert dataset.reads.count(3) == cached.num_skipped >= 2   # a bad item is not cached: skipped every epoch
    clean = list(make(num_workers=2, cache_records=True).iterate(0, 12))
    assert_same_batches(uncached, clean)
    assert not np.array_equal(batches[0]["image_id"], batches[5]["image_id"])   # epochs still reshuffle


def test_cached_records_are_read_only():
    loader = make(cache_records=True)
    record = loader.record(4)
    with pytest.raises(ValueError, match="read-only"):
        record["image"][0, 0, 0] = 0
    assert loader.record(4) is record
    assert make().record(4)["image"].flags.writeable          # uncached records are the dataset's own


def test_records_lose_their_masks_when_the_stage_uses_none():
    with_masks = list(make(num_workers=2).iterate(0, 6))
    without = list(make(num_workers=2, keep_masks=False).iterate(0, 6))
    for a, b in zip(with_masks, without):
        assert "masks" in a and "masks" not in b
        assert_same_batches([{k: v for k, v in a.items() if k != "masks"}], [b])
    all_bad = list(make(ToyDataset(bad={0, 1, 2, 3}), shuffle=False, keep_masks=False).iterate(0, 2))
    assert all(b.keys() == without[0].keys() for b in all_bad)   # an all-bad batch has no masks either


def test_make_loader_keeps_masks_only_for_a_stage_with_mask_losses():
    from detr_jax.demo import demo_stages
    from detr_jax.train import make_loader

    (_, detection), (_, masks) = demo_stages()
    assert not make_loader(ToyDataset(), detection).keep_masks and make_loader(ToyDataset(), detection).cache_records
    assert make_loader(ToyDataset(), masks).keep_masks and not make_loader(ToyDataset(), masks).cache_records
