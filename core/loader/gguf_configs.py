"""The Hugging Face config fields of each llama.cpp architecture, from a GGUF file's metadata and tensors (``common``:
the fields every architecture shares, which kvserve.core.loader.gguf reads)."""
from __future__ import annotations

from typing import Callable

import gguf
import numpy as np

Meta = Callable[..., object]   # meta(key with "{arch}", default) -> the file's value


def llama_like_config(optional_biases: bool = False, renormalize: bool | None = None):
    """The config fields of llama's relatives: q/k/v biases as the file has them, where optional; a mixture of
    experts where llama.cpp ``renormalize``s (or not) the chosen experts' weights."""
    def config(common: dict, meta: Meta, tensors: dict) -> dict:
        fields = {**common, "rms_norm_eps": meta("{arch}.attention.layer_norm_rms_epsilon")}
        if optional_biases:
            fields["attention_bias"] = "blk.0.attn_q.bias" in tensors
        if renormalize is not None:
            fields.update(_mixture(meta, tensors, common["num_hidden_layers"], renormalize))
        return fields
    return config


def _rows(tensors: dict, suffix: str) -> int | None:
    """The rows of the first tensor named ``*suffix``: an expert's width, which the model's must match anyway."""
    shapes = [t.shape for name, t in tensors.items() if name.endswith(suffix)]
    return int(shapes[0][1]) if shapes else None   # GGUF lists dimensions inputs first


def _mixture(meta: Meta, tensors: dict, num_layers: int, renormalize: bool) -> dict:
    """A mixture of experts' config fields: the experts' sizes from their tensors' shapes; a layer without a router
    keeps a dense MLP."""
    fields = dict(num_experts=meta("{arch}.expert_count"), num_experts_per_tok=meta("{arch}.expert_used_count"),
                  moe_intermediate_size=_rows(tensors, ".ffn_gate_exps.weight"), decoder_sparse_step=1,
                  mlp_only_layers=[i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
                  norm_topk_prob=bool(meta("{arch}.expert_weights_norm", renormalize)))
    shared = _rows(tensors, ".ffn_gate_shexp.weight")
    return fields if shared is None else {**fields, "shared_expert_intermediate_size": shared}


def mixtral_config(common: dict, meta: Meta, tensors: dict) -> dict:
    """Llama's fields and Mixtral's experts: every layer routed, the chosen experts' weights renormalized."""
    return {**common, "rms_norm_eps": meta("{arch}.attention.layer_norm_rms_epsilon"), "sliding_window": None,
            "intermediate_size": _rows(tensors, ".ffn_gate_exps.weight"),
            "num_local_experts": meta("{arch}.expert_count"), "num_experts_per_tok": meta("{arch}.expert_used_count")}


def phi3_config(common: dict, meta: Meta, tensors: dict) -> dict:
    """Phi-3's sliding window (0: none) and longrope: one factor a rotary pair, short and long, as tensors."""
    fields = {**common, "rms_norm_eps": meta("{arch}.attention.layer_norm_rms_epsilon"),
              "sliding_window": meta("{arch}.attention.sliding_window") or None}
    if "rope_factors_long.weight" in tensors:
        original = meta("{arch}.rope.scaling.original_context_length")
        factors = {f"{kind}_factor": [float(f) for f in _floats(tensors[f"rope_factors_{kind}.weight"])]
                   for kind in ("long", "short")}
        attention = meta("{arch}.rope.scaling.attn_factor")
        fields["rope_parameters"] = {**common["rope_parameters"], "rope_type": "longrope", **factors,
                                     "original_max_position_embeddings": original,
                                     **({} if attention is None else {"attention_factor": float(attention)})}
        fields["original_max_position_embeddings"] = original
    return fields


def gemma2_config(common: dict, meta: Meta, tensors: dict) -> dict:
    """Gemma 2's window and caps (llama.cpp's defaults where absent), and the query scale llama.cpp applies, which
    its files do not hold: 1/sqrt(head size), but 1/sqrt(hidden size / heads) in the 27B model's 46 layers."""
    layers, hidden, heads = common["num_hidden_layers"], common["hidden_size"], common["num_attention_heads"]
    return {**common, "rms_norm_eps": meta("{arch}.attention.layer_norm_rms_epsilon"),
            "sliding_window": meta("{arch}.attention.sliding_window", 4096),
            "attn_logit_softcapping": meta("{arch}.attn_logit_softcapping", 50.0),
            "final_logit_softcapping": meta("{arch}.final_logit_softcapping", 30.0),
            "query_pre_attn_scalar": hidden // heads if layers == 46 else common["head_dim"],
            "layer_types": ["sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(layers)]}


def _floats(tensor) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)


def gpt2_config(common: dict, meta: Meta, tensors: dict) -> dict:
    return dict(architectures=common["architectures"], vocab_size=common["vocab_size"],
                n_positions=common["max_position_embeddings"], n_embd=common["hidden_size"],
                n_layer=common["num_hidden_layers"], n_head=common["num_attention_heads"],
                n_inner=common["intermediate_size"], layer_norm_epsilon=meta("{arch}.attention.layer_norm_epsilon"),
                **{key: common[key] for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "dtype")})


def _layer_norm_config(common: dict) -> dict:
    """The common fields that GPT-NeoX and Falcon configs take as they are."""
    skipped = ("head_dim", "num_key_value_heads", "intermediate_size")
    return {key: value for key, value in common.items() if key not in skipped}


def gptneox_config(common: dict, meta: Meta, tensors: dict) -> dict:
    return {**_layer_norm_config(common), "intermediate_size": common["intermediate_size"],
            "layer_norm_eps": meta("{arch}.attention.layer_norm_epsilon"),
            "use_parallel_residual": bool(meta("{arch}.use_parallel_residual", True)),
            "attention_bias": "blk.0.attn_qkv.bias" in tensors}


def falcon_config(common: dict, meta: Meta, tensors: dict) -> dict:
    """llama.cpp's Falcon runs attention and MLP side by side: on one norm with one key-value head (Falcon-7B's
    multi-query attention), else with grouped key-value heads on a norm each (Falcon-40B) or one."""
    kv_heads, two_norms = common["num_key_value_heads"], "blk.0.attn_norm_2.weight" in tensors
    multi_query = kv_heads == 1 and not two_norms
    return {**_layer_norm_config(common), "ffn_hidden_size": common["intermediate_size"],
            "layer_norm_epsilon": meta("{arch}.attention.layer_norm_epsilon"), "alibi": False, "parallel_attn": True,
            "multi_query": multi_query, "new_decoder_architecture": not multi_query, "num_kv_heads": kv_heads,
            "num_ln_in_parallel_attn": None if multi_query else 2 if two_norms else 1,
            "bias": "blk.0.attn_qkv.bias" in tensors}


# llama.cpp's pooling_type enum, as kvserve's pooler names the ones it runs (0: none, 4: rank are not poolings of it).
GGUF_POOLING_TYPES = {1: "MEAN", 2: "CLS", 3: "LAST"}


def bert_config(common: dict, meta: Meta, tensors: dict) -> dict:
    """A BertModel's fields; ``gguf_pooling_type``: the sentence-transformers pooling llama.cpp's converter wrote
    (absent: the model's default)."""
    if meta("{arch}.attention.causal", False):
        raise ValueError("GGUF bert.attention.causal is true, and kvserve's BertModel attends both ways; allowed: "
                         "false or absent")
    keys = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "pad_token_id", "dtype")
    fields = {key: common[key] for key in keys}
    types = tensors.get("token_types.weight")   # absent: the weights' check names it
    fields.update(layer_norm_eps=meta("{arch}.attention.layer_norm_epsilon"),
                  type_vocab_size=meta("tokenizer.ggml.token_type_count", 2) if types is None else int(types.shape[1]))
    pooling = meta("{arch}.pooling_type")
    if pooling is not None:
        if pooling not in GGUF_POOLING_TYPES:
            allowed = ", ".join(f"{number} ({name.lower()})" for number, name in GGUF_POOLING_TYPES.items())
            raise ValueError(f"GGUF bert.pooling_type {pooling} is not a pooling kvserve runs; allowed: {allowed}, "
                             f"or absent")
        fields["gguf_pooling_type"] = GGUF_POOLING_TYPES[pooling]
    return fields
