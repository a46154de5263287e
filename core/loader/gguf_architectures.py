"""llama.cpp's architectures as Hugging Face checkpoints: each one's config class and fields, its tensors' Hugging
Face names, and what llama.cpp's converter (convert_hf_to_gguf.py) changed in them, undone: llama's interleaved q/k
rows (its rotary turns neighbouring pairs; the others' NEOX mode turns halves as HF's rotate_half does, and gpt2 has
none); the q/k/v rows it regroups for gptneox and falcon; the 1 it adds to gemma's and gemma2's norms; gpt2's Conv1D weights,
which it stores [out, in] where HF's checkpoint is [in, out]. A llama file with experts is Mixtral's. bert is a
BertModel encoder, its pooling the file's ``bert.pooling_type``. OPT has no llama.cpp architecture."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import transformers

from kvserve.core.loader.gguf_configs import (Meta, bert_config, falcon_config, gemma2_config, gpt2_config,
                                              gptneox_config, llama_like_config, mixtral_config, phi3_config)

LLAMA_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
LLAMA_LAYERS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{g}.{p}": f"self_attn.{h}_proj.{p}"
       for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for p in ("weight", "bias")},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    **{f"ffn_{g}.weight": f"mlp.{g}_proj.weight" for g in ("gate", "up", "down")},
    "ffn_gate_inp.weight": "mlp.gate.weight",
    **{f"ffn_{g}_exps.weight": f"mlp.experts.{{}}.{g}_proj.weight" for g in ("gate", "up", "down")},  # per expert
    **{f"ffn_{g}_shexp.weight": f"mlp.shared_expert.{g}_proj.weight" for g in ("gate", "up", "down")},
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
LINEAR_BLOCKS = ("_proj.weight", "lm_head.weight")
CONV1D_MODULES = (".c_attn.", ".c_proj.", ".c_fc.")


def _with_biases(names: dict[str, str]) -> dict[str, str]:
    return {f"{source}.{p}": f"{hf}.{p}" for source, hf in names.items() for p in ("weight", "bias")}


@dataclass(frozen=True)
class Family:
    """One llama.cpp architecture read as a Hugging Face checkpoint. ``names`` and ``layers`` (under ``prefix`` and
    the layer's index) give each GGUF tensor its HF name; ``blocks``: the HF name endings of the linear weights that
    may stay quantized blocks (kvserve splits a fused tensor into its merged layers' shards only as floats);
    ``rows(name, tensor, heads, kv_heads)``: a weight's or bias's rows in HF's order (of blocks' levels and scales
    too); ``floats(name, tensor)``: a float tensor's HF values and layout."""

    config_class: type[transformers.PretrainedConfig]
    hf_architecture: str
    config: Callable[[dict, Meta, dict], dict]   # (the common fields, meta, tensors by name) -> the config's fields
    names: dict[str, str]
    layers: dict[str, str]
    prefix: str = "model.layers."
    blocks: tuple[str, ...] = LINEAR_BLOCKS
    rows: Callable[[str, torch.Tensor, int, int], torch.Tensor] | None = None
    floats: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    partial_rotary: bool = False


def _llama_rows(name: str, w: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    # Inverse of convert_hf_to_gguf.py's permute: reshape(n_head, 2, d/2, ...).swapaxes(1, 2).
    n_head = heads if ".q_proj." in name else kv_heads if ".k_proj." in name else None
    if n_head is None:
        return w
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _grouped_qkv_rows(name: str, w: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """HF's fused q/k/v rows are groups of query heads, each followed by its key and value head (GPT-NeoX: one query
    head a group); llama.cpp's converter puts all query heads first, then the keys, then the values."""
    if ".query_key_value." not in name:
        return w
    head = w.shape[0] // (heads + 2 * kv_heads)
    parts = w.split([heads * head, kv_heads * head, kv_heads * head])
    return torch.cat([part.reshape(kv_heads, -1, head, *w.shape[1:]) for part in parts], dim=1).reshape(w.shape)


def _gemma_norms(name: str, w: torch.Tensor) -> torch.Tensor:
    return w - 1 if name.endswith("norm.weight") else w


LLAMA_LIKE = dict(names=LLAMA_NAMES, layers=LLAMA_LAYERS)
# Gemma 2's ffn_norm is the norm before the MLP; post_attention_norm and post_ffw_norm follow attention and the MLP.
GEMMA2_LAYERS = {**LLAMA_LAYERS, "post_attention_norm.weight": "post_attention_layernorm.weight",
                 "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                 "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
GPT2_LAYERS = _with_biases({"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                            "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"})
NEOX_LAYERS = _with_biases({"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
                            "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
                            "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"})
FALCON_LAYERS = _with_biases({"attn_norm": "input_layernorm", "attn_norm_2": "ln_attn",
                              "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
                              "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"})
BERT_NAMES = {"token_embd.weight": "embeddings.word_embeddings.weight",
              "position_embd.weight": "embeddings.position_embeddings.weight",
              "token_types.weight": "embeddings.token_type_embeddings.weight",
              **_with_biases({"token_embd_norm": "embeddings.LayerNorm"})}
BERT_LAYERS = _with_biases({"attn_q": "attention.self.query", "attn_k": "attention.self.key",
                            "attn_v": "attention.self.value", "attn_output": "attention.output.dense",
                            "attn_output_norm": "attention.output.LayerNorm", "ffn_up": "intermediate.dense",
                            "ffn_down": "output.dense", "layer_output_norm": "output.LayerNorm"})
NEOX_BLOCKS = (".query_key_value.weight", ".dense.weight", ".dense_h_to_4h.weight", ".dense_4h_to_h.weight")

FAMILIES = {
    "llama": Family(transformers.LlamaConfig, "LlamaForCausalLM", llama_like_config(optional_biases=True), **LLAMA_LIKE,
                    rows=_llama_rows),
    "qwen2": Family(transformers.Qwen2Config, "Qwen2ForCausalLM", llama_like_config(), **LLAMA_LIKE),
    "qwen2moe": Family(transformers.Qwen2MoeConfig, "Qwen2MoeForCausalLM", llama_like_config(renormalize=False),
                       **LLAMA_LIKE),
    "qwen3": Family(transformers.Qwen3Config, "Qwen3ForCausalLM", llama_like_config(optional_biases=True), **LLAMA_LIKE),
    "qwen3moe": Family(transformers.Qwen3MoeConfig, "Qwen3MoeForCausalLM",
                       llama_like_config(optional_biases=True, renormalize=True), **LLAMA_LIKE),
    "gemma": Family(transformers.GemmaConfig, "GemmaForCausalLM", llama_like_config(), **LLAMA_LIKE,
                    floats=_gemma_norms),
    "gemma2": Family(transformers.Gemma2Config, "Gemma2ForCausalLM", gemma2_config, LLAMA_NAMES, GEMMA2_LAYERS,
                     floats=_gemma_norms),
    "phi3": Family(transformers.Phi3Config, "Phi3ForCausalLM", phi3_config, LLAMA_NAMES,
                   {**LLAMA_LAYERS, "attn_qkv.weight": "self_attn.qkv_proj.weight",
                    "ffn_up.weight": "mlp.gate_up_proj.weight"},   # gate then up, as HF fuses them
                   blocks=(".o_proj.weight", ".down_proj.weight", "lm_head.weight"), partial_rotary=True),
    "gpt2": Family(transformers.GPT2Config, "GPT2LMHeadModel", gpt2_config,
                   {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
                    **_with_biases({"output_norm": "transformer.ln_f"}), "output.weight": "lm_head.weight"},
                   GPT2_LAYERS, prefix="transformer.h.", blocks=(".c_proj.weight", ".c_fc.weight", "lm_head.weight"),
                   floats=lambda name, w: w.t() if name.endswith(".weight") and any(
                       module in name for module in CONV1D_MODULES) else w),
    "gptneox": Family(transformers.GPTNeoXConfig, "GPTNeoXForCausalLM", gptneox_config,
                      {"token_embd.weight": "gpt_neox.embed_in.weight", "output.weight": "embed_out.weight",
                       **_with_biases({"output_norm": "gpt_neox.final_layer_norm"})},
                      NEOX_LAYERS, prefix="gpt_neox.layers.", blocks=(*NEOX_BLOCKS, "embed_out.weight"),
                      rows=_grouped_qkv_rows, partial_rotary=True),
    "falcon": Family(transformers.FalconConfig, "FalconForCausalLM", falcon_config,
                     {"token_embd.weight": "transformer.word_embeddings.weight", "output.weight": "lm_head.weight",
                      **_with_biases({"output_norm": "transformer.ln_f"})},
                     FALCON_LAYERS, prefix="transformer.h.", blocks=(*NEOX_BLOCKS, "lm_head.weight"),
                     rows=_grouped_qkv_rows),
    "bert": Family(transformers.BertConfig, "BertModel", bert_config, BERT_NAMES, BERT_LAYERS,
                   prefix="encoder.layer.", blocks=(".query.weight", ".key.weight", ".value.weight", ".dense.weight")),
}
# Falcon-40B's two norms: llama.cpp's attn_norm is HF's ln_mlp, attn_norm_2 its ln_attn.
FALCON_TWO_NORMS = {**FAMILIES["falcon"].layers, **_with_biases({"attn_norm": "ln_mlp"})}
MIXTRAL = Family(transformers.MixtralConfig, "MixtralForCausalLM", mixtral_config, LLAMA_NAMES,
                 {**LLAMA_LAYERS, "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
                  **{f"ffn_{g}_exps.weight": f"block_sparse_moe.experts.{{}}.{w}.weight"
                     for g, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}}, rows=_llama_rows)


def family_of(arch: str, tensor_names) -> Family:
    family = FAMILIES[arch]
    if arch == "falcon" and "blk.0.attn_norm_2.weight" in tensor_names:
        return dataclasses.replace(family, layers=FALCON_TWO_NORMS)
    if arch == "llama" and "blk.0.ffn_gate_inp.weight" in tensor_names:
        return MIXTRAL
    return family
