"""`bench/accelerator.py --smoke`: every case of the GPU/TPU comparison runs on this backend and
reports numbers, or says why it did not run; and Hugging Face's DETR built by `bench/hf_detr.py`
computes what `bench/torch_detr.py` computes on the same weights."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

FRAMEWORKS = ("jax", "torch", "torch_compile", "hf")
MUST_RUN = ("jax", "torch")           # the two sides of every ratio: never skipped


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("torch", reason="the PyTorch side needs torch")
    out = tmp_path_factory.mktemp("accelerator")
    proc = subprocess.run([sys.executable, str(BENCH / "accelerator.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"report": json.loads((out / "accelerator.json").read_text()), "markdown": (out / "accelerator.md").read_text(),
            "stdout": proc.stdout}


def reason(row):
    return row.get("skipped") or row.get("error") or ""


@pytest.mark.slow  # compiles 5 detr-jax programs and runs R50 in PyTorch: minutes on a busy 2-core CPU
def test_every_inference_case_reports_numbers_or_the_reason_it_did_not_run(smoke):
    rows = [r for r in smoke["report"]["rows"] if r["kind"] == "inference"]
    sizes = smoke["report"]["sizes"]
    for framework in FRAMEWORKS:
        for model in ("detection", "panoptic"):
            compiled = framework == "torch_compile"
            for dtype in sizes["compile_dtypes"] if compiled else sizes["dtypes"]:
                batches = sizes["compile_batches"] if compiled else sizes["batches"]
                for batch in batches:
                    case = [r for r in rows if (r["framework"], r["model"], r["dtype"], r["batch"]) ==
                            (framework, model, dtype, batch)]
                    assert len(case) == 1, (framework, model, dtype, batch)
                    row = case[0]
                    if framework in MUST_RUN or not reason(row):
                        assert not reason(row), (framework, model, dtype, batch, reason(row))
                        assert row["median_s"] > 0 and row["compile_s"] >= 0 and row["peak_memory_mb"] > 0, row
                        assert row["memory_kind"] in ("device", "RSS")
                    else:   # reported, with its reason, in the table too
                        assert len(reason(row)) > 10 and reason(row).split(":")[0] in smoke["markdown"]
    hf = [r for r in rows if r["framework"] == "hf"]
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("timm") is None:
        assert all("not importable" in r.get("skipped", "") for r in hf)
    jax_rows = [r for r in rows if r["framework"] == "jax"]
    assert all(r["gflops"] > 0 for r in jax_rows)      # XLA's count, which the fractions of peak use


@pytest.mark.slow  # shares the smoke run
def test_the_train_step_case_finds_a_batch_that_fits_on_both_sides(smoke):
    train = [r for r in smoke["report"]["rows"] if r["kind"] == "train"]
    for framework in ("jax", "torch"):
        fitted = [r for r in train if r["framework"] == framework and r.get("median_s")]
        assert len(fitted) == 1, train
        row = fitted[0]
        assert row["batch"] in smoke["report"]["sizes"]["train_batches"] and np.isfinite(row["loss"])
        assert row["peak_memory_mb"] > 0
    assert [r for r in train if r["framework"] == "jax" and r.get("median_s")][0]["gflops"] > 0


@pytest.mark.slow  # shares the smoke run
def test_the_matmul_peaks_and_the_environment_are_recorded(smoke):
    report = smoke["report"]
    peaks = {(r["framework"], r["dtype"]): r["tflops"] for r in report["rows"] if r["kind"] == "matmul"}
    assert set(peaks) == {(f, d) for f in ("jax", "torch") for d in ("float32", "bfloat16")}
    assert all(v > 0 for v in peaks.values())
    assert report["environment"]["jax_backend"] and "torch_matmul_allow_tf32" in report["environment"]
    assert "## Inference" in smoke["markdown"] and "## Train step" in smoke["markdown"]


def test_hugging_face_detr_from_the_original_keys_matches_the_original():
    pytest.importorskip("transformers", reason="Hugging Face's DETR needs transformers")
    pytest.importorskip("timm", reason="Hugging Face's DETR with a ResNet backbone needs timm")
    import torch

    import accelerator
    import hf_detr
    import torch_detr

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    padding = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding[1, :, 80:] = True
    for panoptic, classes in ((True, 250), (False, 91)):
        sd = accelerator.recipe_state_dict(panoptic)
        original = torch_detr.load_state_dict(
            torch_detr.build_detr("resnet50", dilation=panoptic, masks=panoptic, num_classes=classes).eval(), sd)
        hf = hf_detr.load_original(hf_detr.build_hf_detr(panoptic, classes), sd)
        with torch.no_grad():
            a, b = original(x, padding), hf(pixel_values=x, pixel_mask=(~padding).long())
        scale = a["pred_logits"].abs().amax(-1, keepdim=True)     # logits reach |100| by design
        assert ((a["pred_logits"] - b.logits).abs() / scale).max() < 1e-5
        assert (a["pred_boxes"] - b.pred_boxes).abs().max() < 1e-5
        if panoptic:
            assert (a["pred_masks"] - b.pred_masks).abs().max() < 1e-4


def test_a_wrong_key_layout_fails_loudly_naming_the_keys():
    pytest.importorskip("transformers", reason="Hugging Face's DETR needs transformers")
    pytest.importorskip("timm", reason="Hugging Face's DETR with a ResNet backbone needs timm")
    import accelerator
    import hf_detr

    sd = accelerator.recipe_state_dict(False)
    sd["class_embed.extra"] = sd.pop("class_embed.bias")
    with pytest.raises(KeyError, match="class_labels_classifier.bias"):
        hf_detr.load_original(hf_detr.build_hf_detr(False, 91), sd)


def test_the_key_mapping_splits_in_proj_into_q_k_v_and_renames_the_mask_head():
    import hf_detr

    w = np.arange(768 * 2, dtype=np.float32).reshape(768, 2)
    mapped = hf_detr.hf_state_dict({
        "detr.transformer.decoder.layers.3.multihead_attn.in_proj_weight": w,
        "detr.transformer.encoder.layers.0.norm2.bias": np.zeros(2),
        "detr.transformer.decoder.layers.0.norm2.bias": np.ones(2),
        "detr.backbone.0.body.layer4.2.conv2.weight": np.zeros(1),
        "mask_head.lay3.weight": np.zeros(1), "mask_head.adapter1.bias": np.zeros(1),
        "bbox_attention.k_linear.weight": np.zeros(1)})
    prefix = "detr.model.decoder.layers.3.encoder_attn."
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        np.testing.assert_array_equal(mapped[f"{prefix}{name}.weight"], w[256 * i:256 * (i + 1)])
    assert set(mapped) == {f"{prefix}{n}.weight" for n in ("q_proj", "k_proj", "v_proj")} | {
        "detr.model.encoder.layers.0.final_layer_norm.bias", "detr.model.decoder.layers.0.encoder_attn_layer_norm.bias",
        "detr.model.backbone.model.layer4.2.conv2.weight", "mask_head.fpn_stages.0.refine.conv.weight",
        "mask_head.fpn_stages.0.fpn_adapter.bias", "bbox_attention.k_proj.weight"}
