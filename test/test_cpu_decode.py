"""The compiled bfloat16 decode kernels (model/cpu_decode.py): the same functions as F.linear and torch's attention,
and a bfloat16 pipeline on an x86 CPU really runs its one-token steps through them. test_precision.py checks the
same pipeline's logits and greedy answers against the float32 goldens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import CHECKPOINT_NAMES, CHECKPOINTS
from mobilevlm_ros.model import MobileVLMPipeline, cpu_decode
from mobilevlm_ros.model.cpu_linear import OneDNNLinear, available

pytestmark = pytest.mark.skipif(not (available(torch.bfloat16) and cpu_decode.available()),
                                reason="the compiled decode kernels are used for bfloat16 on x86 CPUs only")


@pytest.mark.parametrize("out_features,in_features", [(80, 96), (64, 4160)])  # 4160: rows summed in two halves
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1,), ()])  # a decode step's [B, T, K], a row, a bare vector
def test_one_row_linear_is_f_linear(out_features, in_features, bias, shape):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features).bfloat16()
    b = torch.randn(out_features).bfloat16() if bias else None
    x = torch.randn(*shape, in_features).bfloat16()
    with torch.inference_mode():
        got = cpu_decode.one_row_linear(x, weight, b)
    expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.dtype == torch.bfloat16 and got.shape == (*shape, out_features)
    torch.testing.assert_close(got.float(), expected, atol=0.05 * in_features ** 0.5 / 8, rtol=0.02)


@pytest.mark.parametrize("positions", [2, 7, 200])
def test_one_query_attention_is_sdpa(positions):
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 32).bfloat16()
    cache = torch.randn(2, 1, 4, 256, 32).bfloat16()  # a static cache of which the first positions are filled
    k, v = cache[0, :, :, :positions], cache[1, :, :, :positions]
    with torch.inference_mode():
        got = cpu_decode.one_query_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_bfloat16_pipeline_decodes_through_the_compiled_kernels(checkpoint):
    """Every decoder layer's one-token step, attention and one-row products are the compiled ones; the decode
    logits agree with the same pipeline on torch's kernels (onednn=False) within bfloat16 rounding."""
    fast = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, dtype="bfloat16")
    plain = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, dtype="bfloat16", onednn=False)
    llm = fast.model.llm
    assert all(layer.compiled_one_token_block is cpu_decode.one_token_block for layer in llm.layers)
    assert all(layer.self_attn.attend_one_query is cpu_decode.one_query_attention for layer in llm.layers)
    linears = [m for m in llm.modules() if isinstance(m, OneDNNLinear)]
    assert linears and all(m.one_row_linear is cpu_decode.one_row_linear for m in linears)
    assert all(layer.compiled_one_token_block is None for layer in plain.model.llm.layers)
    torch.manual_seed(0)
    embeds = torch.randn(1, 20, llm.config.hidden_size).bfloat16()
    with torch.inference_mode():
        fast.model.prefill(embeds)
        token = plain.model.prefill(embeds).argmax(-1)
        for pos in range(20, 28):  # both fed the same tokens, so their caches hold the same positions
            got, expected = fast.model.decode_step(token, pos), plain.model.decode_step(token, pos)
            torch.testing.assert_close(got.float(), expected.float(), atol=0.25, rtol=0.05)
            token = expected.argmax(-1)
