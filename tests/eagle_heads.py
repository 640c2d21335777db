"""EAGLE-1 head checkpoints for tests (the layout the reference server reads: a LlamaConfig
with one layer, fc.weight [hidden, 2*hidden], layers.0.* without an input norm, optional
embed_tokens, `model.` prefixes), and an independent reference of the head's proposals:
transformers' LlamaDecoderLayer recomputed over the whole sequence for every draft."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding


def make_eagle_head(path: Path, target_dir: Path, *, seed: int = 0, follows_embedding: bool = False,
                    own_embedding: bool = False, model_prefix: bool = False,
                    fc_bias: bool = False, torch_bin: bool = False) -> Path:
    """A random one-layer head for the target in `target_dir`. `follows_embedding`: fc
    passes the token embedding through and the layer adds nothing, so the head's output is
    embed(x(t+1)) and its guess argmax(lm_head(embed(x(t+1)))). `torch_bin`: weights in
    pytorch_model.bin, as the original EAGLE releases ship them."""
    target = AutoConfig.from_pretrained(target_dir)
    config = LlamaConfig(
        vocab_size=target.vocab_size, hidden_size=target.hidden_size, intermediate_size=96,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    weights = {
        "fc.weight": rand(hidden, 2 * hidden),
        "layers.0.self_attn.q_proj.weight": rand(hidden, hidden),
        "layers.0.self_attn.k_proj.weight": rand(kv, hidden),
        "layers.0.self_attn.v_proj.weight": rand(kv, hidden),
        "layers.0.self_attn.o_proj.weight": rand(hidden, hidden),
        "layers.0.mlp.gate_proj.weight": rand(inter, hidden),
        "layers.0.mlp.up_proj.weight": rand(inter, hidden),
        "layers.0.mlp.down_proj.weight": rand(hidden, inter),
        "layers.0.post_attention_layernorm.weight": 1 + rand(hidden),
    }
    if fc_bias:
        weights["fc.bias"] = rand(hidden)
    if own_embedding:
        weights["embed_tokens.weight"] = rand(config.vocab_size, hidden, scale=1.0)
    if follows_embedding:
        weights["fc.weight"] = torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), 1)
        weights["layers.0.self_attn.o_proj.weight"].zero_()
        weights["layers.0.mlp.down_proj.weight"].zero_()
        weights.pop("fc.bias", None)
    if model_prefix:
        weights = {("model." + k if k != "lm_head.weight" else k): v for k, v in weights.items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    tensors = {k: v.contiguous() for k, v in weights.items()}
    if torch_bin:
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        save_file(tensors, str(path / "model.safetensors"))
    return path


def make_embedding_following_target(path: Path, source_dir: Path) -> Path:
    """`source_dir`'s model with every layer's o_proj and down_proj zeroed and final norm
    weights of one: its hidden state at t is a positive multiple of embed(x_t), so its greedy
    next token is argmax(lm_head(embed(x_t))), which a `follows_embedding` head guesses."""
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
            if name == "model.norm.weight":
                param.fill_(1.0)
    model.save_pretrained(path)
    return path


class ReferenceHead:
    """The head as transformers' Llama layer, input norm removed, recomputed from scratch."""

    def __init__(self, head_dir: Path, embedding: torch.Tensor,
                 lm_head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        from safetensors.torch import load_file

        config = LlamaConfig.from_pretrained(head_dir)
        config._attn_implementation = "eager"
        file = head_dir / "model.safetensors"
        stored = (load_file(str(file)) if file.exists()
                  else torch.load(head_dir / "pytorch_model.bin", weights_only=True))
        weights = {k.removeprefix("model."): v for k, v in stored.items()}
        self.layer = LlamaDecoderLayer(config, 0).eval()
        self.layer.input_layernorm = torch.nn.Identity()
        self.layer.load_state_dict(
            {k.removeprefix("layers.0."): v for k, v in weights.items()
             if k.startswith("layers.0.")}, strict=False)
        self.rotary = LlamaRotaryEmbedding(config)
        self.fc_weight, self.fc_bias = weights["fc.weight"], weights.get("fc.bias")
        self.embedding = weights.get("embed_tokens.weight", embedding)
        self.lm_head = lm_head

    @torch.no_grad()
    def proposals(self, token_ids: list[int], target_hidden: torch.Tensor, first: int,
                  num_tokens: int) -> list[int]:
        """Drafts after `token_ids` from the target's hidden states [len-1, hidden]; the
        head sees positions first .. only (a request that started from a prefix hit)."""
        tokens = list(token_ids[first + 1 :])
        features = list(target_hidden[first : len(token_ids) - 1])
        drafts: list[int] = []
        for _ in range(num_tokens):
            x = torch.nn.functional.linear(
                torch.cat((self.embedding[torch.tensor(tokens)], torch.stack(features)), -1),
                self.fc_weight, self.fc_bias)[None]
            n = x.shape[1]
            positions = torch.arange(first, first + n)[None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            out = self.layer(x, attention_mask=mask, position_ids=positions,
                             position_embeddings=self.rotary(x, positions))
            out = out[0] if isinstance(out, tuple) else out
            last = out[0, -1]
            draft = int(self.lm_head(last[None])[0].argmax())
            drafts.append(draft)
            tokens.append(draft)
            features.append(last)
        return drafts
