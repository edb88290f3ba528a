"""Write the benchmark decoder's seeded weights as a GGUF file for llama.cpp (F16, Q8_0 or Q4_0).

Tensor names, the q/k row permutation (Hugging Face rotate-half RoPE -> GGML's interleaved RoPE) and the metadata
follow llama.cpp's convert_hf_to_gguf.py for LlamaForCausalLM, so llama.cpp computes the same function as our
decoder. The vocabulary is synthetic (the benchmark feeds token ids, never text): <unk>, <s>, </s>, 256 byte
pieces, then filler pieces up to the model's vocabulary size. Every matrix, lm_head included, uses the requested
type (like llama-quantize --pure); the token embedding stays F16 (a lookup, one row read per token).
"""
from __future__ import annotations

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


def write_gguf(config: MobileVLMConfig, path: str | Path, qtype: str = "F16", seed: int = 0,
               context_length: int = 2048) -> Path:
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
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(llama.vocab_size - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (llama.vocab_size - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(llama.vocab_size - 259)])
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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
