"""Engine configuration: plain dataclasses that validate themselves on construction."""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields

import torch

from kvserve.core.engine.speculation import SpeculativeConfig
from kvserve.core.options import Option, check_int, class_options, option, parse_gib, parse_size
from kvserve.core.quantization import METHODS as QUANTIZATION_METHODS
from kvserve.core.quantization.int4 import GROUP_SIZES as INT4_GROUP_SIZES
from kvserve.core.structured_outputs.backends import BACKENDS as STRUCTURED_OUTPUTS_BACKENDS
from kvserve.core.vllm_keywords import without_vllm_keywords

DTYPES = {"auto": None, "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
# "auto": the model dtype; the FP8 ones store fp8(x / scale) with each layer's checkpoint scales, else 1.0 (vLLM's)
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}
PREEMPTION_MODES = ("recompute", "swap")
EXECUTOR_BACKENDS = ("mp", "ray")
LOAD_FORMATS = ("auto", "dummy")
TOKENIZER_MODES = ("auto", "hf")
# vLLM calls its native implementations "vllm"; copied code passes that
MODEL_IMPLS = ("auto", "native", "transformers", "vllm")
GENERATION_CONFIGS = ("auto", "none", "vllm")
RUNNERS = ("auto", "generate", "pooling")
DEFAULT_MAX_NUM_SEQS = 128   # dummy: random weights of the checkpoint's shapes, for benchmarks
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
    model: str | None = option(None, "a Hugging Face model folder, a .gguf file, or a model id: ORG/NAME, "
                                     "ORG/NAME:QUANT for a GGUF repo's file (default: SmolLM2-135M-Instruct)")
    tokenizer: str | None = option(None, "a tokenizer folder or model id other than the model's")
    revision: str | None = option(None, "the branch, tag or commit of a model id (default: main)")
    tokenizer_revision: str | None = option(None, "the branch, tag or commit of the tokenizer's id (default: "
                                                  "revision)")
    download_dir: str | None = option(None, "the Hugging Face cache folder that model ids are found in and "
                                            "downloaded to (default: HF_HUB_CACHE, or HF_HOME's hub)")
    gguf_file: str | None = option(None, "the .gguf file to load of a model id's repo or a folder (or choose it "
                                         "by an ORG/NAME:QUANT suffix)")
    trust_remote_code: bool = option(False, "let transformers run the Python code a model ships for its config "
                                            "or tokenizer (its auto_map)")
    tokenizer_mode: str = option("auto", "vLLM's; both load the model's tokenizer with transformers, which has no "
                                         "slow tokenizers from version 5 on", choices=TOKENIZER_MODES)
    dtype: str | torch.dtype = option("auto", "the weights' and activations' dtype; auto: the checkpoint's",
                                      choices=tuple(DTYPES))
    max_model_len: int | None = option(None, "the longest prompt plus output, in tokens (default: the model's, "
                                             "lowered to what the KV cache holds when that is smaller)")
    seed: int = option(0, "seeds sampling's default generator")
    quantization: str | None = option(None, "a quantized checkpoint's format (found in its quantization_config "
                                            "without being asked), gguf for a .gguf file's quantized blocks, or "
                                            "int4 / int8 / fp8 quantized at load", choices=tuple(QUANTIZATION_METHODS),
                                      short="-q")
    chat_template: str | None = option(None, "a Jinja chat template, or (on the command line) a file holding one",
                                       parse="template")
    load_format: str = option("auto", "dummy: random weights of the model's shapes, no checkpoint read (benchmarks)",
                              choices=LOAD_FORMATS)
    quantization_group_size: int | None = option(None, "with quantization int4: inputs per group (default 32)",
                                                 choices=INT4_GROUP_SIZES)
    generation_config: str = option("auto", "where requests' default sampling parameters come from: auto, the "
                                            "model's generation_config.json; none (vLLM: vllm), kvserve's own; or a "
                                            "folder holding a generation_config.json")
    model_impl: str = option("auto", "which code runs the model: native, kvserve's own (vllm: the same); "
                                     "transformers, transformers' modeling code on kvserve's KV cache and "
                                     "attention; auto: native where kvserve has the architecture, else "
                                     "transformers for a causal LM it implements", choices=MODEL_IMPLS)
    runner: str = option("auto", "generate: a language model's tokens; pooling: embeddings (LLM.embed, "
                                 "/v1/embeddings); auto: pooling for an encoder (BertModel), else generate",
                         choices=RUNNERS)
    # max_model_len came from the model, not the user: the KV cache may lower it to what it holds
    max_model_len_from_model: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.torch_dtype = resolve_dtype(self.dtype)
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {self.model_impl!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        check_int("max_model_len", self.max_model_len, 1, allow_none=True)
        check_int("seed", self.seed, 0)
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"trust_remote_code must be True or False, got {self.trust_remote_code!r}")
        if self.tokenizer_mode not in TOKENIZER_MODES:
            raise ValueError(f"tokenizer_mode must be one of {', '.join(TOKENIZER_MODES)}, got "
                             f"{self.tokenizer_mode!r}: kvserve loads tokenizers with transformers, which has no slow "
                             f"ones from version 5 on, and not with mistral_common or a custom class")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization {self.quantization!r} is not supported yet; allowed: None, "
                             f"{', '.join(map(repr, QUANTIZATION_METHODS))}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.generation_config not in GENERATION_CONFIGS and not os.path.isfile(
                os.path.join(str(self.generation_config), "generation_config.json")):
            raise ValueError(f"generation_config must be {', '.join(GENERATION_CONFIGS)} or a folder holding a "
                             f"generation_config.json, got {self.generation_config!r}")
        if self.quantization_group_size is not None:
            if self.quantization != "int4":
                raise ValueError(f"quantization_group_size applies to quantization='int4' (online int4), not to "
                                 f"quantization={self.quantization!r}")
            if self.quantization_group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                                 f"got {self.quantization_group_size!r}")


@dataclass
class CacheConfig:
    block_size: int = option(16, "tokens per KV cache block", choices=(8, 16, 32, 64, 128))
    kv_cache_memory: int | str | None = option(None, "the KV cache's budget, in bytes or like 4GiB (default: the "
                                                     "platform's; 4GiB on CPUs)")
    num_gpu_blocks_override: int | None = option(None, "this many KV cache blocks, whatever the budget")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompts' shared prefixes")
    preemption_mode: str = option("recompute", "what happens to a preempted sequence's KV blocks: dropped and "
                                  "recomputed, or swapped to host memory", choices=PREEMPTION_MODES)
    swap_space: float | str = option(4, "GiB (or a size like 512MiB) of host memory for swapped-out KV blocks, with "
                                        "preemption_mode swap")
    cache_dtype: str = option("auto", "fp8 (e4m3) / fp8_e5m2: the KV cache in 8 bits, twice bfloat16's tokens in a "
                                      "budget; auto: the model's dtype", name="kv_cache_dtype",
                              choices=tuple(KV_CACHE_DTYPES))
    calculate_kv_scales: bool = option(False, "with an FP8 KV cache: each layer's scales from the first batch's keys "
                                              "and values, instead of the checkpoint's (or 1.0)")

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
    max_num_seqs: int | None = option(None, f"the most sequences running at once (default {DEFAULT_MAX_NUM_SEQS}, "
                                            "or max_num_batched_tokens where that is set and smaller)")
    max_num_batched_tokens: int | None = option(None, "the most tokens one step computes (default 2048, or "
                                                      "max_model_len without chunked prefill)")
    enable_chunked_prefill: bool = option(True, "split long prompts over steps, beside running decodes")

    def __post_init__(self):
        check_int("max_num_seqs", self.max_num_seqs, 1, allow_none=True)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, allow_none=True)
        if self.max_num_seqs is None:   # the default gives way to a smaller step budget; an explicit one does not
            self.max_num_seqs = min(DEFAULT_MAX_NUM_SEQS, self.max_num_batched_tokens or DEFAULT_MAX_NUM_SEQS)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = option(1, "ranks (processes on this machine) to split the model over", short="-tp")
    pipeline_parallel_size: int = option(1, "stages to split the model's layers over, each of tensor_parallel_size "
                                            "ranks", short="-pp")
    data_parallel_size: int = option(1, "engine replicas, each with the whole model, that requests are balanced "
                                        "over", short="-dp")
    enable_expert_parallel: bool = option(False, "split mixture-of-experts layers over the ranks by experts, not by "
                                                 "columns")
    distributed_executor_backend: str = option("mp", "where ranks 1.. run: processes spawned here (mp), or Ray "
                                                     "actors (ray)", choices=EXECUTOR_BACKENDS)
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
    device: str | None = option(None, "a platform's name, as `kvserve plugins` lists them (default: "
                                      "KVSERVE_PLATFORM, or the best platform found)")
    enforce_eager: bool = option(False, "run every step eagerly, without the platform's graphs (CUDA/HIP graphs, "
                                        "CPU replays)")


@dataclass
class StructuredOutputsConfig:
    backend: str = option("auto", "grammar library for structured outputs; auto: xgrammar, else llguidance where "
                                  "xgrammar cannot compile a constraint", name="structured_outputs_backend",
                          choices=STRUCTURED_OUTPUTS_BACKENDS)
    max_bytes: int = option(64 * 1024, "the largest schema, regex or grammar a request may send, in bytes",
                            name="structured_outputs_max_bytes")
    compile_timeout: float = option(10.0, "seconds a request may wait for its constraint to compile before it is "
                                          "refused", name="structured_outputs_compile_timeout")
    reasoning_parser: str | None = option(None, "the model's reasoning format (deepseek_r1, qwen3, or a plugin's): "
                                                "constraints start after the reasoning, and the server moves it "
                                                "into reasoning_content")

    def __post_init__(self):
        if self.backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, "
                             f"got {self.backend!r}")
        check_int("structured_outputs_max_bytes", self.max_bytes, 1)
        if isinstance(self.compile_timeout, bool) or not isinstance(self.compile_timeout, (int, float)) or \
                not 0 < self.compile_timeout < float("inf"):
            raise ValueError(f"structured_outputs_compile_timeout must be a number of seconds > 0, got "
                             f"{self.compile_timeout!r}")


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256)


@dataclass
class LoRAConfig:
    enable_lora: bool = option(False, "serve PEFT LoRA adapters over the base model: LLM.generate(..., "
                                      "lora_request=LoRARequest(name, id, path)); docs/lora.md")
    max_loras: int = option(1, "the most adapters one step runs (requests of others wait)")
    max_lora_rank: int = option(16, "the largest adapter rank taken", choices=LORA_RANKS)
    max_cpu_loras: int | None = option(None, "adapters kept read in host memory, the least recently used dropped "
                                             "first (default: max_loras)")

    def __post_init__(self):
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora must be True or False, got {self.enable_lora!r}")
        check_int("max_loras", self.max_loras, 1)
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}, got "
                             f"{self.max_lora_rank!r}")
        check_int("max_cpu_loras", self.max_cpu_loras, 1, allow_none=True)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras must be >= max_loras ({self.max_loras}), since a step's adapters are "
                             f"all in host memory, got {self.max_cpu_loras}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    speculative_config: dict | None = option(None, 'speculative decoding, as JSON on the command line: {"method": '
                                                   '"ngram", "num_speculative_tokens": 3}', parse="json")
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        self.speculation = (None if self.speculative_config is None else
                            SpeculativeConfig.from_dict(self.speculative_config))
        parallel = self.parallel
        if self.lora.enable_lora and (parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                                      parallel.data_parallel_size, self.speculative_config) != (1, 1, 1, None):
            raise ValueError("enable_lora runs on one process without speculative decoding for now: "
                             "tensor_parallel_size, pipeline_parallel_size and data_parallel_size must be 1 and "
                             "speculative_config None")

    def finalize(self, model_max_len: int) -> None:
        """Fill in limits that depend on the loaded model."""
        model_cfg, sched = self.model, self.scheduler
        if model_cfg.max_model_len is None:
            model_cfg.max_model_len, model_cfg.max_model_len_from_model = model_max_len, True
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


def engine_options() -> dict[str, Option]:
    """Every engine option by name, in the order of the config classes."""
    found = {}
    for outer in fields(EngineConfig):
        if outer.default_factory is MISSING:
            found.update((o.name, o) for o in class_options(EngineConfig) if o.field is outer)
        else:
            found.update((o.name, o) for o in class_options(outer.default_factory, outer.name))
    return found


def build_engine_config(model: str | None = None, **options) -> EngineConfig:
    """An EngineConfig from the flat keyword options that ``LLM(...)`` and the command line take (vLLM's names).
    A vLLM keyword that kvserve has no option for is a ValueError that says why, unless its value asks for what
    kvserve does anyway."""
    options = without_vllm_keywords(options)
    known = engine_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown engine option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; allowed: "
                        f"{', '.join(name for name in known if name != 'model')}")
    sections: dict[str | None, dict] = {None: {}}
    for name, value in {**options, "model": model}.items():
        sections.setdefault(known[name].section, {})[known[name].field.name] = value
    configs = {outer.name: outer.default_factory(**sections.get(outer.name, {})) for outer in fields(EngineConfig)
               if outer.default_factory is not MISSING}
    return EngineConfig(**configs, **sections[None])
