"""Checkpoint loading: published layouts, the V1/V2 vision-weight rule, dtypes and every failure's message."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import CHECKPOINTS
from mobilevlm_ros.model import CheckpointError, MobileVLMPipeline, load_model

V1, V2, CLIP = CHECKPOINTS / "MobileVLM-tiny-v1", CHECKPOINTS / "MobileVLM_V2-tiny", \
    CHECKPOINTS / "tiny-clip-vit-patch14-336"
EMBEDDED = "model.vision_tower.vision_tower.vision_model."


def copy_checkpoint(src: Path, dst_parent: Path, with_clip: bool = True) -> Path:
    dst = dst_parent / src.name
    shutil.copytree(src, dst)
    if with_clip:
        shutil.copytree(CLIP, dst_parent / CLIP.name)
    return dst


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "pytorch_model.bin", weights_only=True)


def rewrite_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_v1_takes_vision_weights_from_clip_dir_and_v2_from_checkpoint():
    clip = torch.load(CLIP / "pytorch_model.bin", weights_only=True)
    for ckpt, source in ((V1, "clip"), (V2, "embedded")):
        model, _ = load_model(ckpt)
        embedded = state_of(ckpt)
        for name, tensor in model.vision_tower.state_dict().items():
            want = clip["vision_model." + name] if source == "clip" else embedded[EMBEDDED + name]
            assert torch.equal(tensor, want), (ckpt.name, name)


def test_only_selected_vision_layers_are_built():
    model, _ = load_model(V2)
    # 3 layers, select_layer -2: hidden_states[2] is the output of layer index 1, so layer 2 is never built.
    assert len(model.vision_tower.encoder.layers) == 2
    assert not any("post_layernorm" in k for k in model.state_dict())


def test_vision_tower_resolution_cwd_and_override(tmp_path, monkeypatch):
    ckpt = copy_checkpoint(V1, tmp_path / "models", with_clip=False)
    with pytest.raises(CheckpointError, match="vision tower directory 'tiny-clip-vit-patch14-336' not found"):
        load_model(ckpt)
    reference, _ = load_model(V1)
    # Relative to the working directory, as the reference resolves it.
    monkeypatch.chdir(CHECKPOINTS)
    assert_same_params(load_model(ckpt)[0], reference)
    monkeypatch.chdir(tmp_path)
    assert_same_params(load_model(ckpt, vision_tower=CLIP)[0], reference)
    with pytest.raises(CheckpointError, match="override has no config.json"):
        load_model(ckpt, vision_tower=tmp_path)


def test_home_and_environment_variables_in_paths_are_expanded(tmp_path, monkeypatch):
    """MobileVLMPipeline.load's model_dir and vision_tower (and load_model's) may say `~` and `$VARS`: HOME is a
    temp directory holding a link to a V1 checkpoint (without its CLIP directory next to it), the CLIP directory
    is named by an environment variable."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / V1.name).symlink_to(V1, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MOBILEVLM_TEST_CLIP", str(CLIP))
    reference, _ = load_model(V1)
    ckpt, clip = f"~/models/{V1.name}", "$MOBILEVLM_TEST_CLIP"
    assert_same_params(load_model(ckpt, vision_tower=clip)[0], reference)
    vlm = MobileVLMPipeline.load(ckpt, clip, onednn=False)  # plain layers: their weights compare as tensors
    assert_same_params(vlm.model, reference)
    with pytest.raises(CheckpointError, match=f"{home}/absent: model directory not found"):
        load_model("~/absent")


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin-sharded"])
def test_weight_layouts_load_identically(tmp_path, layout):
    ckpt = copy_checkpoint(V2, tmp_path)
    state = state_of(ckpt)
    os.remove(ckpt / "pytorch_model.bin")
    keys = sorted(state)
    halves = {"part-00001": keys[: len(keys) // 2], "part-00002": keys[len(keys) // 2:]}
    if layout == "safetensors":
        save_file(state, ckpt / "model.safetensors")
    else:
        ext = "safetensors" if layout.startswith("safetensors") else "bin"
        weight_map = {}
        for part, part_keys in halves.items():
            name = f"model-{part}-of-00002.{ext}"
            shard = {k: state[k] for k in part_keys}
            save_file(shard, ckpt / name) if ext == "safetensors" else torch.save(shard, ckpt / name)
            weight_map.update(dict.fromkeys(part_keys, name))
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (ckpt / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_params(load_model(ckpt)[0], load_model(V2)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(dtype):
    model, _ = load_model(V2, dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype])
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_missing_weights_file(tmp_path):
    ckpt = copy_checkpoint(V2, tmp_path)
    os.remove(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"MobileVLM_V2-tiny: no weights found \(looked for model.safetensors"):
        load_model(ckpt)


def test_missing_directory_config_and_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_model(tmp_path / "nope")
    ckpt = copy_checkpoint(V2, tmp_path)
    os.remove(ckpt / "tokenizer.model")
    with pytest.raises(CheckpointError, match=r"tokenizer.model: tokenizer model not found"):
        load_model(ckpt)
    os.remove(ckpt / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json: file not found"):
        load_model(ckpt)


def test_missing_shard(tmp_path):
    ckpt = copy_checkpoint(V2, tmp_path)
    state = state_of(ckpt)
    os.remove(ckpt / "pytorch_model.bin")
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(state, "a.bin")}))
    with pytest.raises(CheckpointError, match=r"a.bin: shard listed in pytorch_model.bin.index.json is missing"):
        load_model(ckpt)


@pytest.mark.parametrize("field,value,message", [
    ("mm_projector_type", "resampler", "unknown mm_projector_type 'resampler'"),
    ("vision_tower_type", "siglip", "unknown vision_tower_type 'siglip'"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end=true is not supported"),
    ("hidden_size", "big", "field 'hidden_size' must be int"),
    ("num_hidden_layers", None, "required field 'num_hidden_layers' is missing"),
])
def test_bad_config_fields(tmp_path, field, value, message):
    ckpt = copy_checkpoint(V2, tmp_path)
    rewrite_config(ckpt, **{field: value})
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(ckpt)
    assert err.value.path.endswith("config.json")


def test_missing_im_patch_token_field_expects_extra_embedding_row(tmp_path):
    """The reference adds <im_patch> when the field is absent; a 1000-row checkpoint is then refused loudly."""
    ckpt = copy_checkpoint(V2, tmp_path)
    rewrite_config(ckpt, mm_use_im_patch_token=None)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model.embed_tokens.weight': checkpoint "
                                              r"\[1000, 96\], model expects \[1001, 96\].*mm_use_im_patch_token"):
        load_model(ckpt)


def test_missing_projector_type_means_linear(tmp_path):
    ckpt = copy_checkpoint(V1, tmp_path)
    rewrite_config(ckpt, mm_projector_type=None)
    with pytest.raises(CheckpointError, match=r"unexpected key 'model.mm_projector.model.mlp.1.weight' "
                                              r"for a linear MobileVLM"):
        load_model(ckpt)


@pytest.mark.parametrize("change,message", [
    ("drop", r"missing keys: llm.layers.1.mlp.down_proj.weight"),
    ("extra", r"pytorch_model.bin: unexpected key 'model.extra_head.weight'"),
    ("shape", r"pytorch_model.bin: shape mismatch for 'model.norm.weight': checkpoint \[95\], model expects \[96\]"),
])
def test_key_and_shape_problems(tmp_path, change, message):
    ckpt = copy_checkpoint(V2, tmp_path)
    state = state_of(ckpt)
    if change == "drop":
        del state["model.layers.1.mlp.down_proj.weight"]
    elif change == "extra":
        state["model.extra_head.weight"] = torch.zeros(2, 2)
    else:
        state["model.norm.weight"] = torch.ones(95)
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_truncated_weights(tmp_path, name):
    ckpt = copy_checkpoint(V2, tmp_path)
    if name == "model.safetensors":
        save_file(state_of(ckpt), ckpt / name)
        os.remove(ckpt / "pytorch_model.bin")
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: cannot be read \(truncated or corrupt\?\)"):
        load_model(ckpt)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_never_executed(tmp_path):
    ckpt = copy_checkpoint(V2, tmp_path)
    state = state_of(ckpt)
    state["model.norm.weight"] = _Payload()
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: cannot be read.*(Unsupported global|weights_only)"):
        load_model(ckpt)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        MobileVLMPipeline.load(V2, device="cuda")
