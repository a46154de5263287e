"""The kvserve plugin contract.

Platform plugins (entry-point group ``kvserve.platforms``) implement the ``platform_*`` hooks;
only the selected platform's implementations are called, except ``platform_detect``, which
every platform answers. General plugins (group ``kvserve.plugins``) add models, tool call parsers and reasoning
parsers; their ``register_*`` results are merged with every other plugin's.

Hooks are grouped by phase: detection, configuration, execution resources, registration.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from kvserve.core.config import EngineConfig
    from kvserve.core.entrypoints.openai.reasoning_parsers import ReasoningParser
    from kvserve.core.entrypoints.openai.tool_parsers import ToolParser
    from kvserve.plugins.interfaces import (AttentionBackend, AttentionSpec, Communicator, GraphRunner,
                                            MemoryInfo, PlatformInfo, QuantizedWeight)

PROJECT = "kvserve"
# The contract this kvserve implements, and those whose plugins it still runs (docs/plugins.md's changelog says
# what each changed). Each plugin says which it was built for in its attribute KVSERVE_CONTRACT_VERSION.
CONTRACT_VERSION = 3
SUPPORTED_CONTRACT_VERSIONS = (1, 2, 3)
DECLARATION = "KVSERVE_CONTRACT_VERSION"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- detection ---------------------------------------------------------------

@hookspec
def platform_detect() -> PlatformInfo | None:
    """Say whether this platform's hardware is present, without starting the device.

    Called on every platform plugin when the engine starts. Keep it cheap: import heavy
    vendor modules inside the body, and report absence through
    ``PlatformInfo.unavailable_reason`` rather than raising.

    :return: this platform's facts, or None if the plugin is not a platform.
    """


# -- configuration -----------------------------------------------------------

@hookspec(firstresult=True)
def platform_bind_device(local_index: int) -> torch.device | None:
    """Take device ``local_index`` of this machine for this process, and return it; the engine then allocates
    its model and KV cache there. Called once per process, before ``platform_update_config``. Optional: without
    it (or given None) the process uses ``torch.device(PlatformInfo.device_type)``.

    :param local_index: this process's place among the engine's processes on this machine: 0 for one engine,
        else the data-parallel replica's index times its ranks (tensor × pipeline parallel), plus the rank.
        Raise ValueError saying how many devices there are when there are too few.
    """


@hookspec(firstresult=True)
def platform_update_config(config: EngineConfig) -> None:
    """Validate and adjust the engine configuration for this platform before anything is built.

    Fill in platform defaults (for instance the KV cache memory budget) and raise ValueError
    naming the field and its allowed values when the platform cannot honour a setting.

    :param config: the engine configuration, modified in place.
    """


@hookspec(firstresult=True)
def platform_memory_info(device: torch.device) -> MemoryInfo:
    """Report total and free memory of ``device`` in bytes, used to size the KV cache.

    :param device: the device the engine runs on.
    """


# -- execution resources -----------------------------------------------------

@hookspec(firstresult=True)
def platform_attention_backend(spec: AttentionSpec) -> type[AttentionBackend]:
    """Choose the attention backend class for a model's attention shape.

    Raise ValueError listing every candidate backend and why it cannot run ``spec`` when
    none can.

    :param spec: head counts, head size, dtype, block size and sliding window of the model.
    """


@hookspec(firstresult=True)
def platform_graph_runner(model: torch.nn.Module, backend: AttentionBackend,
                          config: EngineConfig) -> GraphRunner | None:
    """Capture the model into device graphs for replay, or return None to run eagerly.

    :param model: the loaded model.
    :param backend: the attention backend instance the model uses.
    :param config: the engine configuration (``enforce_eager`` asks for None).
    """


@hookspec(firstresult=True)
def platform_communicator(rank: int, world_size: int, group: Any) -> Communicator:
    """Build the communicator for collectives between the tensor-parallel ranks of one pipeline stage.

    :param rank: this process's rank in the group.
    :param world_size: the number of ranks in the group.
    :param group: the ``torch.distributed`` process group of those ranks; None: the default group (every rank
        of the replica). With pipeline parallelism each stage's ranks are a group of their own, and collectives
        over another group would wait for ranks that never join them.
    """


@hookspec(firstresult=True)
def platform_ops() -> dict[str, Callable[..., Any]]:
    """Return fused implementations of named ops that replace the torch references in
    ``kvserve.core.layers.ops`` (``rms_norm``, ``add_rms_norm``, ``silu_and_mul``, ``gelu_tanh_and_mul``,
    ``rotary_embedding``, ``argmax``, ``fused_moe``). Names not returned keep the reference; unknown names are an
    error.
    """


@hookspec(firstresult=True)
def platform_linear_kernel(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """Prepare a faster matmul for one loaded, unquantized linear weight ([out, in], in the model dtype), such as
    the weight repacked into the blocked layout the device's matmul library prefers. Called once per linear
    layer after loading; the layer then calls ``kernel(x, bias)`` for ``x @ weight.T + bias`` (bias may be None)
    and drops its own reference to ``weight``, so the kernel keeps whatever it needs. With LoRA on, also called
    for each layer's stacked adapters (small, often thin matrices), again whenever a step brings new adapters
    into the device's slots. Return None to keep torch's linear. Optional.

    :param weight: the layer's weight on the platform's device.
    """


@hookspec(firstresult=True)
def platform_gate_up_kernel(
        weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """Prepare a gated MLP's gate-up projection fused with its activation: ``weight`` is [gate; up] ([2 * I, in],
    unquantized, in the model dtype), and ``kernel(x, bias)`` returns ``silu(x @ gate.T + b_gate) * (x @ up.T +
    b_up)``, [..., I], rounded as ``platform_linear_kernel``'s matmul followed by the ``silu_and_mul`` op would
    round it. Called once per gate-up layer instead of ``platform_linear_kernel``; the layer drops its weight.
    Return None for the matmul of ``platform_linear_kernel`` and then ``silu_and_mul``. Optional.

    :param weight: the layer's weight on the platform's device.
    """


@hookspec(firstresult=True)
def platform_quant_kernel(
        weight: QuantizedWeight) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """Prepare a matmul for one quantized linear weight, called once per quantized layer after loading; the layer
    then calls ``kernel(x, bias)`` for ``x @ W.T + bias`` in the scheme's arithmetic (see ``QuantizedWeight``).
    Return None to run the portable reference of ``kvserve.core.quantization`` (dequantize, then matmul), and raise
    ValueError naming the scheme when this platform cannot run it at all. Optional.

    :param weight: the scheme, its tensors on the platform's device, and the weight's [out, in] shape.
    """


@hookspec(firstresult=True)
def platform_seed(seed: int) -> None:
    """Seed every random generator of this platform's devices.

    :param seed: the engine seed.
    """


@hookspec(firstresult=True)
def platform_synchronize(device: torch.device) -> None:
    """Block until all work queued on ``device`` has finished.

    :param device: the device the engine runs on.
    """


# -- registration (merged from every plugin) ---------------------------------

@hookspec
def register_models() -> dict[str, type[torch.nn.Module]]:
    """Add model classes, keyed by the Hugging Face ``architectures`` name they implement.

    A name already registered by kvserve or another plugin is an error.
    """


@hookspec
def register_tool_parsers() -> dict[str, type[ToolParser]]:
    """Add tool call parsers, keyed by the name ``--tool-call-parser`` selects them with: subclasses of
    ``kvserve.core.entrypoints.openai.tool_parsers.ToolParser`` that turn a model's generated text into OpenAI
    tool calls and content, whole or streamed.

    A name already registered by kvserve or another plugin is an error.

    :return: parser classes by name.
    """


@hookspec
def register_reasoning_parsers() -> dict[str, type[ReasoningParser]]:
    """Add reasoning parsers, keyed by the name ``--reasoning-parser`` selects them with: subclasses of
    ``kvserve.core.entrypoints.openai.reasoning_parsers.ReasoningParser`` that split a response into the model's
    reasoning and its answer.

    A name already registered by kvserve or another plugin is an error.

    :return: parser classes by name.
    """
