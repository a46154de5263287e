"""Types that platform plugins return to the engine.

Static facts are dataclass fields; behaviour is a method. Everything here is
device-neutral: a platform fills these in with its own tensors and kernels.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass(frozen=True)
class PlatformInfo:
    """What a platform plugin reports about itself from ``platform_detect``.

    :param name: short name users select with ``KVSERVE_PLATFORM`` / ``--device``.
    :param device_type: the torch device type its tensors live on (``"cpu"``, ``"cuda"``, ...).
    :param priority: the highest-priority available platform is chosen by default.
    :param dist_backend: the torch.distributed backend for its communicator (``"gloo"``, ``"nccl"``, ...).
    :param supported_dtypes: model dtypes it can run.
    :param default_dtype: the dtype used when the user asks for ``"auto"`` and the checkpoint says nothing usable.
    :param unavailable_reason: empty when the hardware is present; otherwise why it cannot be used.
    :param details: free-form facts shown by ``kvserve plugins`` (device name, optional kernels found, ...).
    """

    name: str
    device_type: str
    priority: int = 0
    dist_backend: str = "gloo"
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    default_dtype: torch.dtype = torch.float32
    unavailable_reason: str = ""
    details: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return not self.unavailable_reason


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes, as the platform sees it now."""

    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class AttentionSpec:
    """What a model layer asks of an attention backend. Layers may differ in ``sliding_window`` and
    ``logits_soft_cap`` (Gemma 2 alternates windowed and global layers): the engine then makes one backend per
    distinct spec, all of one class, and they attend with the metadata that one of them builds."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    block_size: int
    sliding_window: int | None = None   # a query attends only to this many latest positions, its own included
    kv_cache_dtype: torch.dtype | None = None   # an FP8 type the cache holds (``--kv-cache-dtype``); None: dtype
    logits_soft_cap: float | None = None   # scores, scaled, become cap * tanh(score / cap) before the softmax

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype or self.dtype


@dataclass
class AttentionMetadata:
    """One step's batch layout, built once per step by the backend and passed to every layer.

    Sequences are ordered decodes first: the first ``num_decodes`` sequences have one query token.
    Tensors live on the device; the ``max_*`` and ``num_*`` fields are host integers.
    """

    positions: torch.Tensor         # [num_tokens] position of each new token in its sequence
    slot_mapping: torch.Tensor      # [num_tokens] cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor   # [num_seqs + 1] offsets of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor          # [num_seqs] tokens in context after this step, new ones included
    block_tables: torch.Tensor      # [num_seqs, max_blocks] physical block ids, padded with 0
    num_decodes: int
    max_query_len: int
    max_seq_len: int


@dataclass
class StepLayout:
    """The host-side description of a step from which a backend builds its metadata."""

    query_lens: list[int]           # new tokens of each sequence this step
    seq_lens: list[int]             # tokens in context after this step
    block_tables: list[list[int]]
    num_decodes: int


class AttentionBackend(ABC):
    """Paged attention for one platform: stores new keys/values in the cache and attends over it."""

    name: ClassVar[str]
    # The FP8 types this backend can keep its cache in besides the model dtype; it is handed such a cache (and
    # ``kv_scales`` with it) only when it names the type here.
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    # Whether it caps scores as ``spec.logits_soft_cap`` says; it is handed a spec with a cap only when it does.
    soft_caps_logits: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        """Every reason this backend cannot run ``spec``; empty when it can."""

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor; index 0 selects keys (0) or values (1)."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def __init__(self, spec: AttentionSpec, device: torch.device):
        self.spec = spec
        self.device = device

    def build_metadata(self, layout: StepLayout) -> AttentionMetadata:
        """Turn the host-side layout into device tensors, once per step. Every layer attends with what this
        returns, so it may not depend on ``spec.sliding_window`` or ``spec.logits_soft_cap``, in which layers
        differ."""
        max_blocks = max((len(t) for t in layout.block_tables), default=0)
        tables = [t + [0] * (max_blocks - len(t)) for t in layout.block_tables]
        as_tensor = lambda data: torch.tensor(data, dtype=torch.int64, device=self.device)  # noqa: E731
        query_lens, seq_lens = as_tensor(layout.query_lens), as_tensor(layout.seq_lens)
        block_tables = as_tensor(tables).view(len(tables), max_blocks)
        query_start_loc = torch.nn.functional.pad(query_lens.cumsum(0), (1, 0))
        num_tokens = sum(layout.query_lens)
        seq_of_token = torch.repeat_interleave(torch.arange(len(tables), device=self.device), query_lens,
                                               output_size=num_tokens)
        positions = (torch.arange(num_tokens, device=self.device) - query_start_loc[seq_of_token]
                     + (seq_lens - query_lens)[seq_of_token])
        block_size = self.spec.block_size
        slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        return AttentionMetadata(
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            num_decodes=layout.num_decodes,
            max_query_len=max(layout.query_lens, default=0),
            max_seq_len=max(layout.seq_lens, default=0),
        )

    def copy_blocks(self, source: torch.Tensor, destination: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks, every layer's, from ``source`` to ``destination`` (each [layers, *kv_cache_shape];
        the same tensor for copy-on-write, a host and a device cache for swapping), one (from, to) per pair.
        The default suits layouts whose first dimension after keys/values counts blocks."""
        from_ids = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=source.device)
        to_ids = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=destination.device)
        destination[:, :, to_ids] = source[:, :, from_ids].to(destination.device)

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """Write ``key``/``value`` ([tokens, kv_heads, head]) into ``kv_cache`` at ``metadata.slot_mapping``,
        then attend causally from ``query`` ([tokens, heads, head]) over each sequence's cached context.
        Returns [tokens, heads, head]. An FP8 cache (``spec.kv_cache_dtype``) stores each key as fp8(key /
        kv_scales[0]), saturated at the type's largest value, and each value likewise with kv_scales[1]; what is
        read back is multiplied by its scale. ``kv_scales`` is passed only with such a cache."""


class GraphRunner(ABC):
    """Replays captured device graphs for the shapes it captured; the engine runs eagerly otherwise."""

    @abstractmethod
    def can_run(self, metadata: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step's shape has a captured graph."""

    @abstractmethod
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Run the model for this step through a captured graph; returns hidden states."""


class Communicator(ABC):
    """Collectives between the ranks of one model replica."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim``."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank ``src``'s ``tensor`` to every rank."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""


# The weight-only integer schemes in groups of inputs (see QuantizedWeight) and their levels' bits.
GROUPED_BITS = {"w4a16_int4": 4, "w8a16_int8": 8}


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear layer's weight in a quantization scheme, laid out by ``kvserve.core.quantization``.

    Schemes and their tensors:

    - ``"w8a8_int8"``: ``qweight`` int8 ``[out, in]`` and ``scale`` float32 ``[out]`` (weight = qweight * scale);
      activations are quantized per token at run time, symmetric with scale ``max|x| / 127``, and the product's
      integer sums are scaled by both scales.
    - ``"w4a16_int4"``: ``qweight`` uint8 ``[out, in]`` of values 0-15, and per group of ``group_size`` inputs
      (input k in group k // group_size, the last group possibly shorter) ``scale`` ``[out, groups]`` (float16,
      float32 for GGUF K-quants, or the float dtype a compressed-tensors checkpoint stores) and either ``offset``
      of the scale's dtype (weight = qweight * scale + offset: online int4, GGUF) or ``zero`` integer zero points (weight = (qweight - zero) * scale: GPTQ,
      AWQ, compressed-tensors); with ``g_idx`` int ``[in]``, input k is in group g_idx[k] instead (GPTQ's
      act-order). Activations stay in the model dtype.
    - ``"w8a16_int8"``: the same with values 0-255 (8-bit GPTQ, compressed-tensors W8A16, GGUF Q8_0).
    - ``"w8a8_fp8"``: ``weight`` float8_e4m3fn ``[out, in]`` and ``scale`` float32, ``[out]`` or ``[out, ceil(in /
      group_size)]`` (weight = weight * scale); activations are quantized to e4m3 at run time, with the static
      ``input_scale`` float32 ``[]`` if there is one, else per token (or per group of ``group_size`` inputs) with
      scale ``max|x| / 448``, and the products summed in float32. ``"w8a16_fp8"``: the same weights, activations
      in the model dtype.
    """

    scheme: str
    tensors: dict[str, torch.Tensor]
    shape: tuple[int, int]   # [out, in] of the weight it stands for
    group_size: int | None = None   # inputs that share a scale, for grouped schemes
    dtype: torch.dtype | None = None   # the model dtype: what the layer's inputs and outputs are

    def input_order(self) -> tuple[torch.Tensor | None, bool]:
        """(the order that gathers act-order inputs (``g_idx``) into whole groups in turn, or None without
        ``g_idx``; whether that order exists: False for groups of unequal sizes), for kernels that take groups of
        consecutive inputs."""
        if "g_idx" not in self.tensors:
            return None, True
        g_idx = self.tensors["g_idx"]
        order = torch.argsort(g_idx, stable=True)
        return order, torch.equal(g_idx[order].long().cpu(), torch.arange(self.shape[1]) // self.group_size)
