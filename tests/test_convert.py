"""The converter: every layout and variant of the released checkpoints, and loud failures."""
import json
import pickle
import re
import sys

import jax
import numpy as np
import pytest

import detr_jax
from detr_jax import convert, runtime
from detr_jax.config import ModelConfig

torch = pytest.importorskip("torch", reason="the converter tests write .pth files (pip install -e '.[dev]')")


def hf_layout(state_dict, panoptic=True):
    """The recipe renamed into the Hugging Face hub layout (DetrForSegmentation / ForObjectDetection),
    written from the layout's own key names, independently of the converter's rename table."""
    prefix = "detr.model." if panoptic else "model."
    head = "detr." if panoptic else ""
    layer_names = {"encoder": {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"},
                   "decoder": {"norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm",
                               "norm3": "final_layer_norm"}}
    out = {}
    for key, value in state_dict.items():
        key = key[len("detr."):] if key.startswith("detr.") else key
        if key.startswith(("bbox_attention.", "mask_head.")):
            out[key] = value
            continue
        m = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            part, i, module, rest = m.groups()
            base = f"{prefix}{part}.layers.{i}."
            attn = {"self_attn": "self_attn", "multihead_attn": "encoder_attn"}.get(module)
            if attn and rest.startswith("in_proj_"):
                for name, piece in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3)):
                    out[f"{base}{attn}.{name}.{rest[len('in_proj_'):]}"] = piece
            elif attn:
                out[f"{base}{attn}.{rest}"] = value
            else:
                module = {"linear1": "fc1", "linear2": "fc2"}.get(module, layer_names[part].get(module, module))
                out[f"{base}{module}.{rest}"] = value
            continue
        key = (key.replace("backbone.0.body.", f"{prefix}backbone.conv_encoder.model.")
                  .replace("transformer.decoder.norm.", f"{prefix}decoder.layernorm.")
                  .replace("input_proj.", f"{prefix}input_projection.")
                  .replace("query_embed.", f"{prefix}query_position_embeddings.")
                  .replace("class_embed.", f"{head}class_labels_classifier.")
                  .replace("bbox_embed.", f"{head}bbox_predictor."))
        out[key] = value
    return out


def detection_variant(state_dict, num_classes=91, resnet101=False, seed=0):
    """The recipe reshaped into a detection-only (optionally R101) original checkpoint."""
    rng = np.random.default_rng(seed)
    sd = {k[len("detr."):]: v for k, v in state_dict.items() if k.startswith("detr.")}
    sd["class_embed.weight"] = rng.standard_normal((num_classes + 1, 256)).astype(np.float32) * 0.05
    sd["class_embed.bias"] = np.zeros(num_classes + 1, np.float32)
    if resnet101:
        block = {k[len("backbone.0.body.layer3.1."):]: v for k, v in sd.items()
                 if k.startswith("backbone.0.body.layer3.1.")}
        for b in range(6, 23):
            for name, v in block.items():
                sd[f"backbone.0.body.layer3.{b}.{name}"] = v.copy()
    return sd


def save_pth(sd, path):
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, path)
    return path


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def test_release_file_is_detected_and_converted(converted_dir):
    meta = json.loads((converted_dir / "config.json").read_text())
    assert meta["model"] == ModelConfig(backbone="resnet50", dilation=True, num_classes=250, masks=True).to_dict()


def test_every_recipe_tensor_lands_in_the_model_transposed(recipe_state_dict, reference_model):
    """Spot checks of the rename table and the transposes against the source tensors."""
    v = reference_model.variables
    sd = recipe_state_dict
    np.testing.assert_array_equal(v["params"]["backbone"]["conv1"]["kernel"],
                                  sd["detr.backbone.0.body.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["buffers"]["backbone"]["layer2_0"]["downsample_1"]["running_var"],
                                  sd["detr.backbone.0.body.layer2.0.downsample.1.running_var"])
    attn = v["params"]["transformer"]["decoder"]["layers_3"]["multihead_attn"]
    w = sd["detr.transformer.decoder.layers.3.multihead_attn.in_proj_weight"]
    np.testing.assert_array_equal(attn["k_proj"]["kernel"], w[256:512].T)
    np.testing.assert_array_equal(v["params"]["mask_head"]["gn2"]["scale"], sd["mask_head.gn2.weight"])
    np.testing.assert_array_equal(v["params"]["query_embed"]["embedding"], sd["detr.query_embed.weight"])
    n_values = sum(x.size for x in jax.tree_util.tree_leaves(v))
    assert n_values == sum(x.size for x in sd.values()) == 43_005_528


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_layout_gives_identical_variables_and_outputs(recipe_state_dict, reference_model, tmp_path,
                                                                  weights_file):
    hub = tmp_path / "detr-resnet-50-dc5-panoptic"
    hub.mkdir()
    sd = hf_layout(recipe_state_dict)
    if weights_file.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, hub / weights_file)
    else:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, hub / weights_file)
    (hub / "config.json").write_text(json.dumps({"model_type": "detr", "backbone": "resnet50", "dilation": True,
                                                 "encoder_attention_heads": 8, "use_timm_backbone": True}))
    config = convert.convert(hub, tmp_path / "out")
    assert runtime.execution_config(config, reference_model.policy) == reference_model.config
    model = detr_jax.load(tmp_path / "out")
    assert leaves_equal(model.variables, reference_model.variables)
    x = np.random.default_rng(0).standard_normal((1, 64, 96, 3)).astype(np.float32)
    mask = np.ones((1, 64, 96), bool)
    a, b = model(x, mask), reference_model(x, mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_detection_only_variant_converts_and_runs(recipe_state_dict, tmp_path):
    src = save_pth(detection_variant(recipe_state_dict), tmp_path / "detr-r50-e632da11.pth")
    config = convert.convert(src, tmp_path / "out")
    assert (config.backbone, config.dilation, config.masks, config.num_classes) == ("resnet50", False, False, 91)
    out = detr_jax.load(tmp_path / "out")(np.zeros((1, 64, 64, 3), np.float32), np.ones((1, 64, 64), bool))
    assert out["pred_logits"].shape == (1, 100, 92) and out["pred_boxes"].shape == (1, 100, 4)
    assert "pred_masks" not in out and len(out["aux_outputs"]) == 5


@pytest.mark.slow
def test_resnet101_dc5_variant_converts_and_runs(recipe_state_dict, tmp_path):
    src = save_pth(detection_variant(recipe_state_dict, resnet101=True), tmp_path / "detr-r101-dc5-a2e86def.pth")
    config = convert.convert(src, tmp_path / "out")
    assert (config.backbone, config.dilation, config.masks) == ("resnet101", True, False)
    model = detr_jax.load(tmp_path / "out")
    out = jax.eval_shape(model.module.apply, model.variables, np.zeros((2, 96, 128, 3), np.float32),
                         np.ones((2, 96, 128), bool))
    assert out["pred_logits"].shape == (2, 100, 92)
    out = model(np.zeros((1, 32, 32, 3), np.float32), np.ones((1, 32, 32), bool))
    assert np.isfinite(np.asarray(out["pred_boxes"])).all()


def test_mismatches_fail_listing_missing_unexpected_and_misshaped(recipe_state_dict):
    sd = dict(recipe_state_dict)
    del sd["detr.transformer.encoder.layers.2.linear1.bias"]
    sd["detr.extra_head.weight"] = np.zeros((3, 3), np.float32)
    sd["detr.query_embed.weight"] = np.zeros((50, 256), np.float32)
    config = ModelConfig(backbone="resnet50", dilation=True, num_classes=250, masks=True)
    with pytest.raises(convert.ConversionError) as err:
        convert.convert_state_dict(sd, config)
    message = str(err.value)
    assert "missing (1): params/transformer/encoder/layers_2/linear1/bias" in message
    assert "unexpected (1): extra_head.weight" in message
    assert "query_embed.weight: checkpoint (50, 256) vs model (100, 256)" in message


def test_wrong_config_is_refused(recipe_pth, tmp_path):
    with pytest.raises(convert.ConversionError, match="missing|unexpected|mismatch"):
        convert.convert(recipe_pth, tmp_path / "out", ModelConfig(backbone="resnet101", num_classes=250, masks=True))


def test_pth_without_torch_names_the_extra(recipe_pth, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit, match=r"pip install 'detr-jax\[torch\]'"):
        convert.read_checkpoint(recipe_pth)


class Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['EXPLOIT_FLAG']).write_text('ran')",))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    flag = tmp_path / "flag"
    monkeypatch.setenv("EXPLOIT_FLAG", str(flag))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {"x": torch.zeros(1)}, "payload": Exploit()}, f, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(Exception):
        convert.read_checkpoint(path)
    assert not flag.exists()


def test_downloads_from_hub_and_release_url_are_cached(recipe_state_dict, recipe_pth, tmp_path, monkeypatch):
    """The network path, served from a local folder laid out like the hub (file:// URLs)."""
    from safetensors.numpy import save_file

    served = tmp_path / "served" / "facebook" / "detr-resnet-50-dc5-panoptic" / "resolve" / "main"
    served.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in hf_layout(recipe_state_dict).items()},
              served / "model.safetensors")
    (served / "config.json").write_text(json.dumps({"dilation": True}))
    monkeypatch.setenv("HF_ENDPOINT", (tmp_path / "served").as_uri())
    monkeypatch.setenv("DETR_JAX_CACHE", str(tmp_path / "cache"))
    folder = convert.fetch_from_hub("facebook/detr-resnet-50-dc5-panoptic")
    assert (folder / "model.safetensors").stat().st_size == (served / "model.safetensors").stat().st_size
    (served / "model.safetensors").unlink()                      # a second call uses the cache
    assert convert.fetch_from_hub("facebook/detr-resnet-50-dc5-panoptic") == folder
    assert convert.main(["--from-hub", "facebook/detr-resnet-50-dc5-panoptic", str(tmp_path / "hub_out")]) == 0
    release = convert.fetch_release(recipe_pth.as_uri())
    assert release.parent == tmp_path / "cache" / "releases" and release.read_bytes() == recipe_pth.read_bytes()


def test_cli_convert_subcommand(recipe_pth, tmp_path):
    from detr_jax.cli import main

    assert main(["convert", str(recipe_pth), str(tmp_path / "out"), "--config", "detr_r50_dc5_panoptic"]) == 0
    assert detr_jax.load(tmp_path / "out").config.dilation
