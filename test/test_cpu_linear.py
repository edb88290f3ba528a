"""Linear layers on oneDNN (model/cpu_linear.py): the same function as nn.Linear, swapped in by the pipeline
wherever oneDNN is available. The reference goldens (test_model_reference.py) run through the swapped pipeline, so
they check it end to end; these tests check the layer, that the swap really happens, and that the ONNX export's
swap back is lossless."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import CHECKPOINT_NAMES, CHECKPOINTS
from mobilevlm_ros.model import MobileVLMPipeline
from mobilevlm_ros.engines.visual import VisualEncoder, weights_digest
from mobilevlm_ros.model.cpu_linear import OneDNNLinear, available, use_onednn, use_plain_linears
from mobilevlm_ros.model.quantize import weight_bytes

needs_onednn = pytest.mark.skipif(not available(torch.float32), reason="oneDNN is used on x86 CPUs only")


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
def test_swap_and_swap_back_are_lossless_and_release_the_old_weights(dtype):
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
    assert use_plain_linears(model) == 2
    assert [type(m) for m in model] == [nn.Linear, nn.SiLU, nn.Linear]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items()) and len(plain) == 3


@needs_onednn
@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_pipeline_runs_on_onednn_and_can_opt_out(checkpoint):
    """Every float Linear of the loaded model is swapped (the goldens then hold for the swapped model); the ONNX
    export's VisualEncoder swaps the vision side back to the same weights (same digest, so the same cached
    engines); onednn=False keeps torch's kernels."""
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint)
    linears = [m for m in vlm.model.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)
    plain = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, onednn=False)
    assert not any(isinstance(m, OneDNNLinear) for m in plain.model.modules())
    encoder = VisualEncoder.from_model(vlm.model)
    assert not any(isinstance(m, OneDNNLinear) for m in encoder.modules())
    assert weights_digest(encoder) == weights_digest(VisualEncoder.from_model(plain.model))
