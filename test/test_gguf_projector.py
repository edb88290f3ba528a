"""The vision tower + projector GGUF (bench/gguf_export.write_projector_gguf) in llama.cpp's own multimodal code:
llama.cpp's image embedding of a test image is our vision tower + LDP / LDPv2 projector's output on the same image
and weights, computed in the token order llama.cpp's LLaVA graph uses, so the file carries our weights under the
right names and the llama.cpp side of mobilevlm dev bench --e2e runs the same amount of the same layers as ours.

That order is not the reference's: llama.cpp (tools/mtmd/models/llava.cpp, the graph of its MobileVLM path)
appends CLIP's class embedding after the 576 patch embeddings, adds position embeddings 0..576 in that order and
hands rows 1..576 to the projector, so each patch gets its left neighbour's position embedding and the projector
sees patches 1..575 and the class token. Its MobileVLM embedding therefore differs from the reference's whatever
the file holds (the last test pins that down, so a llama.cpp that fixes it shows up here).
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mobilevlm_ros.bench.e2e import llamacpp_image_chunk
from mobilevlm_ros.bench.gguf_export import write_gguf, write_projector_gguf
from mobilevlm_ros.bench.models import random_mobilevlm, real_config
from mobilevlm_ros.model.image import preprocess

pytestmark = pytest.mark.skipif(not (importlib.util.find_spec("gguf") and importlib.util.find_spec("llama_cpp")),
                                reason="needs the bench extra (gguf, llama-cpp-python)")

VISION_LAYERS = 4  # the real ViT-L/14-336 width and grid (llama.cpp's LDP graphs assume the 24x24 grid), less depth
SEED = 3
# Float tolerance of llama.cpp's embedding against ours, relative to the embedding's largest magnitude (measured:
# 4e-4 LDPv2, 6e-4 LDP). Both sides hold the same values (ours rounded to F16 where the file is F16); what differs
# is arithmetic: GGML's F16 kernels round activations to F16 before each product with an F16 tensor (the patch
# embedding, every projector matrix), and GGML's GELU in the projector is the tanh approximation (ours: erf).
RELATIVE_TOLERANCE = 2e-3


def llama_cpp_image_embedding(decoder_path, projector_path, image: Image.Image, threads: int = 2) -> np.ndarray:
    """llama.cpp's embedding of image (mtmd_encode_chunk on the image chunk of "<marker>"), [tokens, width]."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(decoder_path), n_ctx=256, n_threads=threads, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, threads, False
    ctx = mtmd.mtmd_init_from_file(str(projector_path).encode(), llm.model, params)
    assert ctx, "llama.cpp refused the projector file"
    try:
        with llamacpp_image_chunk(mtmd, ctx, image) as chunk:
            tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
            width = llm.n_embd()
            return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(tokens * width,)).reshape(
                tokens, width).copy()
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()


def in_llama_cpp_order(model, pixels: torch.Tensor, layers: int) -> torch.Tensor:
    """Our vision tower's modules in llama.cpp's token order (class embedding after the patches, position
    embeddings 0..576 in that order, rows 1..576 out) through `layers` encoder layers, then our projector."""
    tower = model.vision_tower
    embeddings = tower.embeddings
    patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([patches, embeddings.class_embedding.expand(1, 1, -1)], 1) + embeddings.position_embedding.weight
    x = tower.pre_layrnorm(x)
    for layer in tower.encoder.layers[:layers]:
        x = layer(x)
    return model.mm_projector(x[:, 1:])


def ours_on_the_files_values(config):
    """Our model with the seeded weights, each tensor the file stores as F16 rounded to F16 (what llama.cpp reads)."""
    model = random_mobilevlm(config, seed=SEED, llm=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mm_projector.") and p.ndim in (2, 4) or name.endswith("patch_embedding.weight"):
                p.copy_(p.half().float())
    return model


def errors(model_name: str, tmp_path, file_layers: int) -> dict:
    """max |llama.cpp - ours| / max |ours| on a 336x336 image (no resize on either side), for the projector file
    holding file_layers CLIP layers (--use-f32: the encoder's matrices F32) loaded by llama.cpp's clip/mtmd code next
    to a decoder of the projector's output width. Ours: in llama.cpp's token order through N layers (key N, for
    every N up to the tower's), and MobileVLM's own vision tower + projector (key "mobilevlm")."""
    config = real_config(model_name, llm_layers=1, vision_layers=VISION_LAYERS)
    config = replace(config, llama=replace(config.llama, vocab_size=512))
    decoder = write_gguf(config, tmp_path / "decoder.gguf", "F16", seed=SEED)
    projector = write_projector_gguf(config, tmp_path / "mmproj.gguf", seed=SEED, use_f32=True,
                                     vision_layers=file_layers)
    image = Image.fromarray(np.random.RandomState(7).randint(0, 256, (336, 336, 3), dtype=np.uint8), "RGB")
    theirs = llama_cpp_image_embedding(decoder, projector, image)
    pixels = preprocess(image, 336, pad=True)
    whole = ours_on_the_files_values(replace(config, vision_select_layer=-1))  # every layer built
    with torch.inference_mode():
        ours = {n: in_llama_cpp_order(whole, pixels, n)[0] for n in range(1, VISION_LAYERS + 1)}
        ours["mobilevlm"] = ours_on_the_files_values(config).encode_images(pixels)[0]
    out = {}
    for key, o in ours.items():
        assert theirs.shape == o.shape == (144, config.llama.hidden_size)
        out[key] = float(np.abs(theirs - o.numpy()).max() / np.abs(o.numpy()).max())
    return out


@pytest.mark.parametrize("model_name", ["MobileVLM-1.7B", "MobileVLM_V2-1.7B"])
def test_llama_cpp_embeds_an_image_as_our_vision_tower_and_projector(tmp_path, model_name):
    """MobileVLM (LDP) and MobileVLM_V2 (LDPv2), the file as the benchmark writes it (the whole tower): llama.cpp runs
    all but the file's last layer, as many as MobileVLM reads (its second-to-last layer's output), and its embedding
    is ours through those layers in its token order, within RELATIVE_TOLERANCE of the largest value."""
    error = errors(model_name, tmp_path, VISION_LAYERS)
    assert error[VISION_LAYERS - 1] < RELATIVE_TOLERANCE, error
    assert min(error[n] for n in range(1, VISION_LAYERS + 1) if n != VISION_LAYERS - 1) > 0.1, error


def test_the_converters_layer_count_makes_llama_cpp_stop_one_layer_short(tmp_path):
    """llama.cpp's converter for MobileVLM drops the tower's last layer before writing it, and llama.cpp runs all
    but the last of the layers in the file: with the converter's count, llama.cpp's embedding is ours through one
    layer fewer than MobileVLM reads."""
    error = errors("MobileVLM_V2-1.7B", tmp_path, VISION_LAYERS - 1)
    assert error[VISION_LAYERS - 2] < RELATIVE_TOLERANCE, error
    assert error[VISION_LAYERS - 1] > 0.1, error


def test_llama_cpp_orders_the_class_token_after_the_patches(tmp_path):
    """The same file and layers in MobileVLM's own token order (class token first) are far from llama.cpp's
    embedding: the difference is llama.cpp's token order, not the file."""
    error = errors("MobileVLM_V2-1.7B", tmp_path, VISION_LAYERS)
    assert error[VISION_LAYERS - 1] < RELATIVE_TOLERANCE and error["mobilevlm"] > 0.1, error
