"""GGUF test files written with the `gguf` package (GGUFWriter, gguf.quants.quantize) from a
tiny random-weight transformers model, laid out as llama.cpp's convert_hf_to_gguf writes them:
llama.cpp tensor names, Llama's q/k rows permuted for its rotary layout, hyperparameters and
the byte-level BPE tokenizer ("gpt2" model: tokens, types, merges) in the metadata.

The reference for such a file is transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`), which dequantizes every tensor with gguf.quants and
undoes the permutation.

The `gguf` package quantizes to Q8_0 and Q4_0 (and Q4_1, Q5_x) but not to the K-quants: a
tensor asked for in Q4_K or Q6_K is written as random blocks of that type (valid by
construction: any bytes are a block, with its fp16 super-scales set to give weights of a
trained model's scale), so its values come from the file, not from the transformers model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

# transformers name (after "model.layers.{i}.") -> llama.cpp's.
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                "lm_head": "output"}


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (q and k rows, for llama.cpp's rope)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf_name: str) -> str:
    module, _, kind = hf_name.rpartition(".")
    if module in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[module]}.{kind}"
    parts = module.split(".")  # model.layers.{i}.rest
    return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{kind}"


def write_gguf(base_dir: Path, out_path: Path, *, projections: str,
               overrides: dict[str, str] | None = None, embeddings: str = "F32",
               output: str = "F32") -> Path:
    """`base_dir`'s model as one GGUF file: decoder projections in `projections` (a
    GGMLQuantizationType name: Q8_0, Q4_0, Q4_K, Q6_K, F16 ...) except those whose llama.cpp
    name contains a key of `overrides` (Q4_K_M puts attn_v and ffn_down in Q6_K), the
    embedding and output matrices in their own types, norms in F32."""
    import gguf

    config = json.loads((base_dir / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[config["architectures"][0]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name(base_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta")
                                    or config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, base_dir, config["vocab_size"])
    state = load_file(base_dir / "model.safetensors")
    rng = np.random.default_rng(0)
    for name, tensor in state.items():
        target = gguf_name(name)
        data = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in target:
            data = permute(data, heads, heads)
        elif arch == "llama" and ".attn_k." in target:
            data = permute(data, heads, kv_heads)
        if data.ndim == 1:
            qtype_name = "F32"
        elif target.startswith("token_embd"):
            qtype_name = embeddings
        elif target.startswith("output."):
            qtype_name = output
        else:
            qtype_name = next((kind for key, kind in (overrides or {}).items() if key in target),
                              projections)
        qtype = gguf.GGMLQuantizationType[qtype_name]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, data.astype(np.float32))
        elif qtype_name in K_SUPER_SCALES:
            writer.add_tensor(target, random_k_blocks(data.shape, qtype_name, rng),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# K-quant super-block (256 weights) byte sizes and where their fp16 scales sit: (offset,
# value) pairs. Q4_K: d, dmin first; Q6_K: ql, qh, int8 scales, then d.
K_SUPER_SCALES = {"Q4_K": (144, ((0, 2e-4), (2, 2e-4))), "Q6_K": (210, ((208, 3e-5),))}


def random_k_blocks(shape: tuple[int, ...], qtype_name: str, rng: np.random.Generator
                    ) -> np.ndarray:
    rows, columns = shape
    size, scales = K_SUPER_SCALES[qtype_name]
    blocks = rng.integers(0, 256, (rows, columns // 256, size), dtype=np.uint8)
    for offset, value in scales:
        blocks[..., offset:offset + 2] = np.array([value], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _add_tokenizer(writer, base_dir: Path, vocab_size: int) -> None:
    """The byte-level BPE tokenizer as convert_hf_to_gguf's gpt2 vocab: every id's token,
    its type (control for special tokens), the merges, the special ids."""
    import gguf

    tokenizer = json.loads((base_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {token["id"]: token["content"] for token in tokenizer["added_tokens"]}
    by_id = {index: token for token, index in vocab.items()} | special
    tokens, types = [], []
    for index in range(vocab_size):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        types.append(gguf.TokenType.CONTROL if index in special or index not in by_id
                     else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)


def transformers_gguf_model(gguf_path: Path) -> torch.nn.Module:
    """transformers' float32 model of the GGUF file (its own dequantization)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()
