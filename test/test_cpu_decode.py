"""The compiled decode kernels (model/cpu_decode.py): the same functions as F.linear and torch's attention, and a
float32 or bfloat16 pipeline on an x86 CPU really runs its one-token steps through them. The reference goldens
(test_model_reference.py, float32) and test_precision.py (bfloat16) check the same pipelines end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import CHECKPOINT_NAMES, CHECKPOINTS
from mobilevlm_ros.model import MobileVLMPipeline, cpu_decode
from mobilevlm_ros.model.cpu_linear import OneDNNLinear, available

pytestmark = pytest.mark.skipif(not (available(torch.float32) and cpu_decode.available()),
                                reason="the compiled decode kernels are used on x86 CPUs only")
# bfloat16 results are compared within bfloat16 rounding, float32 ones 1000x tighter (summation order only)
DTYPES = [pytest.param(torch.float32, 1e-3, id="float32"), pytest.param(torch.bfloat16, 1.0, id="bfloat16")]


@pytest.mark.parametrize("out_features,in_features", [(80, 96), (64, 4160)])  # 4160: rows summed in two halves
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1,), ()])  # a decode step's [B, T, K], a row, a bare vector
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_one_row_linear_is_f_linear(out_features, in_features, bias, shape, dtype, tolerance):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    x = torch.randn(*shape, in_features).to(dtype)
    with torch.inference_mode():
        got = cpu_decode.one_row_linear(x, weight, b)
    expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (*shape, out_features)
    torch.testing.assert_close(got.float(), expected, atol=tolerance * 0.05 * in_features ** 0.5 / 8,
                               rtol=tolerance * 0.02)


@pytest.mark.parametrize("positions", [2, 7, 200])
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_one_query_attention_is_sdpa(positions, dtype, tolerance):
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 32).to(dtype)
    cache = torch.randn(2, 1, 4, 256, 32).to(dtype)  # a static cache of which the first positions are filled
    k, v = cache[0, :, :, :positions], cache[1, :, :, :positions]
    with torch.inference_mode():
        got = cpu_decode.one_query_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected, atol=tolerance * 0.02, rtol=tolerance * 0.02)


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_pipeline_decodes_through_the_compiled_kernels(checkpoint, dtype, tolerance):
    """The pipeline's decode step runs every decoder layer through the compiled one-token step (which attends
    with the compiled one-query kernel) and its products through the compiled one-row product; the decode logits
    agree with the same pipeline on torch's kernels (onednn=False) within the dtype's rounding."""
    if not available(dtype):
        pytest.skip(f"no oneDNN {dtype} kernel here")
    name = str(dtype).removeprefix("torch.")
    fast = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, dtype=name)
    plain = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, dtype=name, onednn=False)
    llm = fast.model.llm
    assert fast.fast_paths.decode_step == "cpu_compiled" and plain.fast_paths.decode_step == "eager"
    assert fast.decode_step.func == fast.model.decode_step
    assert fast.decode_step.keywords == {"run_layer": cpu_decode.one_token_layer}
    assert plain.decode_step == plain.model.decode_step
    linears = [m for m in llm.modules() if isinstance(m, OneDNNLinear)]
    assert linears and all(m.one_row_product is cpu_decode.one_row_linear for m in linears)
    torch.manual_seed(0)
    embeds = torch.randn(1, 20, llm.config.hidden_size).to(dtype)
    with torch.inference_mode():
        fast.model.prefill(embeds)
        token = plain.model.prefill(embeds).argmax(-1)
        for pos in range(20, 28):  # both fed the same tokens, so their caches hold the same positions
            got, expected = fast.decode_step(token, pos), plain.decode_step(token, pos)
            torch.testing.assert_close(got.float(), expected.float(), atol=tolerance * 0.25,
                                       rtol=tolerance * 0.05)
            token = expected.argmax(-1)
