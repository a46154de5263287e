"""Which adapters are read into host memory and which sit in the device's slots, and each step's token slots."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kvserve.core.config import LoRAConfig
from kvserve.core.lora.adapter import LoRAAdapter, read_adapter
from kvserve.core.lora.layers import KernelMaker, LoRALayer, LoRAStep, adaptable_layers, checkpoint_targets
from kvserve.core.lora.request import LoRARequest


class LoRAManager:
    """Gives every adaptable layer of ``model`` its LoRALayer. Adapters are read once into host memory (at most
    max_cpu_loras, the least recently used dropped first; a dropped one is read again when a request needs it)
    and copied into one of the max_loras device slots when a step runs them, replacing the least recently used
    adapter that step does not run. The scheduler lets no step run more than max_loras adapters. ``make_kernel``
    is the platform's linear_kernel hook, which the layers' stacked adapters run on."""

    def __init__(self, config: LoRAConfig, model: nn.Module, make_kernel: KernelMaker, device: torch.device,
                 dtype: torch.dtype):
        if not getattr(model, "supports_lora", False):
            raise ValueError(f"enable_lora: {type(model).__name__} does not take LoRA adapters yet; the models "
                             f"built on kvserve's Llama family code do (Llama, Mistral, Qwen2, Qwen3, ...)")
        self.config, self.device, self.dtype = config, device, dtype
        self.layers = adaptable_layers(model)
        self.targets = checkpoint_targets(model, self.layers)
        self.step = LoRAStep()
        self.lora_layers = {name: LoRALayer(layer, self.step, make_kernel, config.max_loras, config.max_lora_rank,
                                            dtype, device) for name, layer in self.layers.items()}
        for name, lora_layer in self.lora_layers.items():
            self.layers[name].lora = lora_layer
        self.in_host: OrderedDict[int, LoRAAdapter] = OrderedDict()   # by id, least recently used first
        self.in_slot: OrderedDict[int, int] = OrderedDict()           # id -> device slot, least recently used first

    def add(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter ``request`` names, read and checked (once per id while host memory keeps it)."""
        known = self.in_host.get(request.lora_int_id)
        if known is not None:
            if (known.request.lora_name, known.request.lora_path) != (request.lora_name, request.lora_path):
                raise ValueError(f"lora_int_id {request.lora_int_id} is adapter {known.request.lora_name!r} "
                                 f"({known.request.lora_path}) in this engine, not {request.lora_name!r} "
                                 f"({request.lora_path}): give each adapter an id of its own")
            self.in_host.move_to_end(request.lora_int_id)
            return known
        adapter = read_adapter(request, self.targets, self.layers, self.config.max_lora_rank, self.dtype)
        self.in_slot.pop(request.lora_int_id, None)   # a slot's copy may predate this read: copy it afresh
        self.in_host[request.lora_int_id] = adapter
        while len(self.in_host) > self.config.max_cpu_loras:
            self.in_host.popitem(last=False)
        return adapter

    def remove(self, lora_int_id: int) -> None:
        """Forget an adapter: its host copy and its device slot."""
        self.in_host.pop(lora_int_id, None)
        self.in_slot.pop(lora_int_id, None)

    def prepare(self, requests: list[LoRARequest | None], num_tokens: list[int]) -> None:
        """Set the step's slot mask for sequences running with ``requests`` (None: no adapter), each computing
        ``num_tokens`` tokens; the adapters not on the device yet are copied there first."""
        running = {r.lora_int_id: r for r in requests if r is not None}
        if not running:
            self.step.slot_mask = None
            return
        copied = [self._to_slot(request, running) for request in running.values()]
        if any(copied):
            for lora_layer in self.lora_layers.values():
                lora_layer.prepare_kernels()
        slots = torch.tensor([-1 if r is None else self.in_slot[r.lora_int_id] for r in requests])
        self.step.take(torch.repeat_interleave(slots, torch.tensor(num_tokens)), self.config.max_loras, self.dtype,
                       self.device)

    def _to_slot(self, request: LoRARequest, running: dict[int, LoRARequest]) -> bool:
        """Whether the adapter had to be copied to a slot."""
        lora_int_id = request.lora_int_id
        if lora_int_id in self.in_slot:
            self.in_slot.move_to_end(lora_int_id)
            return False
        taken = set(self.in_slot.values())
        free = [slot for slot in range(self.config.max_loras) if slot not in taken]
        if free:
            slot = free[0]
        else:
            victim = next((i for i in self.in_slot if i not in running), None)
            if victim is None:
                raise RuntimeError(f"a step runs {len(running)} adapters, above max_loras={self.config.max_loras}")
            slot = self.in_slot.pop(victim)
        adapter = self.add(request)
        for name, lora_layer in self.lora_layers.items():
            lora_layer.load(slot, adapter.weights.get(name, {}))
        self.in_slot[lora_int_id] = slot
        return True
