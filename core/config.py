"""Engine configuration: plain dataclasses that validate themselves on construction."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from kvserve.core.engine.speculation import SpeculativeConfig
from kvserve.core.quantization import METHODS as QUANTIZATION_METHODS
from kvserve.core.quantization.int4 import GROUP_SIZES as INT4_GROUP_SIZES
from kvserve.core.structured_outputs.backends import BACKENDS as STRUCTURED_OUTPUTS_BACKENDS

DTYPES = {"auto": None, "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
# "auto": the model dtype; the FP8 ones store fp8(x / scale) with each layer's checkpoint scales, else 1.0 (vLLM's)
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}
PREEMPTION_MODES = ("recompute", "swap")
EXECUTOR_BACKENDS = ("mp", "ray")
LOAD_FORMATS = ("auto", "dummy")   # dummy: random weights of the checkpoint's shapes, for benchmarks
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def check_int(name: str, value: Any, low: int, high: int | None = None, allow_none: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int in [low, high]."""
    if value is None and allow_none:
        return
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {bound}, got {value}")


def parse_size(name: str, value: int | str) -> int:
    """Bytes from an int or a string like '4GiB', '512 MiB', '2G'."""
    if isinstance(value, int) and not isinstance(value, bool):
        check_int(name, value, 1)
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{name} must be a byte count like 4GiB, 512MiB or 1073741824, got {value!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    check_int(name, size, 1)
    return size


def parse_gib(name: str, value: float | str) -> int:
    """Bytes from a number of GiB (vLLM's unit for swap_space) or a size string like '512MiB'."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        number = float(value)
    if number is None:
        return parse_size(name, value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{name} must be a number of GiB >= 0 or a size like 512MiB, got {value!r}")
    return int(number * (1 << 30))


def resolve_dtype(value: str | torch.dtype) -> torch.dtype | None:
    """A torch dtype for a user's dtype name; None for 'auto'."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"dtype {value} is not supported; allowed: {', '.join(DTYPES)}")
        return value
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


@dataclass
class ModelConfig:
    model: str | None = None            # None: the default model (SmolLM2-135M-Instruct GGUF)
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    seed: int = 0
    quantization: str | None = None
    chat_template: str | None = None
    load_format: str = "auto"
    quantization_group_size: int | None = None   # online int4's inputs per group; None: its default, 32

    def __post_init__(self):
        self.torch_dtype = resolve_dtype(self.dtype)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        check_int("max_model_len", self.max_model_len, 1, allow_none=True)
        check_int("seed", self.seed, 0)
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization {self.quantization!r} is not supported yet; allowed: None, "
                             f"{', '.join(map(repr, QUANTIZATION_METHODS))}")
        if self.quantization_group_size is not None:
            if self.quantization != "int4":
                raise ValueError(f"quantization_group_size applies to quantization='int4' (online int4), not to "
                                 f"quantization={self.quantization!r}")
            if self.quantization_group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                                 f"got {self.quantization_group_size!r}")


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | str | None = None   # None: the platform's default budget
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"     # or "swap", on platforms with device memory
    swap_space: float | str = 4             # GiB (or a size string) of host memory for swapped-out blocks
    cache_dtype: str = "auto"               # one of KV_CACHE_DTYPES
    calculate_kv_scales: bool = False       # an FP8 cache's scales from the first batch's keys and values

    def __post_init__(self):
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.cache_dtype!r}")
        self.torch_cache_dtype = KV_CACHE_DTYPES[self.cache_dtype]
        if not isinstance(self.calculate_kv_scales, bool):
            raise ValueError(f"calculate_kv_scales must be True or False, got {self.calculate_kv_scales!r}")
        if self.calculate_kv_scales and self.torch_cache_dtype is None:
            fp8 = ", ".join(repr(name) for name, dtype in KV_CACHE_DTYPES.items() if dtype is not None)
            raise ValueError(f"calculate_kv_scales applies to an FP8 KV cache (kv_cache_dtype {fp8}), not to "
                             f"kv_cache_dtype={self.cache_dtype!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size!r}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size("kv_cache_memory", self.kv_cache_memory)
        check_int("num_gpu_blocks_override", self.num_gpu_blocks_override, 1, allow_none=True)
        self.swap_space = parse_gib("swap_space", self.swap_space)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None   # None: 2048, or max_model_len without chunked prefill
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        check_int("max_num_seqs", self.max_num_seqs, 1)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, allow_none=True)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False   # split mixture-of-experts layers by experts over the ranks
    distributed_executor_backend: str = "mp"   # where ranks 1.. run: spawned processes, or Ray actors
    data_parallel_rank: int = 0   # which replica this engine is, as the data-parallel front numbers them

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            check_int(name, getattr(self, name), 1)
        check_int("data_parallel_rank", self.data_parallel_rank, 0)
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, got "
                             f"{self.distributed_executor_backend!r}")


@dataclass
class DeviceConfig:
    device: str | None = None           # a platform name; None: KVSERVE_PLATFORM or the best available
    enforce_eager: bool = False


@dataclass
class StructuredOutputsConfig:
    backend: str = "auto"               # auto: xgrammar, or llguidance where xgrammar cannot compile a constraint
    max_bytes: int = 64 * 1024          # the largest constraint (schema, regex, grammar text) a request may send
    compile_timeout: float = 10.0       # seconds a request may wait for its constraint to compile
    reasoning_parser: str | None = None  # constraints start after the reasoning this parser finds (deepseek_r1, ...)

    def __post_init__(self):
        if self.backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, "
                             f"got {self.backend!r}")
        check_int("structured_outputs_max_bytes", self.max_bytes, 1)
        if isinstance(self.compile_timeout, bool) or not isinstance(self.compile_timeout, (int, float)) or \
                not 0 < self.compile_timeout < float("inf"):
            raise ValueError(f"structured_outputs_compile_timeout must be a number of seconds > 0, got "
                             f"{self.compile_timeout!r}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    speculative_config: dict | None = None
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)

    def __post_init__(self):
        self.speculation = (None if self.speculative_config is None else
                            SpeculativeConfig.from_dict(self.speculative_config))

    def finalize(self, model_max_len: int) -> None:
        """Fill in limits that depend on the loaded model."""
        model_cfg, sched = self.model, self.scheduler
        if model_cfg.max_model_len is None:
            model_cfg.max_model_len = model_max_len
        elif model_cfg.max_model_len > model_max_len:
            raise ValueError(f"max_model_len={model_cfg.max_model_len} exceeds the model's context "
                             f"length {model_max_len}; allowed: 1..{model_max_len}")
        if sched.max_num_batched_tokens is None:
            sched.max_num_batched_tokens = 2048 if sched.enable_chunked_prefill else max(2048, model_cfg.max_model_len)
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < model_cfg.max_model_len:
            raise ValueError(f"max_num_batched_tokens={sched.max_num_batched_tokens} is smaller than "
                             f"max_model_len={model_cfg.max_model_len}; without chunked prefill a whole prompt "
                             "must fit in one step: raise max_num_batched_tokens or enable chunked prefill")
        if sched.max_num_batched_tokens < sched.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={sched.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={sched.max_num_seqs}, so every running sequence can decode each step")


def build_engine_config(model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                        max_model_len: int | None = None, max_num_seqs: int = 128,
                        max_num_batched_tokens: int | None = None, seed: int = 0,
                        enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                        preemption_mode: str = "recompute", swap_space: float | str = 4,
                        num_gpu_blocks_override: int | None = None, quantization: str | None = None,
                        tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                        speculative_config: dict | None = None, block_size: int = 16,
                        kv_cache_memory: int | str | None = None, device: str | None = None,
                        enforce_eager: bool = False, chat_template: str | None = None,
                        load_format: str = "auto", quantization_group_size: int | None = None,
                        kv_cache_dtype: str = "auto", calculate_kv_scales: bool = False,
                        enable_expert_parallel: bool = False,
                        distributed_executor_backend: str = "mp", structured_outputs_backend: str = "auto",
                        structured_outputs_max_bytes: int = 64 * 1024,
                        structured_outputs_compile_timeout: float = 10.0,
                        reasoning_parser: str | None = None) -> EngineConfig:
    """An EngineConfig from the flat keyword arguments that ``LLM(...)`` and the command line take (vLLM's names)."""
    return EngineConfig(
        model=ModelConfig(model, tokenizer, dtype, max_model_len, seed, quantization, chat_template, load_format,
                          quantization_group_size),
        cache=CacheConfig(block_size, kv_cache_memory, num_gpu_blocks_override, enable_prefix_caching,
                          preemption_mode, swap_space, kv_cache_dtype, calculate_kv_scales),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill),
        parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size, data_parallel_size,
                                enable_expert_parallel, distributed_executor_backend),
        device=DeviceConfig(device, enforce_eager),
        speculative_config=speculative_config,
        structured_outputs=StructuredOutputsConfig(structured_outputs_backend, structured_outputs_max_bytes,
                                                   structured_outputs_compile_timeout, reasoning_parser),
    )
