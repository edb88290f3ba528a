"""Linear layers on oneDNN (model/cpu_linear.py): the same function as nn.Linear, laid out by the pipeline wherever
oneDNN is available. The reference goldens (test_model_reference.py) run through such a pipeline, so they check it
end to end; these tests check the layer, that the layout really happens (also for the node's default load), and
that what reads plain layers (the ONNX export, the weights digest) gets them losslessly without changing the
model."""
from __future__ import annotations

import math
import platform

import pytest
import torch
from torch import nn

from conftest import CHECKPOINT_NAMES, CHECKPOINTS
from mobilevlm_ros.engines.visual import VisualEncoder, weights_digest
from mobilevlm_ros.model import MobileVLMPipeline
from mobilevlm_ros.model.cpu_linear import OneDNNLinear, available, plain_copy, use_onednn
from mobilevlm_ros.model.quantize import weight_bytes

needs_onednn = pytest.mark.skipif(not available(torch.float32), reason="oneDNN is used on x86 CPUs only")
# Decided by the machine alone, not by available(): a regression there must fail the node's test, not skip it.
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3,)])  # a decode step, a batched prompt, a 2-D input
def test_onednn_linear_is_nn_linear(dtype, atol, bias, shape):
    if not available(dtype):
        pytest.skip(f"no oneDNN {dtype} kernel here")
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias).to(dtype)
    x = torch.randn(*shape, 96).to(dtype)
    with torch.inference_mode():
        expected = nn.functional.linear(x.float(), linear.weight.float(), None if not bias else linear.bias.float())
        got = OneDNNLinear(linear, rows=math.prod(shape))(x)
    assert got.dtype == dtype and got.shape == (*shape, 80)
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=0.02 if dtype == torch.bfloat16 else 1e-5)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_releases_the_old_weights_and_the_plain_copy_is_lossless(dtype):
    if not available(dtype):
        pytest.skip(f"no oneDNN {dtype} kernel here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.SiLU(), nn.Linear(128, 32)).to(dtype)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    before = weight_bytes(model)
    originals = [model[0], model[2]]
    assert use_onednn(model, rows=7) == 2
    assert [type(m) for m in model] == [OneDNNLinear, nn.SiLU, OneDNNLinear]
    assert weight_bytes(model) == before
    assert all(m.weight is None for m in originals)
    copy = plain_copy(model)
    assert [type(m) for m in copy] == [nn.Linear, nn.SiLU, nn.Linear]
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in plain.items()) and len(plain) == 3
    assert [type(m) for m in model] == [OneDNNLinear, nn.SiLU, OneDNNLinear]  # the original is left as it was
    x = torch.randn(5, 64).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(model(x).float(), copy(x).float(), atol=1e-5 if dtype == torch.float32 else 0.03,
                                   rtol=1e-5 if dtype == torch.float32 else 0.02)


@needs_onednn
@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_pipeline_runs_on_onednn_and_can_opt_out(checkpoint):
    """Every float Linear of the loaded model is on oneDNN (the goldens then hold for these layers); reading the
    vision side for the ONNX export (VisualEncoder, its weights digest) sees the same plain weights as a model
    loaded without oneDNN (so the same cached engines) and leaves the layers as they are; onednn=False keeps
    torch's kernels."""
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint)
    linears = [m for m in vlm.model.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)
    plain = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, onednn=False)
    assert not any(isinstance(m, OneDNNLinear) for m in plain.model.modules())
    assert weights_digest(VisualEncoder.from_model(vlm.model)) == weights_digest(VisualEncoder.from_model(plain.model))
    assert [m for m in vlm.model.modules() if isinstance(m, (nn.Linear, OneDNNLinear))] == linears


@pytest.mark.skipif(not X86, reason="oneDNN is used on x86 CPUs only")
def test_the_nodes_default_load_runs_on_onednn(tmp_path):
    """loading.load_pipeline with every parameter at the node's default (params.py's table) but the model: on
    any x86 machine the vision tower, projector and decoder are on oneDNN, decode steps on the compiled CPU
    kernels (a C++ compiler is part of the test setup), and the vision encoder is the torch one over those
    layers. A regression that silently falls back to MKL or eager steps fails here."""
    from mobilevlm_ros.loading import load_pipeline
    from mobilevlm_ros.model import cpu_decode
    from mobilevlm_ros.params import BY_NAME, camera_parameters, read_config

    def node_default(name: str):
        if name == "model_path":
            return str(CHECKPOINTS / "MobileVLM_V2-tiny")
        if name in BY_NAME:
            return BY_NAME[name].default
        camera_id = name.split(".")[1]
        return next(p.default for p in camera_parameters(camera_id) if p.name == name)

    loaded = load_pipeline(read_config(node_default))
    vlm = loaded.pipeline
    assert loaded.vision.active == "torch" and not loaded.vision.fell_back
    for part in (vlm.model.vision_tower, vlm.model.mm_projector, vlm.model.llm):
        linears = [m for m in part.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
        assert linears and all(isinstance(m, OneDNNLinear) for m in linears), type(part).__name__
    decoder_linears = [m for m in vlm.model.llm.modules() if isinstance(m, OneDNNLinear)]
    assert vlm.fast_paths.decode_step == "cpu_compiled" and cpu_decode.available()
    assert all(m.one_row_product is cpu_decode.one_row_linear for m in decoder_linears)
    assert vlm.decode_step.keywords["run_layer"] is cpu_decode.one_token_layer
    assert vlm.encode_images == vlm.model.encode_images


@needs_onednn
def test_fast_paths_follow_the_load_options():
    """choose_fast_paths, the one place the kernels are chosen: oneDNN layers for float CPU models unless opted
    out, the compiled decode step unless the decoder is quantised, torch's kernels for float16 on the CPU."""
    from mobilevlm_ros.model import cpu_decode
    from mobilevlm_ros.model.pipeline import EAGER, FastPaths, choose_fast_paths

    compiled = "cpu_compiled" if cpu_decode.available() else "eager"
    assert choose_fast_paths() == FastPaths(onednn_layers=True, decode_step=compiled)
    bfloat16 = FastPaths(onednn_layers=True, decode_step=compiled) if available(torch.bfloat16) else EAGER
    assert choose_fast_paths(dtype="bfloat16") == bfloat16
    for mode in ("int8", "int8-dynamic", "int4"):  # the vision side stays float, on oneDNN
        assert choose_fast_paths(quantize=mode) == FastPaths(onednn_layers=True, decode_step="eager")
    assert choose_fast_paths(onednn=False) == EAGER
    assert choose_fast_paths(dtype="float16") == EAGER
    for bad in ({"dtype": "int3"}, {"quantize": "int3"}, {"compile_mode": "fastest"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            choose_fast_paths(**bad)
    with pytest.raises(ValueError):
        FastPaths(onednn_layers=False, decode_step="cpu_compiled")
