"""The bench's PyTorch DETR (bench/torch_detr.py) computes what the original computed.

`bench/compare_torch.py` times detr-jax against this model, so it must be the original's
arithmetic: with the recipe weights loaded strictly in the original key layout it reproduces the
fixtures (single image and padded batch) within the fidelity tolerances (1e-4 abs, per-row
relative 1e-4 for logits).  Same arithmetic as the original, so in practice the difference is 0.
"""
import pathlib
import sys

import numpy as np
import pytest

from conftest import reference_arrays

torch = pytest.importorskip("torch", reason="the PyTorch reference model needs torch (pip install -e '.[dev]')")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import torch_detr  # noqa: E402

from test_fidelity import assert_close  # noqa: E402  (the fidelity tests' tolerance rule)

OUTPUT_KEYS = ["input", "pixel_mask", "pred_logits", "pred_boxes", "pred_masks", "aux_pred_logits", "aux_pred_boxes"]


def detection_keys(recipe_keys, blocks_layer3=6):
    """The detection-only checkpoint's keys: the recipe's `detr.*` without the prefix, with
    layer3 blocks 0..blocks_layer3-1 (6 for R50, 23 for R101)."""
    keys = {k[len("detr."):] for k in recipe_keys if k.startswith("detr.")}
    block1 = sorted(k for k in keys if k.startswith("backbone.0.body.layer3.1."))
    for b in range(6, blocks_layer3):
        keys |= {k.replace("layer3.1.", f"layer3.{b}.") for k in block1}
    return keys


@pytest.fixture(scope="module")
def panoptic_model(recipe_state_dict):
    model = torch_detr.build_detr("resnet50", dilation=True, masks=True, num_classes=250).eval()
    return torch_detr.load_state_dict(model, recipe_state_dict)


def run(model, ref):
    with torch.no_grad():
        out = model(torch.from_numpy(ref["input"]), torch.from_numpy(ref["pixel_mask"]))
    return {"pred_logits": out["pred_logits"].numpy(), "pred_boxes": out["pred_boxes"].numpy(),
            "pred_masks": out["pred_masks"].numpy(),
            "aux_pred_logits": np.stack([a["pred_logits"].numpy() for a in out["aux_outputs"]]),
            "aux_pred_boxes": np.stack([a["pred_boxes"].numpy() for a in out["aux_outputs"]])}


def assert_matches_fixture(out, ref):
    for key in ("pred_logits", "aux_pred_logits"):
        assert_close(out[key], ref[key], key, per_row=True)
    for key in ("pred_boxes", "pred_masks", "aux_pred_boxes"):
        assert_close(out[key], ref[key], key)


def test_state_dict_keys_are_the_originals(recipe_state_dict):
    panoptic = torch_detr.build_detr("resnet50", dilation=True, masks=True, num_classes=250)
    assert set(panoptic.state_dict()) == set(recipe_state_dict)
    assert {k: tuple(v.shape) for k, v in panoptic.state_dict().items()} == \
        {k: v.shape for k, v in recipe_state_dict.items()}
    assert set(torch_detr.build_detr("resnet50").state_dict()) == detection_keys(recipe_state_dict)
    assert set(torch_detr.build_detr("resnet101", dilation=True).state_dict()) == \
        detection_keys(recipe_state_dict, blocks_layer3=23)


@pytest.mark.slow
def test_single_image_reproduces_the_original(panoptic_model):
    ref = reference_arrays("forward_single.npz", OUTPUT_KEYS)
    out = run(panoptic_model, ref)
    assert out["pred_masks"].shape == (1, 100, 80, 121)
    assert_matches_fixture(out, ref)


@pytest.mark.slow
def test_padded_batch_reproduces_the_original(panoptic_model):
    ref = reference_arrays("forward_batch.npz", OUTPUT_KEYS)
    assert ref["pixel_mask"].any(), "the batch fixture should contain padding"
    assert_matches_fixture(run(panoptic_model, ref), ref)


POST_CASES = [("single", "forward_single.npz"), ("synthetic", "postprocess_synthetic.npz"), ("batch", "forward_batch.npz")]


@pytest.mark.parametrize("case,source", POST_CASES, ids=[c for c, _ in POST_CASES])
def test_panoptic_postprocessing_is_the_originals(case, source):
    """The torch PostProcessPanoptic that compare_torch times gives the original's PNGs and segments."""
    import io
    import json

    from PIL import Image

    from conftest import reference_path
    from detr_jax.panoptic_format import rgb_to_id

    x = reference_arrays(source, ["pred_logits", "pred_masks", "image_sizes", "orig_sizes"])
    with np.load(reference_path(f"postprocess_{case}.npz")) as data:
        ref = {k: data[k] for k in data.files}
    summary = json.loads(reference_path("summary.json").read_text())["postprocess"][case]
    results = torch_detr.postprocess_panoptic(torch.from_numpy(x["pred_logits"]), torch.from_numpy(x["pred_masks"]),
                                              x["image_sizes"], x["orig_sizes"], {i: i <= 90 for i in range(201)})
    assert len(results) == len(x["pred_logits"])
    for i, result in enumerate(results):
        ids = rgb_to_id(np.asarray(Image.open(io.BytesIO(result["png_string"])).convert("RGB")))
        np.testing.assert_array_equal(ids, ref[f"panoptic_ids_{i}"])
        assert result["segments_info"] == summary["images"][i]["segments_info"]
