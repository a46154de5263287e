"""The transformers fallback: a causal LM that kvserve has no native file for runs transformers' own modeling code,
with kvserve's paged KV cache and attention backends in place of transformers' attention (vLLM's transformers
backend does the same). transformers' attention interface takes a function by name (``attn_implementation``);
each attention module calls it with its queries, keys and values, rotary applied, and the keyword arguments of
the model's forward, through which the step's own handler (its attention metadata and kvserve's layers) arrives.
A name that transformers' mask interface does not know builds no N x N mask: kvserve's backends mask causally."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kvserve.core.layers.attention import Attention
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.rotary import rope_parameters
from kvserve.plugins.interfaces import AttentionMetadata

ATTENTION_IMPLEMENTATION = "kvserve"
# transformers recomputes these rotations from each call's longest position; a KV cache shared over steps cannot.
PER_CALL_ROPE_TYPES = ("dynamic", "longrope")


def transformers_architecture(hf_config) -> str | None:
    """The config's architecture where it is the causal LM that transformers builds for its ``model_type``."""
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", None))
    return name if name in (getattr(hf_config, "architectures", None) or []) else None


def check_engine_config(config, hf_config) -> None:
    """Refuse, before any work, the engine options that the transformers implementation does not run."""
    what = f"the transformers implementation of {transformers_architecture(hf_config)}"
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(config.parallel, name) != 1:
            raise ValueError(f"{name}={getattr(config.parallel, name)}: {what} does not split over ranks or "
                             f"stages; use 1")
    if config.model.quantization is not None:
        raise ValueError(f"quantization={config.model.quantization!r}: {what} runs unquantized weights only; "
                         f"use None, or a model kvserve implements natively")
    if get_checkpoint_conversion_mapping(hf_config.model_type):
        raise ValueError(f"{what}: transformers converts {hf_config.model_type} checkpoints' weights as it loads "
                         f"them (fused experts, renamed tensors), which kvserve's loader does not do")
    rope_type = rope_parameters(hf_config)["rope_type"]
    if rope_type in PER_CALL_ROPE_TYPES:
        raise ValueError(f"{what}: rope_type={rope_type!r} rotates by each call's longest position in transformers' "
                         f"code, which keys cached over steps cannot follow; supported with model_impl='native' "
                         f"where kvserve has the architecture")


def _attention_interface(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, *, kvserve_attention=None, **options):
    """What every attention module calls: the handler that the forward passed in ``kvserve_attention``."""
    if kvserve_attention is None:
        raise ValueError(f"{type(module).__name__} does not pass its model's keyword arguments on to its attention, "
                         f"which the transformers implementation needs")
    return kvserve_attention(module, query, key, value, attention_mask, **options)


AttentionInterface.register(ATTENTION_IMPLEMENTATION, _attention_interface)


@dataclass
class AttentionCall:
    """One attention module's call, as a trial forward on the meta device shows it."""

    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    sliding_window: int | None
    soft_cap: float | None


def _record_call(calls: list[AttentionCall], module, query, key, value, attention_mask, scaling=None,
                 sliding_window=None, is_causal=None, softcap=None, s_aux=None, **_):
    """Note a call's shapes and options, refusing those that kvserve's paged causal attention does not compute."""
    name = type(module).__name__
    reasons = [reason for reason, bad in (
        ("builds its own attention mask", attention_mask is not None),
        ("is not causal", is_causal is False or getattr(module, "is_causal", True) is False),
        ("attends to other states than its own (cross-attention)", key.shape[2] != query.shape[2]),
        ("has keys or values of another head size than its queries'",
         not query.shape[-1] == key.shape[-1] == value.shape[-1]),
        ("has attention sinks (s_aux)", s_aux is not None)) if bad]
    if reasons:
        raise ValueError(f"the transformers implementation cannot run {name}: it {', and '.join(reasons)}")
    head_size = query.shape[-1]
    calls.append(AttentionCall(module, query.shape[1], key.shape[1], head_size,
                               head_size ** -0.5 if scaling is None else float(scaling), sliding_window,
                               None if softcap is None else float(softcap)))
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], head_size), None


def _attend_paged(layers: dict[nn.Module, Attention], metadata: AttentionMetadata, module, query, key, value,
                  attention_mask, **_):
    """A module's attention through its kvserve layer: [1, heads, tokens, head_size] in, [1, tokens, heads,
    head_size] out, as transformers' attention functions return it."""
    attention, tokens = layers[module], query.shape[2]
    q, k, v = (x[0].transpose(0, 1).reshape(tokens, -1) for x in (query, key, value))
    return attention(q, k, v, metadata).view(1, tokens, attention.num_heads, attention.head_size), None


class TransformersForCausalLM(nn.Module):
    """A causal LM of transformers' with kvserve's interface: its modules are this module's children under
    transformers' names (the checkpoint's), and one kvserve Attention layer per attention module, which the model
    runner binds to the backend and the KV cache."""

    packed_modules_mapping: dict = {}
    supports_pipeline_parallel = False

    def __init__(self, config, ops: Ops):
        super().__init__()
        config = copy.deepcopy(config)   # transformers sets its attention implementation on the config
        self.architecture = transformers_architecture(config)
        causal_lm = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_IMPLEMENTATION)
        if not type(causal_lm).is_backend_compatible():
            raise ValueError(f"transformers' {self.architecture} does not take an attention implementation from "
                             f"outside transformers (_supports_attention_backend), which the transformers "
                             f"implementation needs")
        # transformers' model object, for its own weight tying and buffer initialization; kept out of the module
        # tree, where its modules already are (as this module's children).
        self.__dict__["transformers_model"] = causal_lm
        for name, child in causal_lm.named_children():
            self.add_module(name, child)
        self.body_name = causal_lm.base_model_prefix
        self.head_name = next((name for name, child in causal_lm.named_children()
                               if child is causal_lm.get_output_embeddings()), None)
        if self.head_name is None:
            raise ValueError(f"transformers' {self.architecture} has no output head among its modules")
        text_config = config.get_text_config()
        self.tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        # What transformers' causal LMs do to the head's output (Cohere, Granite, Gemma 2).
        self.logits_multiplier = (getattr(text_config, "logit_scale", 1.0)
                                  / getattr(text_config, "logits_scaling", 1.0))
        self.logits_softcap = getattr(text_config, "final_logit_softcapping", None)
        calls = self._trial_forward()
        if len(calls) != text_config.num_hidden_layers:
            raise ValueError(f"transformers' {self.architecture} calls attention in {len(calls)} of its "
                             f"{text_config.num_hidden_layers} layers: the others keep state (recurrent, "
                             f"convolution or state-space layers) that the transformers implementation does not cache")
        for field in ("num_heads", "num_kv_heads", "head_size"):
            if len({getattr(call, field) for call in calls}) > 1:
                raise ValueError(f"transformers' {self.architecture} has layers of different {field} "
                                 f"({sorted({str(getattr(call, field)) for call in calls})}), which the "
                                 f"transformers implementation does not run")
        self.attention_layers = nn.ModuleList(
            Attention(call.num_heads, call.num_kv_heads, call.head_size, call.scale, call.sliding_window,
                      call.soft_cap) for call in calls)
        self.attention_of = {call.module: layer for call, layer in zip(calls, self.attention_layers)}

    @property
    def body(self) -> nn.Module:
        return getattr(self, self.body_name)

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    def _trial_forward(self) -> list[AttentionCall]:
        """Run two tokens through the model (on the meta device, where it is built) to see which modules call
        attention, and how."""
        calls: list[AttentionCall] = []
        device = self.body.get_input_embeddings().weight.device
        try:
            with torch.no_grad():
                self.body(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                          position_ids=torch.arange(2, device=device)[None], use_cache=False,
                          kvserve_attention=partial(_record_call, calls))
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise ValueError(f"transformers' {self.architecture} fails the trial forward through which the "
                             f"transformers implementation finds its attention: {exc}") from exc
        return calls

    def to_empty(self, *, device, recurse: bool = True):
        """Materialized, with the buffers transformers computes rather than loads (rotary frequencies) computed
        again as transformers computes them after building on the meta device: to_empty leaves them unset."""
        super().to_empty(device=device, recurse=recurse)
        with torch.no_grad():
            for module in self.modules():
                if module._non_persistent_buffers_set:
                    self.transformers_model._init_weights(module)
        return self

    def tie_weights(self) -> None:
        """Share the embedding with the head again (where the config ties them): to_empty unties them."""
        self.transformers_model.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate=None) -> torch.Tensor:
        # The step's sequences, flattened, as one batch row: the backend's metadata tells them apart.
        out = self.body(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                        kvserve_attention=partial(_attend_paged, self.attention_of, metadata))
        return out[0][0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.logits_multiplier != 1.0:
            logits = logits * self.logits_multiplier
        if self.logits_softcap is not None:
            logits = torch.tanh(logits / self.logits_softcap) * self.logits_softcap
        return logits
