"""A model on the platform's device, its weights loaded and its linear layers on the platform's kernels, and the
attention backend its layers run on: what the target model and a draft model are each built from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm import tqdm

from kvserve.core.config import EngineConfig
from kvserve.core.engine.kv_cache import check_cache_dtype
from kvserve.core.layers.attention import Attention
from kvserve.core.layers.linear import use_platform_kernels
from kvserve.core.layers.ops import Ops
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.loader.weights import fill_random, load_weights
from kvserve.core.quantization.online import gate_up_kernel_factory, kernel_factory
from kvserve.plugins.backend_choice import soft_cap_reasons
from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, GraphRunner
from kvserve.plugins.manager import Platform
from kvserve.plugins.stages import log_after, stage


def choose_dtype(config: EngineConfig, checkpoint: Checkpoint, platform: Platform) -> torch.dtype:
    info = platform.info
    requested = config.model.torch_dtype
    if requested is not None:
        if requested not in info.supported_dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in info.supported_dtypes)
            raise ValueError(f"dtype {requested} is not supported by platform {info.name!r}; allowed: {allowed}")
        return requested
    native = None if checkpoint.is_gguf else getattr(checkpoint.hf_config, "dtype", None)
    if isinstance(native, str):
        native = getattr(torch, native, None)
    return native if native in info.supported_dtypes else info.default_dtype


@dataclass
class BuiltModel:
    model: torch.nn.Module
    layers: list[Attention]   # its attention layers, in order
    spec: AttentionSpec   # the model's: its layers', with the window and cap where they all have the same
    backend: AttentionBackend   # the model's, which builds each step's metadata
    layer_backends: list[AttentionBackend]   # each layer's, of one class: one per distinct layer spec
    weight_bytes: int = 0   # its weights as loaded (this rank's share), before platform kernels repack them
    graph_runner: GraphRunner | None = None   # set once its KV cache is bound

    def bind(self, kv_cache: torch.Tensor) -> None:
        """Give each attention layer its backend and its part of ``kv_cache`` [layers, ...]."""
        for layer, backend, layer_cache in zip(self.layers, self.layer_backends, kv_cache):
            layer.backend, layer.kv_cache = backend, layer_cache

    def forward(self, input_ids: torch.Tensor, metadata: AttentionMetadata, intermediate: tuple = ()):
        """A step's hidden states, through a captured graph where the platform has one for its shape. A pipeline
        stage after the first starts from the ``intermediate`` (hidden, residual) the one before it handed on,
        and one before the last returns its own."""
        if intermediate:
            return self.model(input_ids, metadata.positions, metadata, intermediate)
        if self.graph_runner is not None and self.graph_runner.can_run(metadata, len(input_ids)):
            return self.graph_runner.run(input_ids, metadata.positions, metadata)
        return self.model(input_ids, metadata.positions, metadata)


def build_model(config: EngineConfig, platform: Platform, checkpoint: Checkpoint, model_cls: type, ops: Ops,
                dtype: torch.dtype, quantization: str | None, group_size: int | None,
                weights: Iterable[tuple[str, torch.Tensor]] | None = None) -> BuiltModel:
    """``weights``: the checkpoint's, read already, in place of reading them again."""
    with torch.device("meta"):   # no time spent initializing weights the checkpoint replaces
        model = model_cls(checkpoint.hf_config, ops)
    model.to_empty(device=platform.device)
    getattr(model, "tie_weights", lambda: None)()
    if config.model.load_format == "dummy":
        fill_random(model, config.model.seed)
    else:
        with stage("reading the weights"):
            tensors = checkpoint.weights(quantization) if weights is None else weights
            load_weights(model, tqdm(tensors, desc="reading weights", unit=" tensors", delay=log_after()))
    model = model.to(dtype).eval()
    weight_bytes = loaded_weight_bytes(model)
    online = checkpoint.own_quantization is None
    with stage("preparing the weights for the platform's kernels"):
        # LoRA adds to the gate and up outputs before the activation, which a fused gate-up kernel applies itself.
        gate_up = (gate_up_kernel_factory(quantization, platform, online) if not config.lora.enable_lora
                   else lambda name, weight: None)
        use_platform_kernels(model, kernel_factory(quantization, platform, dtype, online, group_size), gate_up)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    layer_specs = [AttentionSpec(layer.num_heads, layer.num_kv_heads, layer.head_size, dtype, config.cache.block_size,
                                 layer.sliding_window, config.cache.torch_cache_dtype, layer.logits_soft_cap)
                   for layer in layers]
    # A pipeline stage holds some of the layers; a model whose layers' windows differ lists them all.
    windows = set(getattr(model, "layer_windows", [s.sliding_window for s in layer_specs]))
    caps = {s.logits_soft_cap for s in layer_specs}
    spec = dataclasses.replace(layer_specs[0], sliding_window=windows.pop() if len(windows) == 1 else None,
                               logits_soft_cap=caps.pop() if len(caps) == 1 else None)
    backend_cls = backend_for_layers(platform, list(dict.fromkeys(layer_specs)))
    check_cache_dtype(backend_cls, spec, platform)
    backends = {s: backend_cls(s, platform.device) for s in dict.fromkeys([spec, *layer_specs])}
    return BuiltModel(model, layers, spec, backends[spec], [backends[s] for s in layer_specs], weight_bytes)


def backend_for_layers(platform: Platform, specs: list[AttentionSpec]) -> type[AttentionBackend]:
    """The backend class the platform chooses for the layers' distinct specs: one that runs them all (its cache
    type is checked apart)."""
    def reasons(backend_cls: type[AttentionBackend]) -> list[str]:
        return list(dict.fromkeys(r for spec in specs
                                  for r in backend_cls.unsupported_reasons(spec) + soft_cap_reasons(backend_cls, spec)))

    chosen = list(dict.fromkeys(platform.attention_backend(spec) for spec in specs))
    for backend_cls in chosen:
        if not reasons(backend_cls):
            return backend_cls
    detail = "; ".join(f"{cls.name}: {', '.join(reasons(cls))}" for cls in chosen)
    raise ValueError(f"no attention backend runs every layer of this model ({detail})")


def loaded_weight_bytes(model: torch.nn.Module) -> int:
    """The float parameters' bytes and those of the quantized layers' tensors."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        quantized = getattr(module, "quantized", None)
        if quantized is not None:
            total += sum(t.numel() * t.element_size() for t in quantized.tensors.values())
    return total
