"""Write the benchmark model's seeded weights as GGUF files for llama.cpp: the decoder (F16, Q8_0 or Q4_0) and the
vision tower + LDP / LDPv2 projector (the "mmproj" file llama.cpp's multimodal code loads).

Decoder: tensor names, the q/k row permutation (Hugging Face rotate-half RoPE -> GGML's interleaved RoPE) and the
metadata follow llama.cpp's convert_hf_to_gguf.py for LlamaForCausalLM, so llama.cpp computes the same function as
our decoder. The vocabulary is synthetic (<unk>, <s>, </s>, 256 byte pieces, then filler pieces up to the model's
vocabulary size) unless a SentencePiece model is given: then its pieces, scores and types come first, so that
llama.cpp tokenises a text prompt into the ids our tokenizer gives. Every matrix, lm_head included, uses the
requested type (like llama-quantize --pure); the token embedding stays F16 (a lookup, one row read per token).

Projector: the keys, tensor names and types of llama.cpp's converter for MobileVLM
(tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py --projector-type ldp / ldpv2, fed the CLIP ViT-L/14-336
directory and the checkpoint's projector weights): architecture "clip", a vision encoder with a LLaVA projector,
CLIP's names under ``v.`` (fc1 written as ffn_down and fc2 as ffn_up, as that converter names them), the
projector's under ``mm.model.``; matrices and convolution kernels F16 (``--use-f32``: the encoder's matrices F32,
convolution kernels and projector matrices still F16), vectors F32.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..model.config import MobileVLMConfig
from .models import hf_llama_state

GGUF_TYPES = ("F16", "Q8_0", "Q4_0")
BITS = {"F16": 16, "Q8_0": 8, "Q4_0": 4}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.{i}.<group>.<name>.weight
    i, rest = parts[2], ".".join(parts[3:])
    table = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
             "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
             "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm"}
    return f"blk.{i}.{table[rest]}.weight"


def _vocabulary(vocab_size: int, tokenizer_model: str | Path | None):
    """(pieces, scores, types) of vocab_size entries: the SentencePiece model's own, then unused fillers; or the
    synthetic vocabulary."""
    import gguf

    if tokenizer_model is None:
        pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        pieces += [f"\u2581t{i}" for i in range(vocab_size - len(pieces))]
        scores = [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)]
        types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
            [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab_size - 259)
        return pieces, scores, types
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    # SentencePiece's piece types (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte) are GGUF's
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [gguf.TokenType(p.type) for p in proto.pieces]
    filler = vocab_size - len(pieces)
    if filler < 0:
        raise ValueError(f"the tokenizer has {len(pieces)} pieces, more than the model's {vocab_size} rows")
    # Fillers are ordinary pieces, so that a random model's answer streams as text token by token (llama.cpp
    # prints unused pieces as nothing), made of characters no prompt has, so that no prompt tokenises into them.
    return (pieces + [f"\u27e8{i}\u27e9" for i in range(filler)], scores + [-1e9] * filler,
            types + [gguf.TokenType.NORMAL] * filler)


def write_gguf(config: MobileVLMConfig, path: str | Path, qtype: str = "F16", seed: int = 0,
               context_length: int = 2048, tokenizer_model: str | Path | None = None) -> Path:
    import gguf

    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {GGUF_TYPES}")
    llama = config.llama
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"mobilevlm-bench-random-seed{seed}")
    writer.add_context_length(context_length)
    writer.add_embedding_length(llama.hidden_size)
    writer.add_block_count(llama.num_layers)
    writer.add_feed_forward_length(llama.intermediate_size)
    writer.add_rope_dimension_count(llama.head_dim)
    writer.add_head_count(llama.num_heads)
    writer.add_head_count_kv(llama.num_kv_heads)
    writer.add_layer_norm_rms_eps(llama.rms_norm_eps)
    writer.add_rope_freq_base(llama.rope_theta)
    writer.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    tokens, scores, types = _vocabulary(llama.vocab_size, tokenizer_model)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    target = {"F16": gguf.GGMLQuantizationType.F16, "Q8_0": gguf.GGMLQuantizationType.Q8_0,
              "Q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    for hf_name, tensor in hf_llama_state(config, seed):
        name = _gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            tensor = _permute(tensor, llama.num_heads)
        elif name.endswith("attn_k.weight"):
            tensor = _permute(tensor, llama.num_kv_heads)
        data = tensor.float().numpy()
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif name == "token_embd.weight" or target == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, target), raw_dtype=target)
    return _finish(writer, tmp, path)


def _finish(writer, tmp: Path, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


PROJECTOR_TYPES = {"ldpnet": "ldp", "ldpnetv2": "ldpv2"}  # ours -> llama.cpp's clip.projector_type
CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def clip_tensor_name(hf: str) -> str:
    """The converter's name for a CLIPVisionModel tensor (its get_tensor_name, string replacements in its order)."""
    for old, new in (("vision_model", "v"), ("encoder.layers", "blk"), ("embeddings.", ""), ("_proj", ""),
                     ("self_attn.", "attn_"), ("layer_norm", "ln"), ("layernorm", "ln"), ("mlp.fc1", "ffn_down"),
                     ("mlp.fc2", "ffn_up"), ("embedding", "embd"), ("final", "post"), ("layrnorm", "ln")):
        hf = hf.replace(old, new)
    return hf


def projector_tensor_name(ours: str) -> str:
    """The converter's name for a projector tensor, from ours (the checkpoint's, less ``model.mm_projector.``)."""
    name = "mm." + ours
    name = re.sub(r"^mm\.mlp\.mlp", "mm.model.mlp", name)  # LDPv2: FeatureIRLayer and PosInjectLayer
    return re.sub(r"^mm\.peg\.peg", "mm.model.peg", name)


def write_projector_gguf(config: MobileVLMConfig, path: str | Path, seed: int = 0, use_f32: bool = False,
                         vision_layers: int | None = None) -> Path:
    """The vision tower and projector of the seeded model as llama.cpp's converter for MobileVLM writes them, but
    for the number of CLIP layers.

    vision_layers: the CLIP encoder layers the file holds (its block_count); default: all of them. llama.cpp's
    LLaVA graph runs block_count - 1 layers (it takes the file to hold the whole tower, and MobileVLM reads the
    second-to-last layer's output), while the converter drops the last layer before writing: a file converted
    with it makes llama.cpp stop one layer short of what MobileVLM reads (test_gguf_projector.py shows both)."""
    import gguf

    from .models import hf_clip_state, random_projector

    if config.projector_type not in PROJECTOR_TYPES:
        raise ValueError(f"llama.cpp loads MobileVLM's ldpnet / ldpnetv2 projectors, not {config.projector_type!r}")
    v = config.vision
    layers = v.num_layers if vision_layers is None else vision_layers
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_file_type(0 if use_f32 else 1)
    writer.add_name(f"mobilevlm-bench-random-seed{seed}")
    writer.add_description("image encoder for LLaVA")
    writer.add_string("clip.projector_type", PROJECTOR_TYPES[config.projector_type])
    writer.add_uint32("clip.vision.image_size", v.image_size)
    writer.add_uint32("clip.vision.patch_size", v.patch_size)
    writer.add_uint32("clip.vision.embedding_length", v.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", 768)  # CLIP ViT-L/14-336's; the graph does not read it
    writer.add_uint32("clip.vision.attention.head_count", v.num_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", layers)
    writer.add_array("clip.vision.image_mean", CLIP_MEAN_STD[0])
    writer.add_array("clip.vision.image_std", CLIP_MEAN_STD[1])
    writer.add_bool("clip.use_gelu", False)  # CLIP ViT-L's quick_gelu
    # The projector first, as the converter adds it: matrices and (squeezed) convolution kernels F16.
    for name, tensor in random_projector(config, seed=seed).state_dict().items():
        data = tensor.squeeze().numpy()
        writer.add_tensor(projector_tensor_name(name),
                          data.astype(np.float16 if tensor.ndim in (2, 4) else np.float32))
    for name, tensor in hf_clip_state(config, seed):
        if name.startswith("vision_model.post_layernorm"):
            continue  # the converter skips it for a LLaVA projector
        if name.startswith("vision_model.encoder.layers.") and int(name.split(".")[3]) >= layers:
            continue
        data = tensor.squeeze().numpy()
        half = data.ndim == 4 or (not use_f32 and name.endswith(".weight") and data.ndim == 2)
        writer.add_tensor(clip_tensor_name(name), data.astype(np.float16 if half else np.float32))
    return _finish(writer, tmp, path)
